"""The PEFT converter registry: hf_peft reads and writes whatever a method registered beside
itself, and holds no method-specific code (no torch needed: the folders are written by jpeft)."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jpeft.checkpoint import peft_convert as PC
from jpeft.checkpoint.hf_peft import load_peft_adapter, read_adapter, save_peft_adapter
from jpeft.core import paths as P
from jpeft.core.registry import REGISTRY, register
from jpeft.methods import BitFitConfig, bitfit
from jpeft.methods.adapters import AdapterConfig, houlsby
from tests.helpers import tiny_bert

TOY = "JPEFT_TEST_BIASES"


def _toy_load(cfg, tensors, ctx):
    """The trained biases stay in ``tensors``: hf_peft puts them into the base (as it does for
    LoRA's bias='all'); the delta starts at zero."""
    assert ctx.mods is not None and ctx.label
    transform = bitfit(BitFitConfig(include_layernorm=False))
    return transform, transform.init(jax.random.key(0), ctx.params, ctx.model.info())


def _toy_save(transform, delta, ctx):
    """BitFit's delta written as trained biases ``b₀ + δ``, PEFT's layout for trained biases."""
    merged = P.flatten(transform.merge(ctx.params, delta))
    tensors = {f"{PC.MODULE_KEY}{ctx.mods.name(p.rpartition('/')[0])}.bias": PC.to_numpy(merged[p])
               for p in P.flatten(delta)}
    return {"peft_type": TOY}, tensors, ctx.params


@pytest.fixture
def toy_method():
    """A method registered with a converter for a peft_type jpeft does not ship."""

    class ToyBiasConfig(BitFitConfig):
        pass

    register("toy_biases", ToyBiasConfig, lambda config=ToyBiasConfig(): bitfit(config),
             peft=PC.PeftConverter(peft_type=TOY, layout="modules", load=_toy_load, save=_toy_save))
    try:
        yield ToyBiasConfig
    finally:
        REGISTRY.pop("toy_biases")


def test_a_registered_converter_is_used_both_ways(tmp_path, toy_method):
    model, params = tiny_bert()
    transform = bitfit(toy_method(include_layernorm=False))
    delta = jax.tree_util.tree_map(lambda x: x + 0.25, transform.init(jax.random.key(0), params, model.info()))
    save_peft_adapter(tmp_path / "toy", transform, delta, params, base_model_name_or_path=None, model=model)
    cfg, tensors = read_adapter(tmp_path / "toy")
    assert cfg["peft_type"] == TOY and cfg["modules_to_save"] == ["classifier"]
    assert any(k.endswith("attention.self.query.bias") for k in tensors)
    loaded_t, loaded_delta, loaded_params = load_peft_adapter(tmp_path / "toy", model, params)
    assert loaded_t.name == "bitfit"
    assert all(not np.any(x) for x in jax.tree_util.tree_leaves(loaded_delta))
    want = P.flatten(transform.merge(params, delta))  # trained biases and the head; the rest is the base
    assert any(not np.array_equal(want[p], v) for p, v in P.flatten(params).items())
    for path, value in want.items():
        np.testing.assert_array_equal(P.flatten(loaded_params)[path], value, err_msg=path)


def test_unregistered_types_and_methods_are_refused_with_the_registered_ones(tmp_path, toy_method):
    model, params = tiny_bert()
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "FOURIERFT", "task_type": "SEQ_CLS"}))
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(1, np.float32)}, str(folder / PC.ADAPTER_WEIGHTS))
    with pytest.raises(ValueError, match=f"LORA.*{TOY}|{TOY}.*LORA"):
        load_peft_adapter(folder, model, params)
    adapters = houlsby(AdapterConfig())
    delta = adapters.init(jax.random.key(0), params, model.info())
    with pytest.raises(ValueError, match="no Hugging Face PEFT equivalent.*lora.*toy_biases"):
        save_peft_adapter(tmp_path / "h", adapters, delta, params, base_model_name_or_path=None, model=model)


def test_every_shipped_peft_type_has_exactly_one_reader():
    readers = [m.peft.peft_type for m in REGISTRY.values() if m.peft is not None and m.peft.load]
    assert sorted(readers) == ["HRA", "IA3", "LN_TUNING", "LOHA", "LOKR", "LORA", "OFT", "PREFIX_TUNING",
                               "PROMPT_TUNING", "P_TUNING", "TRAINABLE_TOKENS", "VERA"]
    writers = sorted(m.name for m in REGISTRY.values() if m.peft is not None)
    assert writers == ["hra", "ia3", "ln_tuning", "loha", "lokr", "lora", "oft", "prefix", "prompt", "ptuning",
                       "ptuning2", "trainable_tokens", "vera"]
