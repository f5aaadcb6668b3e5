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


def test_an_asynchronous_operation_counts_from_its_start_to_its_end_event():
    from benchmarks.profile_step import _op_spans

    events = [
        {"ph": "X", "name": "dot_general.1", "ts": 0.0, "dur": 10.0},          # async start
        {"ph": "X", "name": "fusion.2", "ts": 20.0, "dur": 500.0},             # synchronous
        {"ph": "X", "name": "ThunkExecutor::Execute", "ts": 0.0, "dur": 9e9},  # not an operation
        {"ph": "X", "name": "end: dot_general.1", "ts": 3000.0, "dur": 1.0},
        {"ph": "X", "name": "dot_general.1", "ts": 5000.0, "dur": 2000.0},    # next step, no end event
        {"ph": "i", "name": "marker", "ts": 1.0},
    ]
    assert _op_spans(events) == [("dot_general.1", 3.001), ("fusion.2", 0.5), ("dot_general.1", 2.0)]


def test_the_decoder_profile_finds_its_tied_lm_head():
    result = profile("lora", "float32", steps=1, batch=1, length=8, model_name="smollm2", layers=1, vocab=512)
    groups = result["groups_ms"]
    assert groups.get("LM head (tied embeddings)", 0.0) > 0.0
    assert groups.get("matmuls (dot / ynn fusions)", 0.0) > 0.0
    ops = " ".join(op["hlo"] for op in result["top_ops"])
    assert "q_proj" in ops and "transpose(jvp(" in ops
    assert (result["model"], result["layers"], result["vocab"]) == ("smollm2", 1, 512)


@pytest.mark.parametrize("kwargs, message", [
    ({"model_name": "smollm2", "layers": 1}, None),
    ({"model_name": "minilm", "vocab": 512}, "apply to --model=smollm2 only"),
    ({"model_name": "gpt", "layers": None}, "model must be"),
])
def test_profile_refuses_settings_that_do_not_apply(kwargs, message):
    config = "inference" if message is None else "lora"
    with pytest.raises(ValueError, match=message or "float32 LoRA step"):
        profile(config, "float32", steps=1, batch=1, length=8, **kwargs)


def test_the_command_line_names_the_bad_setting(capsys):
    from benchmarks.profile_step import main

    with pytest.raises(SystemExit):
        main(["--model=minilm", "--layers=2"])
    assert "apply to --model=smollm2 only" in capsys.readouterr().err
