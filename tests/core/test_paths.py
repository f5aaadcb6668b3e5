import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st

from jpeft.core import paths as P

TREE = {"encoder": {"layer_0": {"query": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
                                "value": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)}}},
        "head": {"classifier": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}}


def test_flatten_paths_and_roundtrip():
    flat = P.flatten(TREE)
    assert "encoder/layer_0/query/kernel" in flat
    assert P.unflatten(flat).keys() == TREE.keys()
    assert P.count_params(TREE) == 2 * (6 + 3) + 6 + 2


def test_select_and_select_modules():
    assert P.select(TREE, r"query/kernel$") == ["encoder/layer_0/query/kernel"]
    assert sorted(P.select_modules(TREE, r"(query|value)$")) == [
        "encoder/layer_0/query", "encoder/layer_0/value"]


def test_no_match_lists_available_paths():
    with pytest.raises(P.NoMatchError) as err:
        P.select_modules(TREE, r"keyy", what="lora.targets")
    msg = str(err.value)
    assert "lora.targets" in msg and "keyy" in msg
    assert "encoder/layer_0/query" in msg and "head/classifier" in msg


def test_partition_combine_identity_and_errors():
    chosen, rest = P.partition(TREE, ["head/classifier/kernel", "head/classifier/bias"])
    assert set(chosen) == {"head/classifier/kernel", "head/classifier/bias"}
    assert "head/classifier/kernel" not in rest
    back = P.flatten(P.combine(chosen, rest))
    assert back.keys() == P.flatten(TREE).keys()
    with pytest.raises(KeyError):
        P.partition(TREE, ["nope/kernel"])
    with pytest.raises(ValueError):
        P.combine(chosen, chosen)


@settings(max_examples=30, deadline=None)
@given(st.sets(st.sampled_from(sorted(P.flatten(TREE))), max_size=6))
def test_partition_then_combine_is_identity(selected):
    chosen, rest = P.partition(TREE, selected)
    assert set(chosen) == set(selected)
    merged = P.flatten(P.combine(chosen, rest))
    for path, leaf in P.flatten(TREE).items():
        assert merged[path] is leaf
