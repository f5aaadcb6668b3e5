"""Parity of :mod:`jpeft.models.bert` with Hugging Face ``transformers`` (PyTorch, CPU).

Tiny random configs check every code path (BERT/RoBERTa, classification/regression, activations,
padding, token types); the real all-MiniLM-L6-v2 checkpoint checks loading end to end.
"""

from __future__ import annotations

import collections
import json
import pickle
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jpeft.core.paths import flatten, unflatten  # noqa: E402
from jpeft.models import taps  # noqa: E402
from jpeft.models.bert import (  # noqa: E402
    BertConfig,
    BertModel,
    attention_in_blocks,
    from_pretrained,
    init_params,
    params_from_state_dict,
    state_dict_from_params,
)

TOL = 1e-4
LENGTHS = (9, 6, 3)  # per-row real lengths; padding (mask 0) at the end of rows 1 and 2


def tiny_hf_config(family: str = "bert", *, num_labels: int = 3, hidden_act: str = "gelu"):
    common = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act=hidden_act,
        num_labels=num_labels,
        initializer_range=0.2,  # O(1) logits, so that 1e-4 is a tight tolerance
    )
    if family == "bert":
        return transformers.BertConfig(max_position_embeddings=64, type_vocab_size=2, pad_token_id=0, **common)
    # RoBERTa positions start at pad_token_id + 1, hence the room beyond the sequence length.
    return transformers.RobertaConfig(
        max_position_embeddings=64, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **common
    )


def tiny_hf_model(hf_config, seed: int = 0):
    torch.manual_seed(seed)
    cls = (
        transformers.RobertaForSequenceClassification
        if hf_config.model_type == "roberta"
        else transformers.BertForSequenceClassification
    )
    model = cls(hf_config).eval()
    # transformers initialises LayerNorm to (1, 0) and biases to 0, which would hide a swapped
    # scale/bias or a dropped bias: perturb every parameter.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def padded_batch(hf_config, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of different lengths, padded at the end with the pad id and mask 0."""
    rng = np.random.default_rng(seed)
    pad = hf_config.pad_token_id
    batch, seq = len(LENGTHS), max(LENGTHS)
    ids = rng.integers(max(pad, 2) + 1, hf_config.vocab_size, size=(batch, seq))
    mask = np.zeros((batch, seq), np.int64)
    types = np.zeros((batch, seq), np.int64)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
        ids[row, length:] = pad
        if hf_config.type_vocab_size > 1:
            types[row, length // 2 : length] = 1  # a second segment in every row
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask, "token_type_ids": types}


def torch_logits(hf_model, batch) -> np.ndarray:
    with torch.no_grad():
        out = hf_model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    return out.logits.numpy()


def to_flax(hf_model, **overrides):
    """``(model, params)`` for ``hf_model``'s config and weights."""
    state = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    params = unflatten({k: jnp.asarray(v) for k, v in params_from_state_dict(state).items()})
    config = BertConfig.from_hf(hf_model.config.to_dict(), num_labels=hf_model.config.num_labels, **overrides)
    return BertModel(config), params


def flax_logits(model, params, batch) -> np.ndarray:
    out = model.apply(
        {"params": params},
        jnp.asarray(batch["input_ids"], jnp.int32),
        jnp.asarray(batch["attention_mask"], jnp.int32),
        jnp.asarray(batch["token_type_ids"], jnp.int32),
    )
    return np.asarray(out)


def assert_close(actual, expected, what: str, tol: float = TOL) -> float:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    diff = float(np.max(np.abs(actual - expected)))
    print(f"{what}: max |diff| = {diff:.3g}")
    assert diff <= tol, f"{what}: max |diff| = {diff:.3g} > {tol}"
    return diff


