"""The PyTorch + PEFT side of the jpeft/PEFT comparison: jpeft's schedule and decay rule, LoRA's
target layers, a short run of both methods on a tiny random BERT, and the side-by-side table."""

from __future__ import annotations

import json

import pytest

from experiments import peft_compare as C
from experiments.peft_compare import decays, lr_factor

pytest.importorskip("torch")
pytest.importorskip("peft")


@pytest.mark.parametrize("total, warmup, schedule", [(100, 0.06, "linear"), (37, 0.1, "cosine"),
                                                     (10, 0.0, "linear"), (50, 0.06, "constant")])
def test_lr_factor_is_jpeft_schedule(total, warmup, schedule):
    from jpeft.train.optim import OptimConfig, learning_rate_schedule

    sched = learning_rate_schedule(OptimConfig(lr=1.0, warmup_ratio=warmup, schedule=schedule), total)
    for step in range(total + 2):
        assert lr_factor(step, total, warmup, schedule) == pytest.approx(float(sched(step)), abs=1e-6)


def test_decay_rule_is_jpeft_rule():
    assert decays("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight")
    assert decays("bert.embeddings.word_embeddings.weight") and decays("classifier.weight")
    assert decays("base_model.model.classifier.modules_to_save.default.weight")
    assert not decays("base_model.model.classifier.modules_to_save.default.bias")
    assert not decays("bert.encoder.layer.3.output.LayerNorm.weight")
    assert not decays("bert.encoder.layer.3.output.dense.bias")


WORDS = "good bad fine awful great poor nice dull the a movie film plot is was very not".split()


def _tiny_model(path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(str(path))
    config = BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=24, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(path))


def _tiny_glue(root):
    import random

    rng = random.Random(0)
    for split, n in (("train", 40), ("dev", 16)):
        (root / "SST-2").mkdir(parents=True, exist_ok=True)
        rows = ["sentence\tlabel"] + [f"{' '.join(rng.choices(WORDS, k=5))}\t{i % 2}" for i in range(n)]
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        (root / "MRPC").mkdir(parents=True, exist_ok=True)
        rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"] + [
            f"{i % 2}\t{i}\t{i + 1}\t{' '.join(rng.choices(WORDS, k=4))}\t{' '.join(rng.choices(WORDS, k=6))}"
            for i in range(n)]
        (root / "MRPC" / f"{split}.tsv").write_text("\n".join(rows) + "\n")


def test_short_runs_on_a_tiny_bert_and_the_side_by_side_table(tmp_path):
    from experiments.glue import parse_args

    _tiny_model(tmp_path / "model")
    _tiny_glue(tmp_path / "glue")
    extra = (f"--model={tmp_path / 'model'} --data-dir={tmp_path / 'glue'} --max-steps=3 "
             "--batch-size=8 --eval-batch-size=8")
    out, ours = tmp_path / "peft", tmp_path / "jpeft"
    code = C.main(["--tasks=sst2,mrpc", "--methods=lora,full", "--seeds=0", f"--out={out}",
                   f"--jpeft={ours}", f"--extra={extra}"])
    assert code == 0
    lora = json.loads((out / "runs" / "mrpc-lora-s0" / "summary.json").read_text())
    full = json.loads((out / "runs" / "sst2-full-s0" / "summary.json").read_text())
    assert lora["steps"] == full["steps"] == 3 and set(lora["metrics"]) == {"accuracy", "f1"}
    # 2 layers × (query, value) × (A: 16×8 + B: 8×16), plus the classifier (16×2 + 2)
    assert lora["trainable_params"] == 2 * 2 * 256 + 34
    assert full["trainable_params"] == full["total_params"]
    cfg = parse_args(["--method=lora", "--task=mrpc", *extra.split()])
    assert lora["config"]["lr"] == cfg.optim.lr and lora["config"]["lora"]["r"] == cfg.lora.r
    assert lora["config"]["weight_decay"] == cfg.optim.weight_decay and lora["config"]["batch_size"] == 8

    # jpeft's side: a run with PEFT's recipe 1 point higher, another with a different recipe
    for name, summary, shift, lr in (("mrpc-lora-s0", lora, 0.01, None), ("sst2-full-s0", full, 0.0, 1.0)):
        run = ours / "runs" / name
        run.mkdir(parents=True)
        mine = {**summary, "metrics": {k: v + shift for k, v in summary["metrics"].items()}}
        if lr is not None:
            mine["config"] = {**mine["config"], "lr": lr}
        (run / "summary.json").write_text(json.dumps(mine))
    assert C.main(["--table", "--seeds=0", f"--out={out}", f"--jpeft={ours}"]) == 0
    md = (out / "results.md").read_text()
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in md.splitlines()
            if line.startswith("| ") and "---" not in line}
    assert "| +1.0 | no (≤ 0.5) | same |" in rows["mrpc", "lora"]
    assert "| +0.0 | yes (≤ 0.5) | differ |" in rows["sst2", "full"]
    assert "| – |" in rows["sst2", "lora"]  # no jpeft run of that cell


