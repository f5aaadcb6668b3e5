"""Activation-space methods on models jpeft did not write, through taps the model calls (one
line each): the same outputs in Linen and NNX, a fresh adapter is the identity, and a model
without the tap a method needs gets an error that says what to add."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft.core import paths as P
from jpeft.methods import (AdapterConfig, PrefixConfig, PromptConfig, PTuningConfig, PTuningV2Config,
                           houlsby, pfeiffer, prefix, prompt, ptuning, ptuning2)
from tests import own_models as M
from tests.helpers import perturb

KEY = jax.random.key(0)
IDS = jax.random.randint(jax.random.key(1), (2, 6), 1, M.V)
MASK = jnp.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], jnp.int32)


def methods() -> dict[str, jpeft.Transform]:
    return {
        "houlsby": houlsby(AdapterConfig(size=4)),
        "pfeiffer": pfeiffer(AdapterConfig(size=4)),
        "prefix": prefix(PrefixConfig(num_virtual_tokens=3, projection_hidden=8)),
        "ptuning2": ptuning2(PTuningV2Config(num_virtual_tokens=3)),
        "prompt": prompt(PromptConfig(num_virtual_tokens=2, init="random")),
        "ptuning": ptuning(PTuningConfig(num_virtual_tokens=2, encoder_hidden=8)),
    }


@pytest.fixture(scope="module")
def twins():
    module = M.LinenTapped()
    params = module.init(KEY, IDS, MASK)["params"]
    linen = jpeft.from_linen(module, params, IDS, MASK)
    nnx_model, nnx_params = jpeft.from_nnx(M.NnxTapped(nnx.Rngs(0)), IDS, MASK)
    assert P.flatten(nnx_params).keys() == P.flatten(params).keys()
    return linen, nnx_model, params


def test_sizes_are_read_off_the_taps(twins):
    linen, nnx_model, _ = twins
    for info in (linen.info(), nnx_model.info()):
        assert (info.num_layers, info.hidden_size, info.num_kv_heads, info.head_dim) == (2, M.D, M.H, M.DH)
        assert info.taps == {"embed.inputs": 1, "attn.kv": 2, "attn.out": 2, "ffn.hidden": 2,
                             "ffn.out": 2}


@pytest.mark.parametrize("name", list(methods()))
def test_every_activation_method_same_on_linen_and_nnx(twins, name):
    linen, nnx_model, params = twins
    method = methods()[name]
    fresh = method.init(KEY, params, linen.info())
    base_out = linen.module.apply({"params": params}, IDS, MASK)
    fresh_out = jpeft.apply(linen, method, params, fresh, IDS, MASK)
    if not method.adds_tokens and name not in ("prefix", "ptuning2"):
        np.testing.assert_allclose(fresh_out, base_out, rtol=1e-5, atol=1e-5)
    delta = perturb(fresh, scale=0.3)
    out_linen = jpeft.apply(linen, method, params, delta, IDS, MASK)
    out_nnx = jax.jit(lambda p, d: jpeft.apply(nnx_model, method, p, d, IDS, MASK))(params, delta)
    assert float(jnp.abs(out_linen - base_out).max()) > 1e-4
    np.testing.assert_allclose(out_linen, out_nnx, rtol=1e-5, atol=1e-5)


def test_a_model_without_the_tap_gets_the_lines_to_add():
    x = jnp.ones((3, 8))
    module = M.LinenMLP()
    params = module.init(KEY, x)["params"]
    model = jpeft.from_linen(module, params, x)
    with pytest.raises(ValueError, match=r"(?s)'attn.out', 'ffn.out'.*Tap\('ffn.out', layer=i\)\(h\)"):
        houlsby().init(KEY, params, model.info())
    with pytest.raises(ValueError, match=r"(?s)attn.kv.*Tap\('attn.kv', layer=i\)"):
        prefix().init(KEY, params, model.info())


def test_peft_positions_ask_for_the_positions_tap(twins):
    """PEFT's numbering of a prefix (``peft_positions``) needs the model to number its positions
    from the ``embed.positions`` tap; a model without it is told the line to add."""
    linen, _, params = twins
    with pytest.raises(ValueError, match=r"(?s)\['embed.positions'\].*Tap\('embed.positions'\)\(0\)"):
        prefix(PrefixConfig(num_virtual_tokens=3, peft_positions=True)).init(KEY, params, linen.info())


def test_sizes_a_method_needs_are_asked_for_by_name():
    with pytest.raises(ValueError, match=r"houlsby needs ModelInfo.hidden_size, ModelInfo.num_layers"):
        houlsby().init(KEY, {"w": jnp.ones(2)}, jpeft.ModelInfo())