def assert_same_layout(model, params):
    """The converted tree has exactly the paths and shapes that the Flax model creates."""
    fresh = {k: v.shape for k, v in flatten(init_params(model, jax.random.key(0))).items()}
    got = {k: v.shape for k, v in flatten(params).items()}
    assert got == fresh, (
        f"missing: {sorted(set(fresh) - set(got))}; extra: {sorted(set(got) - set(fresh))}; "
        f"shape mismatches: {[(k, got[k], fresh[k]) for k in set(got) & set(fresh) if got[k] != fresh[k]]}"
    )


# ----------------------------------------------------------------------------------------------
# 1. Parity on tiny random configs


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new", "relu"])
def test_bert_classification_parity(hidden_act):
    hf_config = tiny_hf_config("bert", hidden_act=hidden_act)
    hf_model = tiny_hf_model(hf_config)
    batch = padded_batch(hf_config)
    assert set(np.unique(batch["token_type_ids"])) == {0, 1}
    assert (batch["attention_mask"] == 0).any()
    model, params = to_flax(hf_model)
    assert_same_layout(model, params)
    assert "head" in params and "classifier" in params["head"] and "dense" in params["pooler"]
    logits = flax_logits(model, params, batch)
    assert logits.shape == (len(LENGTHS), 3)
    expected = torch_logits(hf_model, batch)
    assert np.abs(expected).max() > 0.1, f"logits too small for a meaningful check: {expected}"
    assert_close(logits, expected, f"bert/{hidden_act} logits")


def test_parity_check_is_sensitive():
    """The tiny setup tells gelu from its tanh approximation: 1e-4 is far below real bugs."""
    hf_model = tiny_hf_model(tiny_hf_config("bert", hidden_act="gelu"))
    batch = padded_batch(hf_model.config)
    model, params = to_flax(hf_model, hidden_act="gelu_new")
    diff = np.abs(flax_logits(model, params, batch) - torch_logits(hf_model, batch)).max()
    print(f"gelu vs gelu_new (should be large): max |diff| = {diff:.3g}")
    assert diff > 2 * TOL, diff


def test_roberta_classification_parity():
    hf_config = tiny_hf_config("roberta")
    hf_model = tiny_hf_model(hf_config)
    batch = padded_batch(hf_config)
    model, params = to_flax(hf_model)
    assert model.config.is_roberta
    assert_same_layout(model, params)
    assert set(params["head"]) == {"dense", "out_proj"} and "pooler" not in params
    assert_close(flax_logits(model, params, batch), torch_logits(hf_model, batch), "roberta logits")


def test_roberta_position_ids_match_transformers():
    """Flax numbers real tokens from pad+1 (pad positions get pad), as transformers does."""
    hf_config = tiny_hf_config("roberta")
    hf_model = tiny_hf_model(hf_config)
    batch = padded_batch(hf_config)
    expected = hf_model.roberta.embeddings.create_position_ids_from_input_ids(
        torch.from_numpy(batch["input_ids"]), hf_config.pad_token_id
    ).numpy()
    model, params = to_flax(hf_model)
    seen = {}

    def grab_positions(next_fun, args, kwargs, context):
        module = context.module
        if (
            isinstance(module, nn.Embed)
            and module.name == "position_embeddings"
            and context.method_name == "__call__"
        ):
            seen["positions"] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab_positions):
        flax_logits(model, params, batch)
    np.testing.assert_array_equal(seen["positions"], expected)


@pytest.mark.parametrize("mask_dtype", [jnp.bool_, jnp.float32])
def test_roberta_accepts_bool_and_float_masks(mask_dtype):
    hf_config = tiny_hf_config("roberta")
    model, params = to_flax(tiny_hf_model(hf_config))
    batch = padded_batch(hf_config)
    ids, types = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"])
    mask = jnp.asarray(batch["attention_mask"])
    out = model.apply({"params": params}, ids, mask.astype(mask_dtype), types)
    np.testing.assert_allclose(np.asarray(out), flax_logits(model, params, batch), rtol=0, atol=1e-6)


