"""Capabilities and the method registry: lifted through compose and banks, refused where a
method cannot be combined, one registration per method file."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.bank import bank
from jpeft.core.capabilities import (AddsTokens, AfterTraining, Exclusive, OptimizerGroups,
                                     ReplacesForward, TrainingHooks)
from jpeft.core.registry import REGISTRY, register
from jpeft.core.transform import ApplyContext, Transform, compose


def _toy(name: str, *capabilities) -> Transform:
    return Transform(name=name, config=None, init=lambda rng, base, info=None: {"v": jnp.ones(3)},
                     capabilities=tuple(capabilities))


def _hooks(k: float, rewrite_at: int | None = None, stage: int | None = None) -> TrainingHooks:
    def between(delta, step, total):
        return {"v": delta["v"] * 0} if step == rewrite_at else delta

    return TrainingHooks(penalty=lambda delta, ctx: k * jnp.sum(delta["v"]),
                         between_steps=between if rewrite_at is not None else None,
                         stage_starts=(lambda total: (stage,)) if stage is not None else None)


def test_training_hooks_compose_on_each_parts_own_delta():
    a, b = _toy("a", _hooks(1.0, rewrite_at=2, stage=5)), _toy("b", _hooks(10.0, stage=3))
    plain = _toy("c")
    both = compose(a, plain, b)
    delta = {"a": {"v": jnp.ones(3)}, "c": {"v": jnp.ones(3)}, "b": {"v": jnp.full(3, 2.0)}}
    assert float(both.penalty(delta, ApplyContext())) == pytest.approx(3.0 + 60.0)
    assert both.stage_starts(100) == (3, 5)
    hooks = both.capability(TrainingHooks)
    assert hooks.between_steps(delta, 1, 10) is delta  # nothing changed: the same object
    rewritten = hooks.between_steps(delta, 2, 10)
    assert float(jnp.sum(rewritten["a"]["v"])) == 0.0 and rewritten["b"] is delta["b"]
    assert float(plain.penalty({"v": jnp.ones(3)}, ApplyContext())) == 0.0 and plain.stage_starts(9) == ()


def test_after_training_and_groups_compose_by_part_name():
    a = _toy("a", AfterTraining(finalize=lambda d: {"v": d["v"][:1]}, stats=lambda d: {"n": 1.0}),
             OptimizerGroups({"a_B": 16.0}))
    b = _toy("b", OptimizerGroups({"b_x": 2.0}), AddsTokens())
    both = compose(a, b)
    delta = {"a": {"v": jnp.ones(3)}, "b": {"v": jnp.ones(3)}}
    kept = both.finalize(delta)
    assert kept["a"]["v"].shape == (1,) and kept["b"] is delta["b"]
    assert both.stats(delta) == {"a.n": 1.0}
    assert dict(both.group_lr) == {"a_B": 16.0, "b_x": 2.0}
    assert both.adds_tokens and not a.adds_tokens


def test_exclusive_and_own_forward_refuse_composition_by_name():
    with pytest.raises(ValueError, match="'full' trains every weight .* \\(got a\\)"):
        compose(_toy("full", Exclusive()), _toy("a"))
    banked = _toy("bank[a]", ReplacesForward(forward=lambda *args: None))
    with pytest.raises(ValueError, match="cannot be composed; compose the methods first"):
        compose(banked, _toy("a"))
    with pytest.raises(ValueError, match="a bank of banks"):
        bank(banked, 2)


def test_one_capability_of_each_type():
    with pytest.raises(ValueError, match="at most one capability of each type"):
        _toy("a", OptimizerGroups({}), OptimizerGroups({"x": 1.0}))


def test_bank_lifts_training_hooks_and_after_training_per_slot():
    a = _toy("a", _hooks(1.0, rewrite_at=2, stage=4),
             AfterTraining(stats=lambda d: {"sum": float(jnp.sum(d["v"]))}))
    banked = bank(a, 3, heads=False)
    delta = {"adapters": {"v": jnp.stack([jnp.full(3, float(i)) for i in range(3)])}, "base": {}}
    assert float(banked.penalty(delta, ApplyContext())) == pytest.approx(3 * (0 + 1 + 2))
    assert banked.stats(delta) == {"0.sum": 0.0, "1.sum": 3.0, "2.sum": 6.0}
    assert banked.stage_starts(10) == (4,)
    hooks = banked.capability(TrainingHooks)
    assert hooks.between_steps(delta, 1, 10) is delta
    np.testing.assert_array_equal(hooks.between_steps(delta, 2, 10)["adapters"]["v"], np.zeros((3, 3)))
    assert banked.capability(ReplacesForward).trains_head is False


def test_every_method_file_registers_itself():
    import jpeft.methods  # noqa: F401  (imports every method file)

    assert {"full", "lora", "houlsby", "pfeiffer", "ia3", "prompt", "ptuning", "prefix", "ptuning2",
            "bitfit", "freeze", "diff_pruning"} <= set(REGISTRY)
    for name, spec in REGISTRY.items():
        t = spec.factory(spec.config_cls())
        assert t.name == name and isinstance(t.config, spec.config_cls)


def test_a_taken_name_is_refused_and_a_config_must_be_a_dataclass():
    @dataclasses.dataclass(frozen=True)
    class Other:
        x: int = 0

    with pytest.raises(ValueError, match="'lora' is taken by jpeft.methods.lora.lora"):
        register("lora", Other, lambda config: None)
    with pytest.raises(TypeError, match="not a dataclass"):
        register("not_a_method", dict, lambda config: None)
    assert "not_a_method" not in REGISTRY
    known = REGISTRY["lora"]
    with pytest.raises(ValueError, match="'lora' is taken"):  # dropping its converter is refused too
        register("lora", known.config_cls, known.factory, prepare=known.prepare)
    register("lora", known.config_cls, known.factory, prepare=known.prepare, peft=known.peft)  # the same: fine
    assert REGISTRY["lora"] == known and REGISTRY["lora"].peft is not None


def test_full_is_exclusive_through_build():
    with pytest.raises(ValueError, match="'full' trains every weight"):
        jpeft.build("full+bitfit")
    assert jpeft.build("full").capability(Exclusive) is not None
    assert jpeft.build("lora").capabilities == ()
