import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from jpeft.core.transform import ApplyContext, Transform, apply, compose, intercepting, merge
from jpeft.methods import build, parse_spec
from jpeft.methods.full import full
from jpeft.methods.lora import lora


def _scaler(name, factor):
    def interceptors(delta, ctx):
        def icpt(f, args, kwargs, context):
            out = f(*args, **kwargs)
            if isinstance(context.module, nn.Dense):
                return out * factor
            return out
        return [icpt]
    return Transform(name=name, config=None, init=lambda r, b, i: {}, interceptors=interceptors)


class Lin(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic=True):
        return nn.Dense(1, use_bias=False, kernel_init=nn.initializers.ones)(x)

    def info(self):
        return None


def test_later_interceptors_wrap_earlier_ones():
    calls = []

    def tag(name):
        def icpt(f, args, kwargs, context):
            calls.append(name)
            return f(*args, **kwargs)
        return icpt

    m = Lin()
    p = m.init(jax.random.key(0), jnp.ones((1, 2)))
    with intercepting([tag("first"), tag("second")]):
        m.apply(p, jnp.ones((1, 2)))
    # the outermost interceptor runs first: the later one wraps the earlier one
    assert calls[:2] == ["second", "first"]


def test_compose_delta_is_keyed_by_part_and_refuses_full():
    t = compose(_scaler("a", 2.0), _scaler("b", 3.0))
    assert t.name == "a+b"
    assert t.init(jax.random.key(0), {}, None) == {"a": {}, "b": {}}
    m = Lin()
    p = m.init(jax.random.key(0), jnp.ones((1, 2)))["params"]
    out = apply(m, t, p, t.init(jax.random.key(0), p, None), jnp.ones((1, 2)))
    assert float(out[0, 0]) == pytest.approx(12.0)
    with pytest.raises(ValueError, match="cannot be combined"):
        compose(full(), lora())
    with pytest.raises(ValueError, match="duplicate"):
        compose(lora(), lora())


def test_compose_flattens_nested_compositions():
    t = compose(compose(_scaler("a", 2.0), _scaler("b", 3.0)), _scaler("c", 1.0))
    assert [p.name for p in t.parts] == ["a", "b", "c"]


def test_unknown_method_lists_known_ones():
    with pytest.raises(ValueError, match="known methods: .*lora"):
        parse_spec("lora+nonsense")
    assert parse_spec("lora+full") == ["lora", "full"]
    with pytest.raises(ValueError, match="cannot be combined"):
        build("full+lora")


def test_merge_refuses_activation_methods():
    with pytest.raises(TypeError, match="cannot merge"):
        merge(_scaler("act", 2.0), {}, {})


def test_context_keys_are_distinct_and_stable():
    ctx = ApplyContext(train=True, rng=jax.random.key(3))
    a1, a2, b = ctx.key("lora", "x"), ctx.key("lora", "x"), ctx.key("lora", "y")
    assert jnp.array_equal(jax.random.key_data(a1), jax.random.key_data(a2))
    assert not jnp.array_equal(jax.random.key_data(a1), jax.random.key_data(b))
    assert ApplyContext().key("x") is None


def test_a_config_in_place_of_a_transform_is_refused():
    from jpeft.methods.lora import LoraConfig

    t = lora(LoraConfig(r=2))
    with pytest.raises(TypeError, match="expected a jpeft Transform, got a LoraConfig"):
        apply(nn.Dense(2), LoraConfig(), {}, {}, jnp.ones((1, 2)))
    with pytest.raises(TypeError, match="compose: expected a jpeft Transform"):
        compose(t, LoraConfig())
    with pytest.raises(TypeError, match="merge: expected a jpeft Transform"):
        merge(LoraConfig(), {}, {})
