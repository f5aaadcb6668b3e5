"""GLUE through ``datasets``: local TSV copies (original GLUE layout) or the Hub, tokenisation,
and deterministic bucketed batches.

Local files are read with the ``csv`` builder of ``datasets`` (tab separated, no CSV quoting: GLUE
text contains bare ``"`` characters; no NA parsing: "null" is a word) and normalised to the Hub's
schema (``nyu-mll/glue``): the task's text fields, ``label`` (int; float for STS-B) and ``idx``.
"""

from __future__ import annotations

import dataclasses
import csv
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HUB_DATASET = "nyu-mll/glue"


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task: where its files are, its columns, labels and official metrics."""

    name: str
    dir_name: str
    hub_config: str
    text_fields: tuple[str, ...]
    num_labels: int
    metric_names: tuple[str, ...]
    main_metric: str
    dev_split: str = "validation"
    # local layout: file columns (None: the file has a header row) and which are text/label
    columns: tuple[str, ...] | None = None
    local_text: tuple[str, ...] = ()
    local_label: str = "label"
    label_names: tuple[str, ...] = ()
    dev_file: str = "dev.tsv"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", "cola", ("sentence",), 2, ("matthews_correlation",),
                 "matthews_correlation", columns=("source", "label", "marker", "sentence"),
                 local_text=("sentence",)),
        GlueTask("sst2", "SST-2", "sst2", ("sentence",), 2, ("accuracy",), "accuracy",
                 local_text=("sentence",)),
        GlueTask("mrpc", "MRPC", "mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"),
                 "accuracy", local_text=("#1 String", "#2 String"), local_label="Quality"),
        GlueTask("stsb", "STS-B", "stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"),
                 "pearson", local_text=("sentence1", "sentence2"), local_label="score"),
        GlueTask("rte", "RTE", "rte", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy",
                 local_text=("sentence1", "sentence2"), label_names=("entailment", "not_entailment")),
        GlueTask("wnli", "WNLI", "wnli", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy",
                 local_text=("sentence1", "sentence2")),
        GlueTask("qnli", "QNLI", "qnli", ("question", "sentence"), 2, ("accuracy",), "accuracy",
                 local_text=("question", "sentence"), label_names=("entailment", "not_entailment")),
        GlueTask("mnli", "MNLI", "mnli", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy",
                 dev_split="validation_matched", local_text=("sentence1", "sentence2"),
                 local_label="gold_label", label_names=("entailment", "neutral", "contradiction"),
                 dev_file="dev_matched.tsv"),
        GlueTask("qqp", "QQP", "qqp", ("question1", "question2"), 2, ("accuracy", "f1"), "accuracy",
                 local_text=("question1", "question2"), local_label="is_duplicate"),
    ]
}


def get_task(name: str | GlueTask) -> GlueTask:
    """Look a task up by key or directory name (``sst2``, ``SST-2``, ``sts-b`` ...)."""
    if isinstance(name, GlueTask):
        return name
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def default_data_dir() -> Path:
    """``$JPEFT_GLUE_DIR``, else ``../shared/data/glue`` beside the repository."""
    env = os.environ.get("JPEFT_GLUE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "glue"


def _split_file(task: GlueTask, split: str) -> str:
    return "train.tsv" if split == "train" else task.dev_file


def _normalise_split(split: str) -> str:
    if split in ("dev", "validation", "validation_matched"):
        return "validation"
    if split != "train":
        raise ValueError(f"split must be 'train' or 'validation' (or 'dev'), got {split!r}")
    return split


def load_glue(task: str | GlueTask, split: str, data_dir: str | os.PathLike[str] | None = None):
    """One split of a GLUE task as a ``datasets.Dataset`` with the Hub's columns.

    ``data_dir`` (or the default local copy) must hold ``<TASK>/<split>.tsv`` in the original
    GLUE layout. With no ``data_dir`` and no local copy, the Hub dataset ``nyu-mll/glue`` is
    loaded (needs the network).
    """
    import datasets

    task = get_task(task)
    split = _normalise_split(split)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is None and not root.is_dir():
        hub_split = task.dev_split if split == "validation" else split
        return datasets.load_dataset(HUB_DATASET, task.hub_config, split=hub_split)
    path = root / task.dir_name / _split_file(task, split)
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE file missing: {path}. Provide it with --data-dir=DIR, a folder holding "
            f"{task.dir_name}/{path.name} in the original GLUE TSV layout, or, with network access "
            f"and no local copy, the Hub dataset '{HUB_DATASET}' (config '{task.hub_config}') is "
            "loaded through `datasets`."
        )
    kwargs: dict[str, Any] = dict(delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False,
                                  na_filter=False, encoding="utf-8-sig")
    if task.columns is not None:
        kwargs.update(header=None, column_names=list(task.columns))
    raw = datasets.load_dataset("csv", data_files={split: str(path)}, split=split, **kwargs)
    return _to_hub_schema(raw, task)


def _to_hub_schema(raw, task: GlueTask):
    import datasets

    columns: dict[str, Any] = {}
    for hub_name, local_name in zip(task.text_fields, task.local_text):
        columns[hub_name] = [str(x) for x in raw[local_name]]
    labels = raw[task.local_label]
    if task.is_regression:
        columns["label"] = [float(x) for x in labels]
        label_type = datasets.Value("float32")
    else:
        if task.label_names:
            index = {n: i for i, n in enumerate(task.label_names)}
            columns["label"] = [index[str(x)] for x in labels]
        else:
            columns["label"] = [int(x) for x in labels]
        label_type = datasets.Value("int64")
    columns["idx"] = list(range(len(labels)))
    features = datasets.Features({
        **{name: datasets.Value("string") for name in task.text_fields},
        "label": label_type,
        "idx": datasets.Value("int32"),
    })
    return datasets.Dataset.from_dict(columns, features=features)


# ------------------------------------------------------------------------------------------------
# Tokenisation and batching.


@dataclasses.dataclass
class Encoded:
    """A tokenised split as numpy arrays, padded to the longest example (≤ max_length)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    token_type_ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode(dataset, tokenizer, task: str | GlueTask, max_length: int = 128) -> Encoded:
    """Tokenise a split (pairs for two-field tasks), truncating to ``max_length``."""
    task = get_task(task)
    texts = [list(dataset[f]) for f in task.text_fields]
    out = tokenizer(*texts, truncation=True, max_length=max_length, padding="longest",
                    return_tensors="np", return_token_type_ids=True)
    mask = out["attention_mask"].astype(np.int32)
    label_dtype = np.float32 if task.is_regression else np.int32
    return Encoded(
        input_ids=out["input_ids"].astype(np.int32),
        attention_mask=mask,
        token_type_ids=out["token_type_ids"].astype(np.int32),
        labels=np.asarray(list(dataset["label"]), dtype=label_dtype),
        lengths=mask.sum(axis=1).astype(np.int32),
    )


