"""The issue's bad inputs and injected faults against ``python -m experiments.glue``, on a tiny
model and tiny data: each is a clear refusal (exit 2, one paragraph naming the flag or file, no
traceback), a divergence stop (exit 3) or a recovery. Nothing may end silently wrong or lose
files, and no expected failure may print a traceback."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments import glue as E
from tests.reliability.tiny_cli import glue_args, tiny_glue_dir, tiny_model_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and data, a persistent compilation cache, and one finished 4-step run
    (checkpoints at steps 2 and 4) that tests copy."""
    import jax

    root = tmp_path_factory.mktemp("cli")
    old = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(root / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    model, data = tiny_model_dir(root), tiny_glue_dir(root)
    done = root / "done"
    assert E.main(glue_args(model, data, done, "--save-every=2")) == 0
    yield {"root": root, "model": model, "data": data, "done": done}
    jax.config.update("jax_compilation_cache_dir", old[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", old[1])


def refused(capsys, argv, *needles, code=2) -> str:
    """Run the CLI, assert exit ``code`` with a one-paragraph message holding ``needles``."""
    try:
        got = E.main(argv)
    except SystemExit as exit_:  # refused while parsing
        got = exit_.code
    err = capsys.readouterr().err
    assert got == code, err
    assert "Traceback" not in err, err
    message = [line for line in err.splitlines() if "error:" in line]
    assert message, err
    for needle in needles:
        assert needle in message[-1], (needle, message[-1])
    return message[-1]


# -- numbers and specs (refused while parsing, before anything is loaded) -------------------------

@pytest.mark.parametrize("flag, needle", [
    ("--lr=nan", "lr=nan"), ("--lr=0", "lr=0"), ("--lr=-1e-3", "lr="), ("--lr=inf", "lr=inf"),
    ("--max-steps=0", "--max-steps=0"), ("--max-steps=-5", "--max-steps=-5"),
    ("--epochs=-1", "--epochs"), ("--epochs=0", "--epochs"), ("--epochs=nan", "--epochs"),
    ("--batch-size=0", "--batch-size=0"), ("--eval-batch-size=-2", "--eval-batch-size"),
    ("--max-length=0", "--max-length"), ("--max-length=1", "--max-length"),
    ("--keep-checkpoints=0", "--keep-checkpoints=0"), ("--save-every=0", "--save-every=0"),
    ("--save-every=-2", "--save-every"), ("--eval-every=0", "--eval-every=0"),
    ("--save-minutes=0", "--save-minutes=0"), ("--save-minutes=-5", "--save-minutes"),
    ("--log-every=0", "--log-every=0"), ("--warmup-ratio=1.5", "warmup_ratio"),
    ("--weight-decay=-1", "weight_decay"), ("--clip-norm=-1", "clip_norm"),
    ("--lora.dropout=1.5", "lora.dropout"), ("--lora.dropout=nan", "lora.dropout"),
    ("--seed=-1", "--seed"), ("--max-train-samples=0", "--max-train-samples"),
    ("--divergence-factor=0.5", "--divergence-factor"), ("--group-lr=head=-1", "group_lr"),
    ("--progress=maybe", "give true or false"),
    ("--method=lora+", "empty part"), ("--method=lora ", "spaces"), ("--method=+lora", "empty part"),
    ("--method=lora+lora", "twice"), ("--method=lorax", "lorax"),
    (("--process-id=3", "--num-processes=2"), "--process-id=3"),
])
def test_nonsense_numbers_and_specs_are_refused_with_the_range(capsys, tmp_path, flag, needle):
    out = tmp_path / "run"
    flags = flag if isinstance(flag, tuple) else (flag,)
    # a missing data folder: should a value get through, the run stops at once (and the test fails)
    message = refused(capsys, ["--task=sst2", f"--output-dir={out}", f"--data-dir={tmp_path / 'none'}",
                               *flags], needle)
    assert any(word in message for word in ("give", "must be", "method", "known"))
    assert not out.exists()


@pytest.mark.parametrize("flags, needles", [
    (["--lora.rr=3"], ["--lora.rr=3", "Perhaps you meant: --lora.r INT"]),
    (["--max-step=3"], ["--max-step=3", "--max-steps"]),
    (["--batch-size=x"], ["--batch-size", "'x'", "INT"]),
    (["stray"], ["Unrecognized options: stray"]),
])
def test_unknown_flags_and_bad_values_are_one_line_with_the_closest_flags(capsys, tmp_path, flags, needles):
    out = tmp_path / "run"
    refused(capsys, [f"--output-dir={out}", *flags], *needles)
    assert not out.exists()


def test_an_unknown_key_in_a_config_file_names_the_file_and_the_closest_key(capsys, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 1e-3\n[lora]\nrr = 4\n")
    refused(capsys, [f"--config={bad}", f"--output-dir={tmp_path / 'run'}"],
            f"config file {bad}: unknown key 'lora.rr' (did you mean lora.r")


def test_multi_process_without_a_coordinator_is_refused(capsys, tmp_path):
    refused(capsys, ["--num-processes=2", "--process-id=1", f"--output-dir={tmp_path / 'r'}"],
            "coordinator")


# -- data, model and output folder (refused before training) ------------------------------------

def _data_with(world, tmp_path, content: bytes, name: str = "train.tsv") -> Path:
    data = tmp_path / "glue"
    shutil.copytree(world["data"], data)
    (data / "SST-2" / name).write_bytes(content)
    return data


@pytest.mark.parametrize("content, needle", [
    (b"", "is empty"),
    (b"sentence\tlabel\n", "no examples"),
    (b"text\tscore\ngood film\t1\n", "lacks the column"),
    (b"sentence\tlabel\ngood \xff\xfe film\t1\n", "not UTF-8"),
    (b"sentence\tlabel\ngood film\tmaybe\n", "unknown label"),
])
def test_bad_data_files_name_the_file(capsys, world, tmp_path, content, needle):
    data = _data_with(world, tmp_path, content)
    refused(capsys, glue_args(world["model"], data, tmp_path / "run"), needle, "train.tsv")


def test_a_missing_data_file_names_it(capsys, world, tmp_path):
    data = tmp_path / "glue"
    shutil.copytree(world["data"], data)
    (data / "SST-2" / "dev.tsv").unlink()
    refused(capsys, glue_args(world["model"], data, tmp_path / "run"), "dev.tsv", "--data-dir")


def _model_copy(world, tmp_path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    return model


def test_model_path_that_is_a_file(capsys, world, tmp_path):
    file = tmp_path / "model.bin"
    file.write_text("x")
    refused(capsys, glue_args(file, world["data"], tmp_path / "run"), "--model", "is a file")


@pytest.mark.parametrize("damage", ["truncate", "header", "missing"])
def test_a_damaged_model_file_is_a_message(capsys, world, tmp_path, damage):
    model = _model_copy(world, tmp_path)
    weights = model / "model.safetensors"
    raw = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(raw[: len(raw) // 2])
    elif damage == "header":
        weights.write_bytes(raw[:8] + b"\xff" * 64 + raw[72:])
    else:
        weights.unlink()
    refused(capsys, glue_args(model, world["data"], tmp_path / "run"), "--model")


def test_non_finite_weights_are_refused(capsys, world, tmp_path):
    from safetensors.numpy import load_file, save_file

    model = _model_copy(world, tmp_path)
    tensors = load_file(str(model / "model.safetensors"))
    key = sorted(k for k in tensors if k.endswith("query.weight"))[0]
    tensors[key] = np.full_like(tensors[key], np.nan)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    refused(capsys, glue_args(model, world["data"], tmp_path / "run"), "non-finite", "--model")


def test_output_dir_that_is_a_file(capsys, world, tmp_path):
    file = tmp_path / "out"
    file.write_text("keep me")
    refused(capsys, glue_args(world["model"], world["data"], file), "--output-dir", "is a file")
    assert file.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_output_dir(capsys, world, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        refused(capsys, glue_args(world["model"], world["data"], parent / "run"), "--output-dir")
    finally:
        parent.chmod(0o700)


def test_max_length_beyond_the_position_embeddings(capsys, world, tmp_path):
    refused(capsys, glue_args(world["model"], world["data"], tmp_path / "run", "--max-length=64"),
            "--max-length=64", "40")


# -- the run directory: locks, resume identity, fresh starts -----------------------------------

def _copy_run(world, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(world["done"], out)
    return out


def test_a_live_lock_refuses_a_second_run(capsys, world, tmp_path):
    from jpeft.train.logging import LOCK_NAME, RunDirLock

    out = _copy_run(world, tmp_path)
    before = sorted(p.name for p in out.iterdir())
    with RunDirLock(out):  # this (live) process holds it
        message = refused(capsys, glue_args(world["model"], world["data"], out), "in use by",
                          str(os.getpid()))
    assert "--output-dir" in message
    assert sorted(p.name for p in out.iterdir()) == before and not (out / LOCK_NAME).exists()


def test_a_lock_on_another_host_is_refused(capsys, world, tmp_path):
    from jpeft.train.logging import LOCK_NAME

    out = _copy_run(world, tmp_path)
    (out / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    refused(capsys, glue_args(world["model"], world["data"], out), "elsewhere.example", LOCK_NAME)


@pytest.mark.parametrize("flag, needle", [
    ("--task=rte", "task ('sst2' there, 'rte' now)"),
    ("--lora.r=4", "lora.r: 8 -> 4"),
    ("--method=ia3", "method ('lora' there, 'ia3' now)"),
])
def test_resume_refuses_another_configuration(capsys, world, tmp_path, flag, needle):
    out = _copy_run(world, tmp_path)
    before = {p.name: p.stat().st_mtime for p in out.iterdir()}
    message = refused(capsys, [*glue_args(world["model"], world["data"], out), flag], needle)
    assert "--resume=false" in message
    assert {p.name: p.stat().st_mtime for p in out.iterdir()} == before  # nothing touched


def test_resume_refuses_another_base_model(capsys, world, tmp_path):
    out = _copy_run(world, tmp_path)
    other = tiny_model_dir(world["root"], seed=1)
    refused(capsys, glue_args(other, world["data"], out), "another base model", "--resume=false")


def test_a_fresh_start_moves_the_old_run_aside_and_keeps_foreign_files(capsys, world, tmp_path):
    out = _copy_run(world, tmp_path)
    (out / "checkpoints" / "notes.txt").write_text("mine")
    (out / "mine.txt").write_text("mine too")
    old_adapter = (out / "adapter" / "adapter.safetensors").read_bytes()
    assert E.main([*glue_args(world["model"], world["data"], out), "--resume=false", "--lr=5e-3"]) == 0
    moved = [p for p in out.iterdir() if p.name.startswith("superseded-")]
    assert len(moved) == 1
    assert (moved[0] / "checkpoints" / "notes.txt").read_text() == "mine"
    assert (moved[0] / "adapter" / "adapter.safetensors").read_bytes() == old_adapter
    assert (out / "mine.txt").read_text() == "mine too"
    assert "moved the earlier run's" in capsys.readouterr().out
    mode = (out / "adapter").stat().st_mode & 0o777
    assert mode & 0o055 == 0o055 & ~_umask(), oct(mode)  # normal permissions, not 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_stale_lock_is_taken_over_with_a_note(capsys, world, tmp_path):
    from jpeft.train.logging import LOCK_NAME

    out = _copy_run(world, tmp_path)
    import socket

    (out / LOCK_NAME).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    assert E.main(glue_args(world["model"], world["data"], out, "--max-steps=5")) == 0
    text = capsys.readouterr().out
    assert "took over the lock" in text and "resumed from" in text
    assert not (out / LOCK_NAME).exists()


# -- divergence and damaged checkpoints --------------------------------------------------------

def test_divergence_stops_with_exit_3_and_writes_no_adapter(capsys, world, tmp_path):
    from jpeft.checkpoint import CheckpointManager
    from jpeft.train.logging import read_metrics

    out = tmp_path / "run"
    message = refused(capsys, glue_args(world["model"], world["data"], out, "--lr=1e3",
                                        "--clip-norm=0", "--max-steps=12", "--save-every=2",
                                        "--warmup-ratio=0"),
                      "diverged at step", "learning rate", "1000", code=3)
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()
    manager = CheckpointManager(out / "checkpoints")
    for step in manager.all_steps():
        state = manager.read_state(step)
        import jax

        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(state["trainable"]))
    if manager.all_steps():
        assert f"/{max(manager.all_steps())}" in message
    step = int(message.split("diverged at step ")[1].split(":")[0])
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == step


def test_flipped_bytes_in_the_newest_checkpoint_fall_back_and_the_run_completes(capsys, world, tmp_path):
    out = _copy_run(world, tmp_path)
    data = max((p for p in (out / "checkpoints" / "4" / "state" / "d").iterdir()),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert E.main(glue_args(world["model"], world["data"], out, "--max-steps=6")) == 0
    text = capsys.readouterr().out
    assert "failed verification" in text and "resuming from step 2" in text
    assert "resumed from" in text and "/2 (step 2 of 6)" in text
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    assert any((out / "checkpoints" / "_corrupt").iterdir())


@pytest.mark.parametrize("minutes, kept", [("none", [4]), ("1e-9", [3, 4])])
def test_save_minutes_checkpoints_between_evaluations(world, tmp_path, minutes, kept):
    """With evaluations only at the end, ``--save-minutes`` alone decides the checkpoints before
    it: an interval shorter than a step saves every step (the newest two kept), none saves none."""
    from jpeft.checkpoint import CheckpointManager

    out = tmp_path / "timed"
    assert E.main(glue_args(world["model"], world["data"], out, "--eval-every=100",
                            f"--save-minutes={minutes}")) == 0
    assert sorted(CheckpointManager(out / "checkpoints").all_steps()) == kept


def test_saver_is_due_once_the_interval_has_passed_since_the_last_save():
    from experiments.common import RunConfig, Saver

    class Manager:
        directory, saved = "checkpoints", []

        def save(self, step, state, meta):
            self.saved.append(step)

    class State:
        step = 7

    now = [100.0]
    cfg = E.parse_args(["--method=lora", "--task=sst2", "--save-minutes=2"])
    assert isinstance(cfg, RunConfig)
    saver = Saver(cfg, Manager(), {}, steps_per_epoch=5, clock=lambda: now[0])
    assert not saver.due(7, evaluated=False)
    now[0] += 119.0
    assert not saver.due(7, evaluated=False)
    now[0] += 1.0
    assert saver.due(7, evaluated=False) and saver.due(8, evaluated=True)
    saver.save(State(), {})
    assert not saver.due(8, evaluated=False)  # the interval counts from the save
    assert saver.due(8, evaluated=True)  # evaluations still checkpoint (--save-every unset)


# -- the E2E CLI shares the boundary --------------------------------------------------------------

@pytest.mark.parametrize("flag, needle", [
    ("--max-test-mrs=0", "--max-test-mrs=0"), ("--max-eval-samples=0", "--max-eval-samples=0"),
    ("--max-steps=0", "--max-steps=0"), ("--num-beams=0", "--num-beams=0"),
    ("--max-new-tokens=-1", "--max-new-tokens"), ("--length-penalty=nan", "--length-penalty"),
    ("--method=lora+", "empty part"),
])
def test_e2e_numbers_and_specs_are_refused(capsys, tmp_path, flag, needle):
    from experiments import e2e

    try:
        code = e2e.main([f"--output-dir={tmp_path / 'run'}", f"--data-dir={tmp_path / 'none'}", flag])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("content, needle", [
    (b"", "is empty"),
    (b"meaning,text\n\"a\",\"b\"\n", "not 'mr,ref'"),
    (b"mr,ref\n\"name[\xff]\",\"x\"\n", "not UTF-8"),
    (b"mr,ref\n", "no examples"),
])
def test_e2e_bad_data_files_name_the_file(capsys, tmp_path, content, needle):
    from experiments import e2e

    data = tmp_path / "e2e"
    data.mkdir()
    for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        (data / name).write_bytes(b'mr,ref\n"name[x]","x"\n')
    (data / "trainset.csv").write_bytes(content)
    code = e2e.main([f"--output-dir={tmp_path / 'run'}", f"--data-dir={data}", "--progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "trainset.csv" in err and "Traceback" not in err, err


# -- experiments.arithmetic: bad run directories are one line (exit 2), before any model loads ----

def _fake_run(tmp_path: Path, name: str, method: str = "lora", summary: str | None = '{"task": "sst2"}') -> Path:
    """A run directory holding an ``adapter/adapter.json`` (no tensors) and ``summary``."""
    run = tmp_path / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter.json").write_text(json.dumps({
        "format": "jpeft.adapter", "format_version": 1, "method_spec": method, "base_fingerprint": "x",
        "base_model": "sentence-transformers/all-MiniLM-L6-v2", "method_configs": {}, "params": [],
        "delta": {}}))
    if summary is not None:
        (run / "summary.json").write_text(summary)
    return run


@pytest.mark.parametrize("make_a, needles", [
    (lambda t: t / "nowhere", ["nowhere has no adapter.json"]),
    (lambda t: _fake_run(t, "prefix", method="prefix"), ["both adapters must be LoRA", "'prefix'"]),
    (lambda t: _fake_run(t, "damaged", summary='{"task":'), ["damaged/summary.json: JSONDecodeError"]),
    (lambda t: _fake_run(t, "notask", summary='{"seed": 0}'), ["notask/summary.json names no GLUE task"]),
    (lambda t: _fake_run(t, "bare", summary=None), ["cannot tell the GLUE task", "bare/adapter"]),
    ("file", ["--out=", "is a file"]),
])
def test_arithmetic_refuses_bad_run_directories(capsys, tmp_path, monkeypatch, make_a, needles):
    from experiments import arithmetic as A
    from jpeft.models import hub

    monkeypatch.setattr(hub, "resolve_model_dir", lambda name: tmp_path)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    out = tmp_path / "out"
    if make_a == "file":
        out.write_text("x")
        a = _fake_run(tmp_path, "a")
    else:
        a = make_a(tmp_path)
    b = _fake_run(tmp_path, "b")
    try:
        code = A.main([f"--a={a}", f"--b={b}", f"--out={out}"])
    except SystemExit as exit_:  # refused while parsing
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not out.is_dir()