def test_from_hf_config_fields():
    hf = tiny_hf_config("bert").to_dict()
    assert hf.get("dtype") is None  # transformers' to_dict() carries the storage dtype
    config = BertConfig.from_hf(hf, num_labels=3)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (99, 32, 2)
    assert (config.num_attention_heads, config.head_dim, config.intermediate_size) == (4, 8, 37)
    assert config.num_labels == 3 and config.dtype == "float32"
    assert BertConfig.from_hf({**hf, "dtype": "bfloat16"}).dtype == "float32"
    assert BertConfig.from_hf(hf, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="absolute"):
        BertConfig.from_hf({**hf, "position_embedding_type": "relative_key"})


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_regression_head_parity(family):
    hf_config = tiny_hf_config(family, num_labels=1)
    hf_model = tiny_hf_model(hf_config, seed=1)
    batch = padded_batch(hf_config, seed=1)
    model, params = to_flax(hf_model)
    logits = flax_logits(model, params, batch)
    assert logits.shape == (len(LENGTHS), 1)
    assert_close(logits, torch_logits(hf_model, batch), f"{family} regression")


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_state_dict_round_trip(family):
    hf_config = tiny_hf_config(family)
    hf_model = tiny_hf_model(hf_config, seed=2)
    batch = padded_batch(hf_config, seed=2)
    expected = torch_logits(hf_model, batch)
    model, params = to_flax(hf_model)

    state = state_dict_from_params(params, model.config)
    fresh = tiny_hf_model(hf_config, seed=3)  # different weights until loaded
    assert np.abs(torch_logits(fresh, batch) - expected).max() > 1e-3
    buffers = {name for name, _ in fresh.named_buffers()}
    torch_keys = set(fresh.state_dict())
    assert set(state) <= torch_keys, f"keys torch does not know: {sorted(set(state) - torch_keys)}"
    result = fresh.load_state_dict({k: torch.tensor(np.array(v)) for k, v in state.items()}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    non_buffers = [k for k in result.missing_keys if k not in buffers]
    assert not non_buffers, f"state_dict_from_params lacks parameters: {non_buffers}"
    for key, value in state.items():
        np.testing.assert_array_equal(value, hf_model.state_dict()[key].numpy(), err_msg=key)
    assert_close(torch_logits(fresh, batch), expected, f"{family} round trip", tol=1e-6)


# ----------------------------------------------------------------------------------------------
# 2. The real all-MiniLM-L6-v2 checkpoint

SENTENCES = [
    ("A man is playing a guitar on the stage.", "Someone performs music."),
    ("The cat sleeps.", "It is night."),
    ("JAX compiles numerical programs with XLA for accelerators.", "Flax builds neural networks on it."),
]


@pytest.fixture(scope="module")
def minilm_torch(minilm_dir):
    torch.manual_seed(0)
    # "eager": the reference attention; sdpa agrees to ~1e-6 on CPU as well.
    hf_model = transformers.BertForSequenceClassification.from_pretrained(
        str(minilm_dir), num_labels=2, attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # the random head (std 0.02) gives ~0.01 logits; make them O(1)
        hf_model.classifier.weight.normal_(0.0, 1.0)
        hf_model.classifier.bias.normal_(0.0, 1.0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    firsts, seconds = zip(*SENTENCES)
    enc = tokenizer(list(firsts), list(seconds), padding=True, return_tensors="np")
    batch = {k: np.asarray(enc[k], np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    return hf_model, batch


@pytest.mark.real
def test_minilm_logits_and_hidden_parity(minilm_torch):
    hf_model, batch = minilm_torch
    mask = batch["attention_mask"].astype(bool)
    assert (~mask).any() and set(np.unique(batch["token_type_ids"])) == {0, 1}
    with torch.no_grad():
        out = hf_model(**{k: torch.from_numpy(v) for k, v in batch.items()}, output_hidden_states=True)
    model, params = to_flax(hf_model)
    assert_same_layout(model, params)
    assert np.abs(out.logits.numpy()).max() > 0.5
    assert_close(flax_logits(model, params, batch), out.logits.numpy(), "minilm logits")

    hidden, flax_mask = model.apply(
        {"params": params},
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["token_type_ids"]),
        method=BertModel.encode,
    )
    np.testing.assert_array_equal(np.asarray(flax_mask), batch["attention_mask"])
    expected = out.hidden_states[-1].numpy()
    assert_close(np.asarray(hidden)[mask], expected[mask], "minilm last hidden (real tokens)")


@pytest.mark.real
def test_from_pretrained_default_loads_minilm(minilm_torch):
    hf_model, _ = minilm_torch
    model, params = from_pretrained()  # the packaged sentence-transformers/all-MiniLM-L6-v2
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_labels) == ("bert", 6, 384, 2)
    flat = flatten(params)
    assert all(v.dtype == jnp.float32 for v in flat.values())
    state = hf_model.state_dict()
    pairs = {
        "embeddings/word_embeddings/embedding": ("bert.embeddings.word_embeddings.weight", False),
        "embeddings/LayerNorm/scale": ("bert.embeddings.LayerNorm.weight", False),
        "encoder/layer_0/attention/self/query/kernel": ("bert.encoder.layer.0.attention.self.query.weight", True),
        "encoder/layer_3/intermediate/dense/bias": ("bert.encoder.layer.3.intermediate.dense.bias", False),
        "encoder/layer_5/output/dense/kernel": ("bert.encoder.layer.5.output.dense.weight", True),
        "encoder/layer_5/output/LayerNorm/bias": ("bert.encoder.layer.5.output.LayerNorm.bias", False),
        "pooler/dense/kernel": ("bert.pooler.dense.weight", True),
    }
    for path, (key, transpose) in pairs.items():
        ref = state[key].numpy()
        np.testing.assert_array_equal(np.asarray(flat[path]), ref.T if transpose else ref, err_msg=path)
    # every non-head leaf comes from the checkpoint; the head is freshly initialised
    converted = params_from_state_dict({k: v.numpy() for k, v in state.items()})
    for path, value in flat.items():
        if not path.startswith("head/"):
            np.testing.assert_array_equal(np.asarray(value), converted[path], err_msg=path)
    np.testing.assert_array_equal(np.asarray(flat["head/classifier/bias"]), 0.0)
    # the head kernel is what the whole model's random init gives it (up to XLA's rounding)
    np.testing.assert_allclose(np.asarray(flat["head/classifier/kernel"]),
                               flatten(init_params(model, jax.random.key(0)))["head/classifier/kernel"],
                               rtol=0, atol=1e-7)
    assert float(np.std(np.asarray(flat["head/classifier/kernel"]))) == pytest.approx(0.02, rel=0.2)


# ----------------------------------------------------------------------------------------------
# 3. Bad inputs


def _write_config(folder, **fields):
    cfg = tiny_hf_config("bert").to_dict()
    cfg.update(fields)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_pickle_weights_refused_without_unpickling(tmp_path, monkeypatch):
    _write_config(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle at all")

    def forbidden(*args, **kwargs):
        raise AssertionError("from_pretrained tried to unpickle pytorch_model.bin")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    # hub.read_safetensors says "... never unpickles ... save_pretrained(dir, safe_serialization=True)"
    with pytest.raises(ValueError, match="pickle") as info:
        from_pretrained(tmp_path)
    assert re.search(r"safetensors|safe_serialization", str(info.value)), str(info.value)


def test_folder_without_weights(tmp_path):
    _write_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_pretrained(tmp_path)


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)


def test_unknown_model_name_fails_fast_with_hint(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # never touch the network: the constant is read at import time, so patch it as well
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.chdir(tmp_path)
    name = "no-such-org/no-such-model-jpeft-test"
    with pytest.raises(FileNotFoundError, match="--model") as info:
        from_pretrained(name)
    assert name in str(info.value)


def test_checkpoint_missing_an_encoder_weight_is_refused(tmp_path):
    """Only the head and the pooler may be absent; any other missing leaf names itself."""
    from safetensors.numpy import save_file

    hf_model = tiny_hf_model(tiny_hf_config("bert"))
    state = {k: v.numpy() for k, v in hf_model.state_dict().items()
             if k != "bert.encoder.layer.1.output.dense.weight"}
    _write_config(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="lacks encoder/layer_1/output/dense/kernel"):
        from_pretrained(tmp_path)


def test_non_bert_model_type_refused(tmp_path):
    with pytest.raises(ValueError, match="gpt2"):
        BertConfig.from_hf({"model_type": "gpt2"})
    _write_config(tmp_path, model_type="gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# 4. Taps are identities


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_taps_are_identity_and_called_once_each(family):
    hf_config = tiny_hf_config(family)
    config = BertConfig.from_hf(hf_config.to_dict(), num_labels=3)
    model = BertModel(config)
    params = init_params(model, jax.random.key(0))
    batch = padded_batch(hf_config)
    plain = flax_logits(model, params, batch)

    calls: collections.Counter = collections.Counter()

    def bypass_taps(next_fun, args, kwargs, context):
        if isinstance(context.module, taps.Tap) and context.method_name == "__call__":
            calls[(context.module.kind, context.module.layer)] += 1
            assert not kwargs
            return args[0] if len(args) == 1 else tuple(args)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(bypass_taps):
        intercepted = flax_logits(model, params, batch)
    np.testing.assert_array_equal(intercepted, plain)

    expected = {(taps.EMBED_INPUTS, None): 1, (taps.EMBED_POSITIONS, None): 1}
    for layer in range(config.num_hidden_layers):
        for kind in (taps.ATTN_KV, taps.ATTN_OUT, taps.FFN_HIDDEN, taps.FFN_OUT):
            expected[(kind, layer)] = 1
    assert dict(calls) == expected
    assert {kind for kind, _ in calls} == set(taps.KINDS)


def test_an_unknown_head_is_refused_up_front():
    from jpeft.models.bert import BertConfig

    with pytest.raises(ValueError, match=r"head='nonsense'.*'classification', 'none'"):
        BertConfig(head="nonsense")


@pytest.mark.parametrize("rate", [0.0, 0.1])
def test_attention_in_blocks_equals_the_whole_batch_with_gradients(rate):
    """Blocks of rows (the CPU default) give the numbers of one block: the same dropout mask, the
    same per-row matmuls; gradients too."""
    b, h, t, d = 5, 3, 8, 4
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(x, (b, h, t, d)) for x in keys[:3])
    bias = jnp.where(jnp.arange(t)[None, :] < jnp.array([8, 5, 8, 2, 7])[:, None], 0.0, jnp.finfo(jnp.float32).min)
    key = keys[3] if rate else None

    def loss(rows):
        return lambda q, k, v: jnp.sum(jnp.sin(attention_in_blocks(q, k, v, bias, key, rate, None, rows=rows)))

    whole = jax.jit(jax.value_and_grad(loss(b), argnums=(0, 1, 2)))(q, k, v)
    for rows in (1, 2, 4):  # 2: blocks of 2, 2, 1 rows
        blocks = jax.jit(jax.value_and_grad(loss(rows), argnums=(0, 1, 2)))(q, k, v)
        for a, w in zip(jax.tree_util.tree_leaves(blocks), jax.tree_util.tree_leaves(whole)):
            np.testing.assert_allclose(a, w, rtol=1e-6, atol=1e-6, err_msg=f"rows={rows}")
    if rate:  # dropout really applied: a different key changes the output
        other = attention_in_blocks(q, k, v, bias, jax.random.key(9), rate, None, rows=2)
        assert not np.allclose(other, attention_in_blocks(q, k, v, bias, key, rate, None, rows=2))
