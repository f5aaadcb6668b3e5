"""Parity of :mod:`jpeft.models.llama` with ``transformers``' ``LlamaForCausalLM`` (PyTorch, CPU),
KV-cache decoding, taps, and PEFT methods attaching by path / tap."""

from __future__ import annotations

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jpeft.core import transform as T  # noqa: E402
from jpeft.core.paths import flatten  # noqa: E402
from jpeft.methods.lora import LoraConfig, lora  # noqa: E402
from jpeft.methods.prefix import PrefixConfig, prefix  # noqa: E402
from jpeft.models import taps  # noqa: E402
from jpeft.models.llama import (  # noqa: E402
    LlamaConfig,
    LlamaForCausalLM,
    assemble_params,
    from_pretrained,
    init_cache,
    init_params,
    params_from_state_dict,
    state_dict_from_params,
)

TOL = 1e-4
CACHE_TOL = 1e-5
LEFT_PAD = (0, 3, 6)  # per-row count of left padding tokens
SEQ = 9


def tiny_hf_config(*, tied: bool = False, rope: str = "default", kv_heads: int = 2):
    rope_parameters = {"rope_type": "default", "rope_theta": 1000.0}
    if rope == "llama3":
        # small original context so that all three frequency bands (scaled, smoothed, kept) occur
        rope_parameters = {"rope_type": "llama3", "rope_theta": 1000.0, "factor": 4.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 64}
    return transformers.LlamaConfig(
        vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
        rope_parameters=rope_parameters, tie_word_embeddings=tied, initializer_range=0.2,
        pad_token_id=0, attn_implementation="eager",
    )


def tiny_hf_model(hf_config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # RMSNorm weights start at 1: perturb everything
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def to_flax(hf_model):
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    config = LlamaConfig.from_hf(hf_model.config.to_dict())
    model = LlamaForCausalLM(config)
    return model, assemble_params(model, params_from_state_dict(state, config), "float32", "test")


def left_padded_batch(seq: int = SEQ, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 99, size=(len(LEFT_PAD), seq))
    mask = np.ones_like(ids)
    for row, pad in enumerate(LEFT_PAD):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def hf_positions(mask):
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    return pos


def torch_logits(hf_model, ids, mask):
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(hf_positions(mask)))
    return out.logits.numpy()


def max_diff(a, b, where=None):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.max(np.abs(a - b)))


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied,rope,kv_heads", [(False, "default", 2), (True, "default", 2),
                                                (False, "llama3", 4)])
def test_parity_with_transformers(tied, rope, kv_heads):
    hf_model = tiny_hf_model(tiny_hf_config(tied=tied, rope=rope, kv_heads=kv_heads))
    model, params = to_flax(hf_model)
    assert model.config.tie_word_embeddings == tied and model.config.rope_type == rope
    assert ("lm_head" in params) == (not tied)
    fresh = {k: v.shape for k, v in flatten(init_params(model, jax.random.key(0))).items()}
    assert {k: v.shape for k, v in flatten(params).items()} == fresh
    assert "model/layers_0/self_attn/q_proj/kernel" in fresh
    assert fresh["model/layers_0/self_attn/k_proj/kernel"] == (32, kv_heads * 8)

    ids, mask = left_padded_batch()
    expected = torch_logits(hf_model, ids, mask)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(expected).max() > 0.5
    real = mask > 0  # padded query rows attend to nothing: their logits are not meaningful
    diff = max_diff(logits, expected, real)
    print(f"llama tied={tied} rope={rope} kv={kv_heads}: max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_state_dict_round_trip_and_from_pretrained(tmp_path):
    hf_model = tiny_hf_model(tiny_hf_config(tied=False))
    model, params = to_flax(hf_model)
    back = state_dict_from_params(params, model.config)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    assert set(back) == set(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)

    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    loaded_model, loaded = from_pretrained(tmp_path)
    assert loaded_model.config == model.config
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))


def decode_with_cache(model, params, ids, mask, prefill: int, apply=None):
    """Prefill ``prefill`` tokens, then decode the rest one by one (jitted); all logits."""
    apply = apply or (lambda p, i, m, c: model.apply({"params": p}, i, m, cache=c))
    step = jax.jit(apply)
    cache = init_cache(model.config, ids.shape[0], ids.shape[1] + 2)  # 2 slots never written
    logits, cache = step(params, jnp.asarray(ids[:, :prefill]), jnp.asarray(mask[:, :prefill]), cache)
    out = [np.asarray(logits)]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        out.append(np.asarray(logits))
    assert int(cache["index"]) == ids.shape[1]
    np.testing.assert_array_equal(np.asarray(cache["positions"]), mask.sum(1))
    return np.concatenate(out, axis=1)


