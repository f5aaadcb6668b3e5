"""Parity of :mod:`jpeft.models.gpt2` with ``transformers``' ``GPT2LMHeadModel`` (PyTorch, CPU),
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
from jpeft.models.gpt2 import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    from_pretrained,
    init_cache,
    init_params,
    params_from_state_dict,
    state_dict_from_params,
)
from jpeft.models.llama import assemble_params  # noqa: E402

TOL = 1e-4
CACHE_TOL = 1e-5
LEFT_PAD = (0, 3, 6)
SEQ = 9


def tiny_hf_config(*, tied: bool = True, **kw):
    return transformers.GPT2Config(
        vocab_size=99, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=37,
        tie_word_embeddings=tied, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, attn_implementation="eager", **kw,
    )


def tiny_hf_model(hf_config, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # LayerNorm starts at (1, 0) and biases at 0: perturb everything
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def to_flax(hf_model):
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    config = GPT2Config.from_hf(hf_model.config.to_dict())
    model = GPT2LMHeadModel(config)
    return model, assemble_params(model, params_from_state_dict(state, config), "float32", "test")


def left_padded_batch(seq: int = SEQ, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 99, size=(len(LEFT_PAD), seq))
    mask = np.ones_like(ids)
    for row, pad in enumerate(LEFT_PAD):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def torch_logits(hf_model, ids, mask):
    pos = np.cumsum(mask, axis=1) - 1
    pos[mask == 0] = 1
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                       position_ids=torch.from_numpy(pos))
    return out.logits.numpy()


def max_diff(a, b, where=None):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    if where is not None:
        a, b = a[where], b[where]
    return float(np.max(np.abs(a - b)))


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied,extra", [(True, {}), (False, {"scale_attn_by_inverse_layer_idx": True})])
def test_parity_with_transformers(tied, extra):
    hf_model = tiny_hf_model(tiny_hf_config(tied=tied, **extra))
    model, params = to_flax(hf_model)
    assert ("lm_head" in params) == (not tied)
    fresh = {k: v.shape for k, v in flatten(init_params(model, jax.random.key(0))).items()}
    assert {k: v.shape for k, v in flatten(params).items()} == fresh
    assert fresh["transformer/h_0/attn/c_attn/kernel"] == (32, 96)

    ids, mask = left_padded_batch()
    expected = torch_logits(hf_model, ids, mask)
    logits = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(expected).max() > 0.5
    diff = max_diff(logits, expected, mask > 0)
    print(f"gpt2 tied={tied} {extra}: max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_state_dict_round_trip_and_from_pretrained(tmp_path):
    hf_model = tiny_hf_model(tiny_hf_config(tied=False))
    model, params = to_flax(hf_model)
    back = state_dict_from_params(params, model.config)
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert set(back) == set(state)
    assert all(np.array_equal(back[k], state[k]) for k in state)

    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    loaded_model, loaded = from_pretrained(tmp_path)
    assert loaded_model.config == model.config
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)))


def decode_with_cache(model, params, ids, mask, prefill: int, apply=None):
    apply = apply or (lambda p, i, m, c: model.apply({"params": p}, i, m, cache=c))
    step = jax.jit(apply)
    cache = init_cache(model.config, ids.shape[0], ids.shape[1] + 2)
    logits, cache = step(params, jnp.asarray(ids[:, :prefill]), jnp.asarray(mask[:, :prefill]), cache)
    out = [np.asarray(logits)]
    for t in range(prefill, ids.shape[1]):
        logits, cache = step(params, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
        out.append(np.asarray(logits))
    assert int(cache["index"]) == ids.shape[1]
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
    print(f"gpt2 cache: prefill {prefill_diff:.3g}, decode {decode_diff:.3g}")
    assert prefill_diff <= CACHE_TOL and decode_diff <= CACHE_TOL
    assert max_diff(full, torch_logits(hf_model, ids, mask), real) <= TOL


def test_taps_identity_and_counts():
    model = GPT2LMHeadModel(GPT2Config.from_hf(tiny_hf_config().to_dict()))
    params = init_params(model, jax.random.key(1))
    ids, mask = left_padded_batch()
    plain = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    hits = collections.Counter()

    def spy(next_fun, args, kwargs, context):
        if isinstance(context.module, taps.Tap) and context.method_name == "__call__":
            hits[(context.module.kind, context.module.layer)] += 1
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
        tapped = model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(tapped), np.asarray(plain))
    expected = {(taps.EMBED_INPUTS, None): 1, (taps.EMBED_POSITIONS, None): 1}
    for layer in range(2):
        for kind in (taps.ATTN_KV, taps.ATTN_OUT, taps.FFN_HIDDEN, taps.FFN_OUT):
            expected[(kind, layer)] = 1
    assert dict(hits) == expected


def test_prefix_with_cache_and_lora_on_fused_qkv():
    model = GPT2LMHeadModel(GPT2Config.from_hf(tiny_hf_config().to_dict()))
    params = init_params(model, jax.random.key(2))
    ids, mask = left_padded_batch(SEQ + 3)
    mask[:, SEQ:] = 1

    method = prefix(PrefixConfig(num_virtual_tokens=3, projection=False, init_scale=0.5))
    delta = method.init(jax.random.key(3), params, model.info())
    full = np.asarray(T.apply(model, method, params, delta, jnp.asarray(ids), jnp.asarray(mask)))
    base = np.asarray(model.apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    assert np.all(np.abs(full - base)[:, 0][mask[:, 0] > 0] > 0)  # even the first token sees it
    apply = lambda p, i, m, c: T.apply(model, method, p, delta, i, m, cache=c)
    cached = decode_with_cache(model, params, ids, mask, SEQ, apply)
    assert max_diff(cached[:, SEQ:], full[:, SEQ:]) <= CACHE_TOL

    method = lora(LoraConfig(r=2, alpha=4, targets=r"c_attn$"))
    delta = method.init(jax.random.key(5), params, model.info())
    assert sorted(flatten(delta)) == sorted(
        f"transformer/h_{i}/attn/c_attn/{ab}" for i in range(2) for ab in ("lora_A", "lora_B"))
    delta = jax.tree.map(lambda x: x + 0.3, delta)
    adapted = T.apply(model, method, params, delta, jnp.asarray(ids), jnp.asarray(mask))
    merged = model.apply({"params": T.merge(method, params, delta)}, jnp.asarray(ids), jnp.asarray(mask))
    assert max_diff(adapted, base) > 1e-3
    assert max_diff(adapted, merged) <= 1e-4


def test_auto_from_pretrained_dispatches_on_model_type(tmp_path):
    import json

    import pytest

    from jpeft.models import auto_from_pretrained
    from jpeft.models.gpt2 import GPT2LMHeadModel

    torch = pytest.importorskip("torch")
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel as HFModel

    torch.manual_seed(0)
    HFModel(HFConfig(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path)
    model, params = auto_from_pretrained(tmp_path)
    assert isinstance(model, GPT2LMHeadModel) and "transformer" in params
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "t5"}))
    with pytest.raises(ValueError, match="not supported"):
        auto_from_pretrained(tmp_path)
