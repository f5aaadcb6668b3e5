"""benchmarks.compiler_options: variant parsing and the round-robin timer (no model is run)."""

from __future__ import annotations

import pytest

from benchmarks.compiler_options import YNN, default_variants, parse_variants, time_round_robin
from benchmarks.gemm import shapes
from jpeft.core.compile import CPU_COMPILER_OPTIONS


def test_parse_variants_reads_name_json_pairs_and_names_a_bad_one():
    assert parse_variants('a={}; b={"xla_cpu_enable_fast_math": false};') == \
        {"a": {}, "b": {"xla_cpu_enable_fast_math": False}}
    with pytest.raises(ValueError, match="is not NAME=JSON"):
        parse_variants("off")


def test_default_variants_start_from_jpeft_defaults_for_the_dtype(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert default_variants(None)["jpeft"] == CPU_COMPILER_OPTIONS
    assert default_variants("bfloat16")["jpeft"] == {}
    assert default_variants(None)["ynn_off"] == {YNN: ""}


def test_round_robin_warms_up_then_alternates_the_order():
    calls, ticks = [], iter(range(1000))
    timed = time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=3,
                             clock=lambda: float(next(ticks)))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert timed == {"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0]}


def test_gemm_shapes_are_the_layer_products():
    assert shapes(4096) == {"projection": (4096, 384, 384), "ffn_in": (4096, 384, 1536),
                            "ffn_out": (4096, 1536, 384), "weight_grad": (384, 4096, 1536)}
