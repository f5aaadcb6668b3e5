"""benchmarks.profile_step on the real MiniLM, at a tiny batch: the train step and the forward pass
are traced and their operations grouped, with the matmuls found among them."""

from __future__ import annotations

import pytest

from benchmarks.profile_step import GROUPS, profile


@pytest.mark.real
@pytest.mark.parametrize("config", ["lora", "inference"])
def test_profile_groups_the_traced_operations(minilm_dir, config):
    result = profile(config, "float32", steps=1, batch=2, length=16)
    groups = result["groups_ms"]
    assert set(groups) <= {g for g, _ in GROUPS} | {"other"}
    assert groups.get("matmuls (dot / ynn fusions)", 0.0) > 0.0
    assert result["wall_ms_per_step"] > 0.0
    ops = " ".join(op["hlo"] for op in result["top_ops"])
    assert "query/dot_general" in ops
    assert ("transpose(jvp(" in ops) == (config != "inference")  # only the train step has a backward pass
