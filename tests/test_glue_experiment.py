"""The GLUE experiment's command line, config layering, errors, and a real short run."""

import json

import numpy as np
import pytest

from experiments import glue as E

REQUIRED_FLAGS = ["--method", "--task", "--model", "--data-dir", "--epochs", "--max-steps",
                  "--batch-size", "--lr", "--seed", "--output-dir"]


def test_help_lists_flags_with_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        E.parse_args(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for flag in REQUIRED_FLAGS + ["--lora.r", "--lora.alpha", "--lora.targets", "--bitfit.pattern"]:
        assert flag in out, flag
    assert "(default: sst2)" in out and "(default: lora)" in out
    assert "batch size (default: 16)" in " ".join(out.split())  # after configs/lora.toml's [tasks.sst2]


def test_config_layers_and_cli_precedence():
    cfg = E.parse_args([])
    assert (cfg.method, cfg.task) == ("lora", "sst2")
    assert cfg.optim.lr == 5e-4 and cfg.lora.alpha == 16.0 and cfg.data.batch_size == 16  # configs/lora.toml
    # configs/lora.toml [tasks.sst2] (one epoch) over configs/tasks/sst2.toml (800 steps)
    assert cfg.loop.max_steps is None and cfg.loop.epochs == 1.0
    cfg = E.parse_args(["--task=mrpc", "--lr=3e-4", "--lora.r=16", "--max-steps", "7"])
    assert cfg.loop.epochs == 10.0 and cfg.optim.lr == 3e-4 and cfg.lora.r == 16 and cfg.loop.max_steps == 7
    assert E.parse_args(["--task=wnli"]).loop.epochs == 3.0  # configs/tasks/wnli.toml
    full = E.parse_args(["--method=full"])
    assert full.optim.lr == 5e-5 and full.loop.max_steps is None and full.loop.epochs == 1.0


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
    assert prefix_mrpc.optim.group_lr == {"prefix": 0.1} and prefix_mrpc.loop.epochs == 10.0
    assert E.parse_args(["--method=prefix", "--task=sst2"]).optim.group_lr == {"prefix": 0.5}
    assert E.parse_args(["--method=ptuning2", "--task=mrpc"]).loop.epochs == 10.0
    assert E.parse_args(["--method=lora", "--task=mrpc"]).loop.max_steps is None



def test_a_combination_names_the_settings_its_parts_disagree_on(capsys):
    """``lora+freeze``: freeze.toml's lr (5e-5) replaces lora.toml's (5e-4), and stderr says so."""
    cfg = E.parse_args(["--method=lora+freeze"])
    assert cfg.optim.lr == 5e-5
    err = capsys.readouterr().err
    assert "lr = 5e-05 from freeze.toml replaces 0.0005 from lora.toml" in err and "--lr" in err
    assert E.parse_args(["--method=lora+freeze", "--lr=1e-3"]).optim.lr == 1e-3
    E.parse_args(["--method=lora"])
    E.parse_args(["--method=bitfit+prefix"])  # both set lr 1e-3, weight decay 0.01, batch 32, 10 epochs
    assert "note:" not in capsys.readouterr().err

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


def short_lora_run(out, task_dir: str, task: str, steps: int) -> tuple[dict, list[dict]]:
    """``(summary, metrics lines)`` of a LoRA run of ``steps`` steps at length 64 on the real
    data (skips the test when it is absent)."""
    from jpeft.data.glue import default_data_dir

    if not (default_data_dir() / task_dir / "train.tsv").is_file():
        pytest.skip("real GLUE data not found")
    code = E.main(["--method=lora", f"--task={task}", f"--max-steps={steps}", "--max-length=64",
                   "--eval-every=1000", "--progress=false", f"--output-dir={out}"])
    assert code == 0
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), lines


@pytest.mark.real
def test_short_lora_run_beats_majority_on_sst2(tmp_path, minilm_dir):
    out = tmp_path / "run"
    summary, lines = short_lora_run(out, "SST-2", "sst2", 150)
    for key in ("task", "method", "metrics", "trainable_params", "total_params", "steps", "wall_s"):
        assert key in summary
    assert summary["trainable_params"] == 74_498 and summary["steps"] == 150
    majority = summary["majority_baseline"]["accuracy"]
    assert summary["metrics"]["accuracy"] > majority + 0.15, summary
    assert summary["compilations"]["train_step"] <= 3  # buckets 16, 32 and 64
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


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_regression_head_starts_at_the_label_mean(model_type):
    """The regression output bias is the only leaf changed; the output moves by exactly the value."""
    import jax.numpy as jnp

    from jpeft.core import paths as P
    from tests.helpers import tiny_batch, tiny_bert

    model, base = tiny_bert(num_labels=1, model_type=model_type)
    started = E.start_regression_head_at(base, model.info().head_patterns, 2.5)
    changed = [p for p, v in P.flatten(started).items() if not np.array_equal(v, P.flatten(base)[p])]
    assert changed == [f"head/{'out_proj' if model_type == 'roberta' else 'classifier'}/bias"]
    batch = tiny_batch(num_labels=1)
    before = model.apply({"params": base}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], deterministic=True)
    after = model.apply({"params": started}, batch["input_ids"], batch["attention_mask"],
                        batch["token_type_ids"], deterministic=True)
    np.testing.assert_allclose(after - before, jnp.full_like(before, 2.5 - float(P.flatten(base)[changed[0]][0])),
                               atol=1e-5)


def test_regression_head_refuses_a_classification_head():
    from tests.helpers import tiny_bert

    model, base = tiny_bert(num_labels=3)
    with pytest.raises(ValueError, match="one regression output bias of shape"):
        E.start_regression_head_at(base, model.info().head_patterns, 1.0)


@pytest.mark.real
def test_stsb_run_starts_at_the_label_variance(tmp_path, minilm_dir):
    """With the head's bias at the label mean the first MSE is about the label variance (2.3 on
    STS-B train), not mean² + variance (9.6) as with a zero bias."""
    summary, lines = short_lora_run(tmp_path / "run", "STS-B", "stsb", 4)
    first = next(l for l in lines if l["split"] == "train")
    assert 0.8 < first["loss"] < 5.0, first
    assert set(summary["metrics"]) == {"pearson", "spearmanr"}


def test_bad_regression_bias_is_refused_before_loading(tmp_path, capsys):
    code = E.main(["--task=stsb", "--regression-bias=median", f"--output-dir={tmp_path / 'run'}"])
    assert code == 2 and "choose 'label_mean' or 'zero'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, needle", [
    ("--matmul-dtype=fp8", "--matmul-dtype='fp8'; choose one of float32, bfloat16"),
    ("--mesh=foo=3", "--mesh='foo=3': mesh axis 'foo' unknown"),
    ("--mesh=data=x", "--mesh='data=x'"), ("--mesh=data=64", "needs 64 devices"),
])
def test_bad_matmul_dtype_and_mesh_are_refused_before_the_run_folder(tmp_path, capsys, flag, needle):
    code = E.main([flag, f"--data-dir={tmp_path / 'none'}", f"--output-dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
