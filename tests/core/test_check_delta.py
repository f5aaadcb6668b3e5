"""jpeft.check_delta: a delta that does not fit its transform on a base is named before it runs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jpeft
from jpeft.core import paths as P
from tests.helpers import tiny_bert

KEY = jax.random.key(0)


def test_a_fitting_delta_passes_and_each_misfit_is_named():
    model, base = tiny_bert()
    method = jpeft.compose(jpeft.lora(jpeft.LoraConfig(r=2)), jpeft.vera(jpeft.VeraConfig(r=4)))
    delta = method.init(KEY, base, model.info())
    jpeft.check_delta(method, base, delta, model.info())
    flat = P.flatten(delta)
    missing = P.unflatten({k: v for k, v in flat.items() if "layer_1" not in k})
    with pytest.raises(ValueError, match=r"missing tensors \['delta/lora/encoder/layer_1"):
        jpeft.check_delta(method, base, missing, model.info())
    other_rank = {**delta, "lora": jpeft.lora(jpeft.LoraConfig(r=3)).init(KEY, base, model.info())}
    with pytest.raises(ValueError, match=r"lora_A is \(16, 3\) float32, the method expects \(16, 2\)"):
        jpeft.check_delta(method, base, other_rank, model.info())
    extra = P.unflatten({**flat, "vera/encoder/layer_0/attention/self/key/lambda_d": jnp.zeros(4)})
    with pytest.raises(ValueError, match="unexpected tensors.*self/key/lambda_d"):
        jpeft.check_delta(method, base, extra, model.info())
