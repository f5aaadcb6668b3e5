"""Merged Hugging Face exports (loaded by transformers) and jpeft adapter files (round trip)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.checkpoint import CheckpointError
from jpeft.checkpoint.export import (
    base_fingerprint,
    export_merged_hf,
    load_adapter,
    read_adapter_meta,
    save_adapter,
)
from jpeft.core import paths as P
from jpeft.core.transform import NotMergeableError, apply
from jpeft.methods import (
    BitFitConfig,
    IA3Config,
    LoraConfig,
    PrefixConfig,
    PromptConfig,
    build,
    prefix,
)
from tests.helpers import perturb, tiny_bert

TOL = 1e-4


def _batch(model_type="bert", seed=0, b=3, t=7):
    rng = np.random.default_rng(seed)
    pad = 0 if model_type == "bert" else 1
    ids = rng.integers(3, 64, (b, t))
    lengths = np.maximum(t - 2 * np.arange(b), 2)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return np.where(mask > 0, ids, pad).astype(np.int32), mask, np.zeros_like(mask)


def _logits(model, transform, params, delta, data):
    return np.asarray(apply(model, transform, params, delta, *(jnp.asarray(x) for x in data)))


def _trained(model, params, transform, seed=5):
    """params with a perturbed head and perturbed trainable base leaves (as after training)."""
    flat = P.flatten(params)
    chosen = [p for p in flat if p.startswith("head/")] + transform.trainable_base(params)
    noisy = perturb({p: flat[p] for p in chosen}, seed=seed, scale=0.3)  # a flat dict is a pytree
    return P.unflatten({**flat, **noisy})


def _setup(spec, configs, model_type="bert", num_labels=2, seed=0):
    model, base = tiny_bert(num_labels=num_labels, model_type=model_type, seed=seed)
    t = build(spec, configs)
    delta = perturb(t.init(jax.random.key(0), base, model.info()), seed=2, scale=0.3)
    return model, base, t, delta, _trained(model, base, t)


# ----------------------------------------------------------------------------------------------
# merged export

@pytest.mark.parametrize("model_type,num_labels,spec", [
    ("bert", 2, "lora+bitfit"),
    ("bert", 1, "ia3"),
    ("roberta", 3, "lora"),
])
def test_merged_export_loads_in_transformers(tmp_path, model_type, num_labels, spec):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    configs = {"lora": LoraConfig(r=4, alpha=8, targets=r"(query|value|output/dense)$", bias="lora_only"),
               "ia3": IA3Config(), "bitfit": BitFitConfig()}
    model, base, t, delta, params = _setup(spec, configs, model_type, num_labels)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(64)) + "\n")
    out = export_merged_hf(tmp_path / "merged", model, t, params, delta, tokenizer_dir=tok)
    assert (out / "vocab.txt").read_text() == (tok / "vocab.txt").read_text()
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    assert hf.config.num_labels == num_labels and hf.config.model_type == model_type
    data = _batch(model_type)
    with torch.no_grad():
        theirs = hf(**{k: torch.tensor(v).long() for k, v in
                       zip(("input_ids", "attention_mask", "token_type_ids"), data)}).logits.numpy()
    ours = _logits(model, t, params, delta, data)
    diff = float(np.abs(ours - theirs).max())
    print(f"\nmerged/{model_type}/{spec}: max |Δlogit| = {diff:.3g}")
    assert diff <= TOL
    base_out = np.asarray(model.apply({"params": base}, *(jnp.asarray(x) for x in data)))
    assert float(np.abs(ours - base_out).max()) > 1e-2  # the adapter mattered
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [f"{'Bert' if model_type == 'bert' else 'Roberta'}ForSequenceClassification"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left


def test_merged_export_refuses_activation_methods_and_existing_folders(tmp_path):
    model, _, t, delta, params = _setup("prompt", {"prompt": PromptConfig(num_virtual_tokens=2)})
    with pytest.raises(NotMergeableError):
        export_merged_hf(tmp_path / "m", model, t, params, delta)
    assert not (tmp_path / "m").exists()
    model, _base, t, delta, params = _setup("lora", {})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export_merged_hf(tmp_path / "busy", model, t, params, delta)
    export_merged_hf(tmp_path / "busy", model, t, params, delta, overwrite=True)
    assert not (tmp_path / "busy" / "keep.txt").exists() and (tmp_path / "busy" / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------
# jpeft adapter files

@pytest.mark.parametrize("spec,configs", [
    ("lora+bitfit", {"lora": LoraConfig(r=2, targets=r"(key|value)$", rank_pattern={"key": 3},
                                        bias="all")}),
    ("prefix", {"prefix": PrefixConfig(num_virtual_tokens=2, projection=True, projection_hidden=4)}),
    ("prompt", {"prompt": PromptConfig(num_virtual_tokens=2, init="text", init_token_ids=(5, 6))}),
], ids=["lora+bitfit", "prefix", "prompt"])
def test_adapter_round_trip_is_identity(tmp_path, spec, configs):
    model, base, t, delta, params = _setup(spec, configs)
    fp = base_fingerprint(model, base)
    out = save_adapter(tmp_path / "a", t, delta, params, base_model="tiny-random", base_fingerprint=fp,
                       method_spec=spec, method_configs=configs, model=model)
    meta = read_adapter_meta(out)
    assert meta["method_spec"] == spec and meta["base_fingerprint"] == fp
    assert not any(p.suffix in (".pkl", ".bin", ".pickle") for p in out.iterdir())
    t2, d2, p2 = load_adapter(out, model, base)
    assert t2.name == t.name and t2.config == t.config
    assert jax.tree_util.tree_structure(d2) == jax.tree_util.tree_structure(delta)
    for a, b in zip(jax.tree_util.tree_leaves(delta), jax.tree_util.tree_leaves(d2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for path, leaf in P.flatten(params).items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(P.flatten(p2)[path]), err_msg=path)
    data = _batch()
    np.testing.assert_array_equal(_logits(model, t, params, delta, data), _logits(model, t2, p2, d2, data))
    # only the delta and the trained leaves are stored
    stored = set(meta["params"])
    assert stored == {p for p in P.paths(params) if p.startswith("head/")} | set(t.trainable_base(params))


def test_finalized_prefix_adapter_is_smaller_and_equal(tmp_path):
    configs = {"prefix": PrefixConfig(num_virtual_tokens=2, projection=True, projection_hidden=64)}
    model, base, t, delta, params = _setup("prefix", configs)
    fp = base_fingerprint(model, base)
    kw = {"base_model": "tiny", "base_fingerprint": fp, "method_spec": "prefix", "method_configs": configs, "model": model}
    full = save_adapter(tmp_path / "full", t, delta, params, **kw)
    small = save_adapter(tmp_path / "small", t, delta, params, finalize=True, **kw)
    size = lambda d: (d / "adapter.safetensors").stat().st_size
    assert size(small) < size(full)
    t2, d2, p2 = load_adapter(small, model, base)
    assert list(d2) == ["prefix"]
    np.testing.assert_allclose(_logits(model, t2, p2, d2, _batch()), _logits(model, t, params, delta, _batch()),
                               atol=1e-5)


def test_other_base_is_refused_with_both_fingerprints(tmp_path):
    model, base, t, delta, params = _setup("lora", {})
    fp = base_fingerprint(model, base)
    out = save_adapter(tmp_path / "a", t, delta, params, base_model="tiny-a", base_fingerprint=fp,
                       method_spec="lora", method_configs={})
    # the head is excluded from the fingerprint: a trained head is the same base
    assert base_fingerprint(model, params) == fp
    _, other = tiny_bert(seed=7)
    fp_other = base_fingerprint(model, other)
    assert fp_other != fp
    with pytest.raises(CheckpointError) as err:
        load_adapter(out, model, other)
    assert fp in str(err.value) and fp_other in str(err.value) and "tiny-a" in str(err.value)
    _t2, d2, _p2 = load_adapter(out, model, other, allow_base_mismatch=True)
    assert P.paths(d2) == P.paths(delta)


def test_save_adapter_checks_spec_and_configs(tmp_path):
    model, base, t, delta, params = _setup("lora", {"lora": LoraConfig(r=2)})
    fp = base_fingerprint(model, base)
    with pytest.raises(ValueError, match="differs"):
        save_adapter(tmp_path / "a", t, delta, params, base_model="x", base_fingerprint=fp,
                     method_spec="lora", method_configs={"lora": LoraConfig(r=3)})
    with pytest.raises(ValueError, match="names"):
        save_adapter(tmp_path / "b", t, delta, params, base_model="x", base_fingerprint=fp,
                     method_spec="lora+bitfit", method_configs={})
    assert not any(tmp_path.iterdir())


def test_prefix_position_convention_survives_save_load(tmp_path):
    """A prefix with PEFT's position numbering (peft_positions) keeps it through save/load_adapter."""
    configs = {"prefix": PrefixConfig(num_virtual_tokens=2, projection=False, peft_positions=True)}
    model, base, shifted, delta, params = _setup("prefix", configs)
    plain = prefix(PrefixConfig(num_virtual_tokens=2, projection=False))
    data = _batch()
    assert np.abs(_logits(model, shifted, params, delta, data) - _logits(model, plain, params, delta, data)).max() > 1e-4
    out = save_adapter(tmp_path / "a", shifted, delta, params, base_model="x",
                       base_fingerprint=base_fingerprint(model, base), method_spec="prefix",
                       method_configs=configs, model=model)
    t2, d2, p2 = load_adapter(out, model, base)
    assert t2.config.peft_positions
    np.testing.assert_array_equal(_logits(model, t2, p2, d2, data), _logits(model, shifted, params, delta, data))