def test_unsupported_recipes_are_refused():
    from experiments.glue import parse_args

    with pytest.raises(ValueError, match="comparison runs"):
        C.check_recipe(parse_args(["--method=bitfit", "--task=mrpc"]))
    with pytest.raises(ValueError, match="group_lr"):
        C.check_recipe(parse_args(["--method=lora", "--task=mrpc", "--group-lr={\"head\": 10}"]))
    C.check_recipe(parse_args(["--method=lora", "--task=mrpc"]))


def test_a_stopped_run_resumes_with_the_same_steps(tmp_path, monkeypatch):
    """Interrupted after 5 of 7 updates, the run resumes from its step-4 checkpoint and logs the
    same losses, gradient norms and dev metrics as the run that was never stopped."""
    import torch

    from experiments.glue import parse_args

    _tiny_model(tmp_path / "model")
    _tiny_glue(tmp_path / "glue")
    cfg = parse_args(["--method=lora", "--task=sst2", f"--model={tmp_path / 'model'}",
                      f"--data-dir={tmp_path / 'glue'}", "--max-steps=7", "--eval-every=3",
                      "--batch-size=8", "--eval-batch-size=8"])
    whole = C.run(cfg, tmp_path / "whole", save_every=0)

    step = torch.optim.AdamW.step
    calls = {"n": 0}

    def stop_at_the_fifth(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", stop_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        C.run(cfg, tmp_path / "stopped", save_every=2)
    meta = json.loads((tmp_path / "stopped" / C.CHECKPOINT / "meta.json").read_text())
    assert meta["step"] == 4 and not (tmp_path / "stopped" / "summary.json").exists()
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    resumed = C.run(cfg, tmp_path / "stopped", save_every=2)

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert rows("stopped") == rows("whole") and len(rows("whole")) == 7 + 3
    assert resumed["metrics"] == whole["metrics"] and resumed["steps"] == 7
    assert not (tmp_path / "stopped" / C.CHECKPOINT).exists()  # removed with the summary

    # a checkpoint of another recipe is refused, naming the fix
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(torch.optim.AdamW, "step", stop_at_the_fifth)
        calls["n"] = 0
        C.run(cfg, tmp_path / "other", save_every=2)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    other = parse_args(["--method=lora", "--task=sst2", f"--model={tmp_path / 'model'}",
                        f"--data-dir={tmp_path / 'glue'}", "--max-steps=7", "--eval-every=3",
                        "--batch-size=8", "--eval-batch-size=8", "--lr=1e-2"])
    with pytest.raises(ValueError, match="another recipe.*lr.*delete the run's folder"):
        C.run(other, tmp_path / "other", save_every=2)


@pytest.mark.parametrize("flags, needle", [
    (["--seeds=0,,1"], "without empty entries"), (["--seeds=-1"], "--seeds entry=-1 is out of range"),
    (["--seeds=a"], "give comma-separated integers"), (["--tasks=foo"], "unknown GLUE task 'foo'"),
    (["--methods=lorax"], "unknown method(s) ['lorax']"), (["--methods=bitfit"], "this comparison runs lora, full"),
    (["--methods=lora,lora"], "names lora twice"), (["--save-every=-1"], "--save-every=-1"),
    (["--extra=--lr=\"3"], "No closing quotation"), ("file", "is a file; pass a folder"),
])
def test_bad_arguments_are_refused_before_any_run(tmp_path, capsys, monkeypatch, flags, needle):
    out = tmp_path / "out"
    if flags == "file":
        out.write_text("x")
        flags = []
    monkeypatch.setattr(C, "run", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as exc:
        C.main(["--tasks=sst2", "--methods=lora", "--seeds=0", f"--out={out}", f"--jpeft={tmp_path}", *flags])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and needle in err and "Traceback" not in err
    assert not out.is_dir()


def test_a_failed_run_leaves_no_run_folder(tmp_path, capsys):
    out = tmp_path / "out"
    code = C.main(["--tasks=sst2", "--methods=lora", "--seeds=0", f"--out={out}", f"--jpeft={tmp_path}",
                   f"--extra=--data-dir={tmp_path / 'none'}"])
    err = capsys.readouterr().err
    assert code == 1 and "sst2-lora-s0: error: GLUE file missing" in err and "Traceback" not in err
    assert not (out / "runs" / "sst2-lora-s0").exists()
