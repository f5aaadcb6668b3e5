"""The GLUE experiment's command line, config layering, errors, and a real short run."""

import json

import numpy as np
import pytest

from experiments import glue as E

REQUIRED_FLAGS = ["--method", "--task", "--model", "--data_dir", "--epochs", "--max_steps",
                  "--batch_size", "--lr", "--seed", "--output_dir"]


def test_help_lists_flags_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        E.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in REQUIRED_FLAGS + ["--lora.r", "--lora.alpha", "--lora.targets"]:
        assert flag in out, flag
    assert "sst2" in out and "lora" in out  # defaults are shown


def test_config_layers_and_cli_precedence():
    cfg = E.parse_args([])
    assert (cfg.method, cfg.task) == ("lora", "sst2")
    assert cfg.lr == 1e-3 and cfg.lora.alpha == 16.0  # configs/lora.toml
    assert cfg.max_steps == 800  # configs/tasks/sst2.toml
    cfg = E.parse_args(["--task=mrpc", "--lr=3e-4", "--lora.r=16", "--max-steps", "7"])
    assert cfg.epochs == 5.0 and cfg.lr == 3e-4 and cfg.lora.r == 16 and cfg.max_steps == 7
    full = E.parse_args(["--method=full"])
    assert full.lr == 5e-5


def test_every_shipped_config_parses_for_every_task():
    """Each ``configs/<method>.toml`` (with its ``[tasks.<task>]`` tables) is valid for every
    task file in ``configs/tasks``; a per-task table changes only that task."""
    from pathlib import Path

    root = Path(E.__file__).resolve().parents[1] / "configs"
    methods = sorted(p.stem for p in root.glob("*.toml"))
    tasks = sorted(p.stem for p in (root / "tasks").glob("*.toml"))
    assert "lora" in methods and "mrpc" in tasks
    for method in methods:
        for task in tasks:
            cfg = E.parse_args([f"--method={method}", f"--task={task}"])
            assert (cfg.method, cfg.task) == (method, task)
    prefix_mrpc = E.parse_args(["--method=prefix", "--task=mrpc"])
    assert prefix_mrpc.group_lr == {"prefix": 0.1} and prefix_mrpc.epochs == 10.0
    assert E.parse_args(["--method=prefix", "--task=sst2"]).group_lr == {"prefix": 0.5}
    assert E.parse_args(["--method=ptuning2", "--task=mrpc"]).epochs == 5.0


@pytest.mark.parametrize("argv, needle", [
    (["--method=lorax"], "known methods"),
    (["--task=imagenet"], "known tasks"),
    (["--lora.rr=3"], "lora.r"),
])
def test_bad_flags_exit_2_with_a_hint(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_:
        E.parse_args(argv)
    assert exit_.value.code == 2
    assert needle in capsys.readouterr().err


def test_missing_task_file_is_a_clear_error(tmp_path, capsys):
    code = E.main(["--task=rte", f"--data-dir={tmp_path}", f"--output-dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "RTE/train.tsv" in err and "--data-dir" in err and "nyu-mll/glue" in err


@pytest.mark.real
def test_short_lora_run_beats_majority_on_sst2(tmp_path, minilm_dir):
    from jpeft.data.glue import default_data_dir

    if not (default_data_dir() / "SST-2" / "train.tsv").is_file():
        pytest.skip("real GLUE data not found")
    out = tmp_path / "run"
    code = E.main(["--method=lora", "--task=sst2", "--max-steps=150", "--max-length=64",
                   "--eval-every=1000", "--progress=false", f"--output-dir={out}"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("task", "method", "metrics", "trainable_params", "total_params", "steps", "wall_s"):
        assert key in summary
    assert summary["trainable_params"] == 74_498 and summary["steps"] == 150
    majority = summary["majority_baseline"]["accuracy"]
    assert summary["metrics"]["accuracy"] > majority + 0.15, summary
    assert summary["compilations"]["train_step"] <= 3  # buckets 16, 32 and 64
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(l["split"] == "train" for l in lines) == 150
    assert (out / "curves.png").stat().st_size > 1000
    # the inference export loads onto the base in one call and holds the trained delta and head
    import jax

    from jpeft.checkpoint.export import load_adapter
    from jpeft.core import paths as P
    from jpeft.models.bert import from_pretrained

    model, base = from_pretrained(minilm_dir, num_labels=2)
    transform, delta, params = load_adapter(out / "adapter", model, base)
    assert transform.name == "lora" and P.count_params(delta) == 73_728
    head = [p for p in P.paths(params) if p.startswith("head/")]
    assert any(not np.array_equal(P.flatten(params)[p], P.flatten(base)[p]) for p in head)
    assert all(float(np.abs(b).max()) > 0 for b in jax.tree_util.tree_leaves(delta))  # trained B != 0