def test_cached_decoding_equals_full_forward():
    hf_model = tiny_hf_model(tiny_hf_config())
    model, params = to_flax(hf_model)
    ids, mask = left_padded_batch(SEQ + 3)
    mask[:, SEQ:] = 1
    full = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    cached = decode_with_cache(model, params, ids, mask, SEQ)
    real = mask > 0
    prefill_diff = max_diff(cached[:, :SEQ], full[:, :SEQ], real[:, :SEQ])
    decode_diff = max_diff(cached[:, SEQ:], full[:, SEQ:])
    print(f"llama cache: prefill {prefill_diff:.3g}, decode {decode_diff:.3g}")
    assert prefill_diff <= CACHE_TOL and decode_diff <= CACHE_TOL
    # and the full forward is transformers' forward over the whole sequence
    assert max_diff(full, torch_logits(hf_model, ids, mask), real) <= TOL


def test_taps_identity_and_counts():
    model = LlamaForCausalLM(LlamaConfig.from_hf(tiny_hf_config().to_dict()))
    params = init_params(model, jax.random.key(1))
    ids, mask = left_padded_batch()
    plain = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    hits = collections.Counter()

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, taps.Tap) and context.method_name == "__call__":
            hits[(context.module.kind, context.module.layer)] += 1
            assert not kwargs
            return next_fun(*args, **kwargs)  # unchanged
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        tapped = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(tapped), np.asarray(plain))
    expected = {(taps.EMBED_INPUTS, None): 1, (taps.EMBED_POSITIONS, None): 1}
    for layer in range(2):
        for kind in (taps.ATTN_KV, taps.ATTN_OUT, taps.FFN_HIDDEN, taps.FFN_OUT):
            expected[(kind, layer)] = 1
    assert dict(hits) == expected


def test_prefix_is_seen_by_every_query_with_and_without_cache():
    """Prefix tuning through the attn.kv tap: every query (the first token included) sees the
    prefix, and cached decoding with the prefix equals the uncached adapted forward."""
    model = LlamaForCausalLM(LlamaConfig.from_hf(tiny_hf_config().to_dict()))
    params = init_params(model, jax.random.key(2))
    info = model.info()
    assert (info.family, info.kv_heads, info.head_dim, info.has_bias) == ("llama", 2, 8, False)
    method = prefix(PrefixConfig(num_virtual_tokens=3, projection=False, init_scale=0.5))
    delta = method.init(jax.random.key(3), params, info)
    ids, mask = left_padded_batch(SEQ + 3)
    mask[:, SEQ:] = 1
    full = np.asarray(T.apply(model, method, params, delta, jnp.asarray(ids), jnp.asarray(mask)))
    base = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert max_diff(full, base, mask > 0) > 1e-3  # the prefix changes every real position ...
    assert np.all(np.abs(full - base)[:, 0][mask[:, 0] > 0] > 0)  # ... including the first token

    apply = lambda p, i, m, c: T.apply(model, method, p, delta, i, m, cache=c)
    cached = decode_with_cache(model, params, ids, mask, SEQ, apply)
    assert max_diff(cached[:, SEQ:], full[:, SEQ:]) <= CACHE_TOL
    assert max_diff(cached[:, :SEQ], full[:, :SEQ], mask[:, :SEQ] > 0) <= CACHE_TOL


def test_lora_targets_and_merge():
    model = LlamaForCausalLM(LlamaConfig.from_hf(tiny_hf_config().to_dict()))
    params = init_params(model, jax.random.key(4))
    method = lora(LoraConfig(r=2, alpha=4, targets=r"(q_proj|v_proj)$"))
    delta = method.init(jax.random.key(5), params, model.info())
    assert sorted(flatten(delta)) == sorted(
        f"model/layers_{i}/self_attn/{m}/{ab}" for i in range(2) for m in ("q_proj", "v_proj")
        for ab in ("lora_A", "lora_B"))
    delta = jax.tree.map(lambda x: x + 0.3, delta)  # a non-trivial update
    ids, mask = left_padded_batch()
    adapted = T.apply(model, method, params, delta, jnp.asarray(ids), jnp.asarray(mask))
    merged = model.apply({"params": T.merge(method, params, delta)}, jnp.asarray(ids), jnp.asarray(mask))
    base = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff(adapted, base) > 1e-3
    assert max_diff(adapted, merged) <= 1e-4
