"""A tiny BERT model folder and tiny GLUE / E2E data on disk, for running the experiment CLIs
end to end in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

WORDS = ["good", "bad", "great", "awful", "fine", "poor", "nice", "dull", "film", "plot", "the",
         "a", "is", "was", "very", "not"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_model_dir(root: Path, seed: int = 0) -> Path:
    """``root/model`` (``root/model-<seed>`` for another seed): a 2-layer BERT (hidden 16) as a
    Hugging Face folder with a WordPiece vocab."""
    import jax

    from jpeft.checkpoint.export import export_merged_hf
    from jpeft.methods import build
    from tests.helpers import tiny_bert

    folder = root / ("model" if seed == 0 else f"model-{seed}")
    if (folder / "model.safetensors").is_file():
        return folder
    model, params = tiny_bert(seed=seed)
    vocab = SPECIAL + WORDS + [f"w{i}" for i in range(64 - len(SPECIAL) - len(WORDS))]
    tok = root / f"tok-{seed}"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tok / "tokenizer_config.json").write_text('{"do_lower_case": true, "model_max_length": 40}')
    transform = build("lora")
    delta = transform.init(jax.random.key(0), params, model.info())
    export_merged_hf(folder, model, transform, params, delta, tokenizer_dir=tok)
    return folder


def tiny_glue_dir(root: Path, rows: int = 48, seed: int = 0) -> Path:
    """``root/glue/SST-2/{train,dev}.tsv``: sentences whose label is whether 'good' words win."""
    rng = np.random.default_rng(seed)
    folder = root / "glue" / "SST-2"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", rows), ("dev.tsv", 16)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            words = list(rng.choice(WORDS, size=6))
            label = int(sum(w in ("good", "great", "fine", "nice") for w in words)
                        > sum(w in ("bad", "awful", "poor", "dull") for w in words))
            lines.append(" ".join(words) + f"\t{label}")
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder.parent


def glue_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["--method=lora", "--task=sst2", f"--model={model}", f"--data-dir={data}",
            f"--output-dir={out}", "--max-steps=4", "--batch-size=8", "--eval-batch-size=16",
            "--max-length=16", "--progress=false", *extra]