def default_buckets(max_length: int) -> tuple[int, ...]:
    """Powers of two from 16 up to ``max_length``, always ending with ``max_length``."""
    buckets = [b for b in (16, 32, 64, 128, 256, 512, 1024, 2048) if b < max_length]
    return tuple(buckets + [max_length])


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ≥ ``length``."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}; add a bucket "
                     "or lower --max-length")


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    return n // batch_size if drop_remainder else -(-n // batch_size)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The example order of one epoch: a permutation fixed by ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng((seed, epoch)).permutation(n)


def batch_plan(enc: Encoded, batch_size: int, *, buckets: Sequence[int], shuffle: bool,
               seed: int = 0, epoch: int = 0, drop_remainder: bool = False,
               group_by_length: bool = True) -> list[tuple[np.ndarray, int]]:
    """One epoch's batches as ``(example indices, padded length)``, a function of (seed, epoch).

    With ``group_by_length`` the shuffled examples are sorted into their length buckets and
    batched within a bucket (at most one short batch per bucket), then the batch order is
    shuffled: far less padding on short-text tasks. Otherwise consecutive examples of the
    shuffled order form a batch, padded to the bucket of its longest example.
    """
    n = len(enc)
    order = epoch_order(n, seed, epoch, shuffle)
    groups: list[np.ndarray]
    if group_by_length:
        target = np.array([bucket_length(int(l), buckets) for l in enc.lengths[order]])
        groups = [order[target == b] for b in sorted(set(target.tolist()))]
    else:
        groups = [order]
    plan: list[tuple[np.ndarray, int]] = []
    for group in groups:
        stop = len(group) - len(group) % batch_size if drop_remainder else len(group)
        for start in range(0, stop, batch_size):
            idx = group[start:start + batch_size]
            plan.append((idx, bucket_length(int(enc.lengths[idx].max()), buckets)))
    if shuffle and group_by_length:
        perm = np.random.default_rng((seed, epoch, 1)).permutation(len(plan))
        plan = [plan[i] for i in perm]
    return plan


def num_epoch_batches(enc: Encoded, batch_size: int, *, buckets: Sequence[int],
                      drop_remainder: bool = False, group_by_length: bool = True) -> int:
    """Batches per epoch (the same for every epoch: bucket sizes do not depend on the order)."""
    return len(batch_plan(enc, batch_size, buckets=buckets, shuffle=False,
                          drop_remainder=drop_remainder, group_by_length=group_by_length))


def iterate_batches(
    enc: Encoded,
    batch_size: int,
    *,
    buckets: Sequence[int],
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    drop_remainder: bool = False,
    group_by_length: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of shape ``(batch_size, bucket)`` (see :func:`batch_plan`); a short batch is padded
    with rows of weight 0. ``start_batch`` skips that many batches of this epoch (resuming)."""
    plan = batch_plan(enc, batch_size, buckets=buckets, shuffle=shuffle, seed=seed, epoch=epoch,
                      drop_remainder=drop_remainder, group_by_length=group_by_length)
    for idx, length in plan[start_batch:]:
        real = len(idx)
        pad_rows = batch_size - real
        rows = np.concatenate([idx, np.repeat(idx[:1], pad_rows)]) if pad_rows else idx

        def take(a: np.ndarray) -> np.ndarray:
            out = a[rows, :length]
            if out.shape[1] < length:
                out = np.pad(out, ((0, 0), (0, length - out.shape[1])))
            return out

        weights = np.zeros(batch_size, np.float32)
        weights[:real] = 1.0
        yield {
            "input_ids": take(enc.input_ids),
            "attention_mask": take(enc.attention_mask),
            "token_type_ids": take(enc.token_type_ids),
            "labels": enc.labels[rows],
            "weights": weights,
        }
