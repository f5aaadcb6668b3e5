"""load_adapter and load_peft_adapter refuse what does not fit: shapes, dtypes, ranks, missing and
unexpected tensors, non-finite values, and malformed JSON (naming the file and the field)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jpeft.checkpoint import CheckpointError
from jpeft.checkpoint.export import ADAPTER_JSON, ADAPTER_TENSORS, base_fingerprint, load_adapter, save_adapter
from jpeft.checkpoint.hf_peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_peft_adapter, save_peft_adapter
from jpeft.methods import LoraConfig, build
from tests.helpers import perturb, tiny_bert


@pytest.fixture(scope="module")
def setup():
    model, base = tiny_bert()
    transform = build("lora", {"lora": LoraConfig(r=8)})
    delta = perturb(transform.init(jax.random.key(0), base, model.info()), seed=2, scale=0.3)
    return model, base, transform, delta


def _save(tmp_path, setup, name="adapter"):
    model, base, transform, delta = setup
    folder = tmp_path / name
    save_adapter(folder, transform, delta, base, base_model="tiny", model=model,
                 base_fingerprint=base_fingerprint(model, base), method_spec="lora")
    return folder


def _edit_tensors(folder, edit):
    tensors = dict(load_file(str(folder / ADAPTER_TENSORS)))
    edit(tensors)
    save_file(tensors, str(folder / ADAPTER_TENSORS))


def _edit_json(folder, edit):
    meta = json.loads((folder / ADAPTER_JSON).read_text())
    meta = edit(meta) or meta
    (folder / ADAPTER_JSON).write_text(json.dumps(meta))


def _load(folder, setup):
    model, base, _, _ = setup
    return load_adapter(folder, model, base)


def _lora_b(tensors):
    return sorted(k for k in tensors if k.endswith("lora_B"))[0]


def test_a_good_adapter_loads(tmp_path, setup):
    transform, delta, _ = _load(_save(tmp_path, setup), setup)
    assert transform.config.r == 8
    saved = setup[3]  # the delta comes back as it was saved, not merely something that fits
    assert jax.tree_util.tree_structure(delta) == jax.tree_util.tree_structure(saved)
    for got, want in zip(jax.tree_util.tree_leaves(delta), jax.tree_util.tree_leaves(saved)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("case, needles", [
    ("broadcastable_b", ["lora_B", "(8, 1)", "expects"]),
    ("nan", ["non-finite"]),
    ("rank_in_config", ["'r': 4", "expects", "rank"]),
    ("missing_layer", ["missing tensors"]),
    ("unexpected_tensor", ["unexpected tensors", "delta/extra"]),
    ("bf16", ["bfloat16", "float32"]),
    ("lacking_head", ["lacks trained leaves", "head/"]),
])
def test_load_adapter_refuses_what_does_not_fit(tmp_path, setup, case, needles):
    folder = _save(tmp_path, setup)
    if case == "broadcastable_b":
        _edit_tensors(folder, lambda t: t.__setitem__(_lora_b(t), np.ones((8, 1), np.float32)))
    elif case == "nan":
        _edit_tensors(folder, lambda t: t.__setitem__(_lora_b(t), np.full_like(t[_lora_b(t)], np.nan)))
    elif case == "rank_in_config":
        _edit_json(folder, lambda m: m["method_configs"]["lora"].__setitem__("r", 4))
    elif case == "missing_layer":
        def drop(meta):
            layer = meta["delta"]["encoder"]
            first = sorted(layer)[0]
            names = list(json.dumps(layer[first]).split('"'))
            del layer[first]
            _edit_tensors(folder, lambda t: [t.pop(n) for n in names if n in t])
        _edit_json(folder, drop)
    elif case == "unexpected_tensor":
        _edit_json(folder, lambda m: m["delta"].__setitem__("extra", "delta/extra"))
        _edit_tensors(folder, lambda t: t.__setitem__("delta/extra", np.zeros(3, np.float32)))
    elif case == "bf16":
        import ml_dtypes

        _edit_tensors(folder, lambda t: t.__setitem__(_lora_b(t), t[_lora_b(t)].astype(ml_dtypes.bfloat16)))
    elif case == "lacking_head":
        def drop_head(meta):
            head = [p for p in meta["params"] if p.startswith("head/")]
            meta["params"] = [p for p in meta["params"] if p not in head]
            _edit_tensors(folder, lambda t: [t.pop(f"params/{p}") for p in head])
        _edit_json(folder, drop_head)
    with pytest.raises(CheckpointError) as err:
        _load(folder, setup)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


@pytest.mark.parametrize("text, needles", [
    ("[1, 2]", ["JSON list", ADAPTER_JSON]),
    ('"lora"', ["JSON str", ADAPTER_JSON]),
    ('{"format": ', ["not valid JSON", "line 1", ADAPTER_JSON]),
])
def test_malformed_adapter_json_names_the_file(tmp_path, setup, text, needles):
    folder = _save(tmp_path, setup)
    (folder / ADAPTER_JSON).write_text(text)
    with pytest.raises(CheckpointError) as err:
        _load(folder, setup)
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("edit, needles", [
    (lambda m: m["method_configs"]["lora"].__setitem__("r", "eight"), ["method_configs.lora", "eight"]),
    (lambda m: m.__setitem__("method_spec", 7), ["method_spec"]),
    (lambda m: m.__setitem__("params", "head"), ["params"]),
    (lambda m: m.__setitem__("delta", [1]), ["delta"]),
    (lambda m: m.__setitem__("method_configs", []), ["method_configs"]),
])
def test_wrongly_typed_fields_name_the_file_and_field(tmp_path, setup, edit, needles):
    folder = _save(tmp_path, setup)
    _edit_json(folder, edit)
    with pytest.raises(CheckpointError) as err:
        _load(folder, setup)
    assert ADAPTER_JSON in str(err.value)
    for needle in needles:
        assert needle in str(err.value)


def test_a_truncated_tensor_file_names_it(tmp_path, setup):
    folder = _save(tmp_path, setup)
    raw = (folder / ADAPTER_TENSORS).read_bytes()
    (folder / ADAPTER_TENSORS).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=ADAPTER_TENSORS):
        _load(folder, setup)


def test_a_non_finite_adapter_is_not_written(tmp_path, setup):
    model, base, transform, delta = setup
    bad = jax.tree_util.tree_map(lambda x: x * np.nan, delta)
    with pytest.raises(CheckpointError, match="non-finite"):
        save_adapter(tmp_path / "a", transform, bad, base, base_model="tiny", model=model,
                     base_fingerprint=base_fingerprint(model, base), method_spec="lora")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("which", ["other_rank", "other_model"])
def test_a_delta_that_does_not_fit_is_not_written(tmp_path, setup, which):
    """save_adapter and save_peft_adapter used to write a delta of another rank or model, which
    load_adapter then refuses (or PEFT misreads); they now refuse it and write nothing."""
    model, base, transform, _ = setup
    if which == "other_rank":
        bad = build("lora", {"lora": LoraConfig(r=4)}).init(jax.random.key(0), base, model.info())
    else:
        big, big_base = tiny_bert(hidden=32)
        bad = transform.init(jax.random.key(0), big_base, big.info())
    with pytest.raises(CheckpointError, match="does not fit its method on this base"):
        save_adapter(tmp_path / "a", transform, bad, base, base_model="tiny", model=model,
                     base_fingerprint=base_fingerprint(model, base), method_spec="lora")
    with pytest.raises(CheckpointError, match="does not fit its method on this base"):
        save_peft_adapter(tmp_path / "p", transform, bad, base, base_model_name_or_path="tiny", model=model)
    assert not (tmp_path / "a").exists() and not (tmp_path / "p").exists()


def test_a_non_finite_peft_adapter_is_not_written(tmp_path, setup):
    model, base, transform, delta = setup
    bad = jax.tree_util.tree_map(lambda x: x * np.nan, delta)
    with pytest.raises(CheckpointError, match="non-finite"):
        save_peft_adapter(tmp_path / "p", transform, bad, base, base_model_name_or_path="tiny", model=model)
    assert not (tmp_path / "p").exists()


def test_adapter_folders_get_normal_permissions(tmp_path, setup):
    import os

    mask = os.umask(0)
    os.umask(mask)
    folder = _save(tmp_path, setup)
    assert folder.stat().st_mode & 0o777 == 0o777 & ~mask


# -- PEFT folders ---------------------------------------------------------------------------------

@pytest.fixture()
def peft_folder(tmp_path, setup):
    model, base, transform, delta = setup
    folder = tmp_path / "peft"
    save_peft_adapter(folder, transform, delta, base, base_model_name_or_path="tiny", model=model)
    return folder


@pytest.mark.parametrize("text, needles", [
    ("[1]", ["JSON list", ADAPTER_CONFIG]),
    ("{", ["not valid JSON", ADAPTER_CONFIG]),
])
def test_malformed_peft_config_names_the_file(peft_folder, setup, text, needles):
    (peft_folder / ADAPTER_CONFIG).write_text(text)
    with pytest.raises(ValueError) as err:
        load_peft_adapter(peft_folder, setup[0], setup[1])
    for needle in needles:
        assert needle in str(err.value)


@pytest.mark.parametrize("field, value, needle", [
    ("r", "eight", "'r'"), ("r", 0, "'r'"), ("lora_alpha", "x", "'lora_alpha'"),
    ("lora_dropout", 2.0, "'lora_dropout'"), ("target_modules", 5, "'target_modules'"),
])
def test_wrongly_typed_peft_fields_name_file_and_field(peft_folder, setup, field, value, needle):
    cfg = json.loads((peft_folder / ADAPTER_CONFIG).read_text())
    cfg[field] = value
    (peft_folder / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        load_peft_adapter(peft_folder, setup[0], setup[1])
    assert ADAPTER_CONFIG in str(err.value) and needle in str(err.value)


def test_peft_nan_and_truncated_tensors_are_refused(peft_folder, setup):
    tensors = dict(load_file(str(peft_folder / ADAPTER_WEIGHTS)))
    key = sorted(tensors)[0]
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, str(peft_folder / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match="non-finite"):
        load_peft_adapter(peft_folder, setup[0], setup[1])
    raw = (peft_folder / ADAPTER_WEIGHTS).read_bytes()
    (peft_folder / ADAPTER_WEIGHTS).write_bytes(raw[:100])
    with pytest.raises(ValueError, match=ADAPTER_WEIGHTS):
        load_peft_adapter(peft_folder, setup[0], setup[1])
