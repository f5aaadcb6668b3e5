"""Random combinations of methods: a fresh composed delta changes nothing (token-adding methods
aside), weight-space combinations merge and unmerge exactly, and every combination trains."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from jpeft.core import paths as P
from jpeft.core.transform import apply, compose, merge, unmerge
from jpeft.methods import REGISTRY
from jpeft.methods.adapters import AdapterConfig
from jpeft.methods.lora import LoraConfig
from jpeft.methods.hra import HraConfig
from jpeft.methods.oft import OftConfig
from jpeft.methods.vera import VeraConfig
from jpeft.methods.prefix import PrefixConfig
from jpeft.methods.prompt import PromptConfig
from jpeft.methods.ptuning import PTuningConfig
from jpeft.methods.ptuning2 import PTuningV2Config
from jpeft.methods.trainable_tokens import TrainableTokensConfig
from jpeft.train.optim import OptimConfig
from jpeft.train.trainer import Trainer
from tests.helpers import perturb, tiny_batch, tiny_bert

SMALL = {
    "lora": LoraConfig(r=2),
    "vera": VeraConfig(r=4),
    "oft": OftConfig(block_size=4),
    "hra": HraConfig(r=2),
    "houlsby": AdapterConfig(size=3),
    "pfeiffer": AdapterConfig(size=3),
    "prompt": PromptConfig(num_virtual_tokens=2),
    "ptuning": PTuningConfig(num_virtual_tokens=2, encoder_hidden=4),
    "prefix": PrefixConfig(num_virtual_tokens=2, projection_hidden=4),
    "ptuning2": PTuningV2Config(num_virtual_tokens=2),
    "trainable_tokens": TrainableTokensConfig(token_indices=(3, 12, 33)),  # tokens of BATCH
}
COMPOSABLE = sorted(n for n in REGISTRY if n != "full")
# HRA's fresh chain is pairs of equal reflections: the identity up to float rounding, as PEFT's
ROUNDED_IDENTITY = {"hra"}
WEIGHT_SPACE = ["lora", "ia3", "bitfit", "freeze", "diff_pruning", "trainable_tokens", "ln_tuning",
                "loha", "lokr", "vera", "oft", "hra"]
MODEL, PARAMS = tiny_bert()
BATCH = tiny_batch()


def _make(names):
    return compose(*(REGISTRY[n].factory(SMALL.get(n, REGISTRY[n].config_cls())) for n in names))


def _logits(params):
    return MODEL.apply({"params": params}, BATCH["input_ids"], BATCH["attention_mask"],
                       BATCH["token_type_ids"])


def _adapted(t, params, delta):
    return apply(MODEL, t, params, delta, BATCH["input_ids"], BATCH["attention_mask"],
                 BATCH["token_type_ids"])


combos = st.lists(st.sampled_from(COMPOSABLE), min_size=2, max_size=3, unique=True)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=combos, seed=st.integers(0, 1000))
def test_fresh_composition_is_identity_unless_it_adds_tokens(names, seed):
    t = _make(names)
    delta = t.init(jax.random.key(seed), PARAMS, MODEL.info())
    assert set(delta) == set(names)
    out = _adapted(t, PARAMS, delta)
    if t.adds_tokens:
        assert any(n in ("prompt", "ptuning", "prefix", "ptuning2") for n in names)
        assert out.shape == _logits(PARAMS).shape
    elif ROUNDED_IDENTITY & set(names):
        np.testing.assert_allclose(out, _logits(PARAMS), rtol=1e-5, atol=1e-7)
    else:
        np.testing.assert_array_equal(out, _logits(PARAMS))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=st.lists(st.sampled_from(WEIGHT_SPACE), min_size=2, max_size=3, unique=True),
       seed=st.integers(0, 1000))
def test_weight_space_combinations_merge_and_unmerge(names, seed):
    t = _make(names)
    assert t.mergeable
    delta = perturb(t.init(jax.random.key(seed), PARAMS, MODEL.info()), seed=seed, scale=0.05)
    if "ia3" in names:  # keep (IA)³ vectors away from 0 so unmerge is well conditioned
        delta["ia3"] = jax.tree_util.tree_map(lambda v: 1.0 + 0.2 * jnp.tanh(v - 1.0), delta["ia3"])
    merged = merge(t, PARAMS, delta)
    np.testing.assert_allclose(_logits(merged), _adapted(t, PARAMS, delta), atol=3e-5, rtol=1e-5)
    for path, leaf in P.flatten(unmerge(t, merged, delta)).items():
        np.testing.assert_allclose(leaf, P.flatten(PARAMS)[path], atol=2e-5, err_msg=path)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(names=combos)
def test_every_combination_trains(names):
    # no weight decay: a leaf moves only if its gradient is non-zero
    trainer = Trainer(MODEL, _make(names), PARAMS, total_steps=2, optim=OptimConfig(weight_decay=0.0))
    state = trainer.init_state(jax.random.key(0))
    before = jax.tree_util.tree_map(np.asarray, state.trainable["delta"])
    for _ in range(2):
        state, metrics = trainer.train_step(state, trainer.frozen, BATCH)
    assert np.isfinite(float(metrics["loss"]))
    after = state.trainable["delta"]
    assert set(after) == set(names)
    for name in names:  # every part trains, not just one of them
        moved = [not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(before[name]),
                                                           jax.tree_util.tree_leaves(after[name]))]
        assert any(moved), (names, name)
