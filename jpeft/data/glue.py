"""GLUE through ``datasets``: local TSV copies (original GLUE layout) or the Hub, tokenisation,
and deterministic bucketed batches.

Local files are read with the ``csv`` builder of ``datasets`` (tab separated, no CSV quoting: GLUE
text contains bare ``"`` characters; no NA parsing: "null" and "NA" are words; every column read
as a string) and normalised to the Hub's schema (``nyu-mll/glue``): the task's text fields,
``label`` (a ``ClassLabel`` with the Hub's names, ``float32`` for STS-B) and ``idx`` (``int32``).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jpeft.data.batching import (  # noqa: F401  (re-exported)
    batch_plan,
    bucket_length,
    default_buckets,
    epoch_order,
    num_batches,
    num_epoch_batches,
    padded_batches,
)

if TYPE_CHECKING:  # pragma: no cover
    import datasets

HUB_DATASET = "nyu-mll/glue"
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its Hub config and columns, labels, official metrics and local file layout."""

    name: str
    dir_name: str
    hub_config: str
    text_fields: tuple[str, ...]
    num_labels: int
    metric_names: tuple[str, ...]
    main_metric: str
    dev_split: str = "validation"
    # The Hub's class names, in label-id order (empty for regression).
    label_names: tuple[str, ...] = ()
    # Local TSV layout: the file's column names when it has no header row (CoLA), the columns
    # holding text_fields (same order) and the label, and the dev file's name.
    columns: tuple[str, ...] | None = None
    local_text: tuple[str, ...] = ()
    local_label: str = "label"
    dev_file: str = "dev.tsv"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("cola", "CoLA", "cola", ("sentence",), 2, ("matthews_correlation",),
                 "matthews_correlation", label_names=("unacceptable", "acceptable"),
                 columns=("source", "label", "marker", "sentence"), local_text=("sentence",)),
        GlueTask("sst2", "SST-2", "sst2", ("sentence",), 2, ("accuracy",), "accuracy",
                 label_names=("negative", "positive"), local_text=("sentence",)),
        GlueTask("mrpc", "MRPC", "mrpc", ("sentence1", "sentence2"), 2, ("accuracy", "f1"),
                 "accuracy", label_names=("not_equivalent", "equivalent"),
                 local_text=("#1 String", "#2 String"), local_label="Quality"),
        GlueTask("stsb", "STS-B", "stsb", ("sentence1", "sentence2"), 1, ("pearson", "spearmanr"),
                 "pearson", local_text=("sentence1", "sentence2"), local_label="score"),
        GlueTask("rte", "RTE", "rte", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy",
                 label_names=_NLI2, local_text=("sentence1", "sentence2")),
        GlueTask("wnli", "WNLI", "wnli", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy",
                 label_names=("not_entailment", "entailment"), local_text=("sentence1", "sentence2")),
        GlueTask("qnli", "QNLI", "qnli", ("question", "sentence"), 2, ("accuracy",), "accuracy",
                 label_names=_NLI2, local_text=("question", "sentence")),
        GlueTask("mnli", "MNLI", "mnli", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy",
                 dev_split="validation_matched",
                 label_names=("entailment", "neutral", "contradiction"),
                 local_text=("sentence1", "sentence2"), local_label="gold_label",
                 dev_file="dev_matched.tsv"),
        GlueTask("qqp", "QQP", "qqp", ("question1", "question2"), 2, ("accuracy", "f1"), "accuracy",
                 label_names=("not_duplicate", "duplicate"),
                 local_text=("question1", "question2"), local_label="is_duplicate"),
    ]
}


def get_task(name: str | GlueTask) -> GlueTask:
    """Look a task up by key or directory name, case-insensitively (``sst2``, ``SST-2``, ``sts-b``)."""
    if isinstance(name, GlueTask):
        return name
    key = str(name).strip().lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def default_data_dir() -> Path:
    """``$JPEFT_GLUE_DIR`` if set, else ``<repo root>/../shared/data/glue``."""
    env = os.environ.get("JPEFT_GLUE_DIR")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "glue").resolve()


def _normalise_split(task: GlueTask, split: str) -> str:
    """``train`` or ``validation`` (``dev`` and the task's Hub dev split name are aliases);
    MNLI also has ``validation_mismatched``."""
    if split in ("dev", "validation", task.dev_split):
        return "validation"
    if split == "train" or (task.name == "mnli" and split == "validation_mismatched"):
        return split
    raise ValueError(f"split must be 'train' or 'validation' (or 'dev'), got {split!r}")


def local_file(task: str | GlueTask, split: str, data_dir: str | os.PathLike[str]) -> Path:
    """Where ``split`` of ``task`` lives in a folder with the original GLUE layout."""
    task = get_task(task)
    split = _normalise_split(task, split)
    name = {"train": "train.tsv", "validation": task.dev_file,
            "validation_mismatched": "dev_mismatched.tsv"}[split]
    return Path(data_dir) / task.dir_name / name


def load_glue(task: str | GlueTask, split: str,
              data_dir: str | os.PathLike[str] | None = None) -> datasets.Dataset:
    """One split of a GLUE task as a ``datasets.Dataset`` with the Hub's columns.

    ``data_dir`` (else the default local copy, see :func:`default_data_dir`) must hold
    ``<TASK>/<split>.tsv`` in the original GLUE layout. With no ``data_dir`` and no local copy at
    all, the Hub dataset ``nyu-mll/glue`` is loaded (needs network access).
    """
    import datasets

    task = get_task(task)
    split = _normalise_split(task, split)
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if data_dir is None and not root.is_dir():
        hub_split = task.dev_split if split == "validation" else split
        return datasets.load_dataset(HUB_DATASET, task.hub_config, split=hub_split)
    path = local_file(task, split, root)
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE file missing: {path}. Provide it in one of two ways: pass --data-dir DIR, a "
            f"folder holding {task.dir_name}/{path.name} in the original GLUE TSV layout; or, with "
            f"network access, use the Hub dataset '{HUB_DATASET}' (config '{task.hub_config}'), "
            "which is loaded when no local GLUE directory exists (no --data-dir and no "
            f"{default_data_dir()}, or set JPEFT_GLUE_DIR)."
        )
    names = list(task.columns) if task.columns is not None else None
    wanted = [*task.local_text, task.local_label]
    kwargs: dict[str, Any] = {
        "delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False, "na_filter": False,
        "encoding": "utf-8-sig",  # MRPC starts with a BOM; harmless elsewhere
        # every wanted column read as a string: no per-chunk type guessing; others are dropped
        "features": datasets.Features({c: datasets.Value("string") for c in wanted}),
    }
    if names is not None:
        kwargs.update(header=None, column_names=names)
    raw = datasets.load_dataset("csv", data_files={"data": str(path)}, split="data", **kwargs)
    return _to_hub_schema(raw, task, path)


def hub_features(task: str | GlueTask) -> datasets.Features:
    """The Hub's features of ``task``: text fields, ``label`` and ``idx``."""
    import datasets

    task = get_task(task)
    label = (datasets.Value("float32") if task.is_regression
             else datasets.ClassLabel(names=list(task.label_names)))
    return datasets.Features({**{f: datasets.Value("string") for f in task.text_fields},
                              "label": label, "idx": datasets.Value("int32")})


def _to_hub_schema(raw: datasets.Dataset, task: GlueTask, path: Path) -> datasets.Dataset:
    import datasets

    columns: dict[str, list[Any]] = {
        hub: list(raw[local]) for hub, local in zip(task.text_fields, task.local_text)}
    labels = list(raw[task.local_label])
    if task.is_regression:
        columns["label"] = [float(x) for x in labels]
    else:
        ids = {n: i for i, n in enumerate(task.label_names)}
        ids.update({str(i): i for i in range(task.num_labels)})
        try:
            columns["label"] = [ids[x.strip()] for x in labels]
        except KeyError as e:
            raise ValueError(f"{path}: unknown label {e.args[0]!r} for {task.name} "
                             f"(expected one of {sorted(ids)})") from None
    columns["idx"] = list(range(len(labels)))
    return datasets.Dataset.from_dict(columns, features=hub_features(task))


# ------------------------------------------------------------------------------------------------
# Tokenisation and batching.


@dataclasses.dataclass
class Encoded:
    """A tokenised split as numpy arrays, padded to its longest example (at most max_length)."""

    input_ids: np.ndarray       # (N, L) int32, padded with the tokenizer's pad id
    attention_mask: np.ndarray  # (N, L) int32
    token_type_ids: np.ndarray  # (N, L) int32
    labels: np.ndarray          # (N,) int32, float32 for regression
    lengths: np.ndarray         # (N,) int32, number of real tokens
    pad_id: int = 0             # used when a batch is padded past the split's width

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def encode(dataset: Any, tokenizer: Any, task: str | GlueTask, max_length: int = 128) -> Encoded:
    """Tokenise a split with a (fast) HF tokenizer: sentence pairs for two-field tasks,
    truncation to ``max_length``, padding only to the split's longest example."""
    task = get_task(task)
    texts = [list(dataset[f]) for f in task.text_fields]
    out = tokenizer(*texts, truncation=True, max_length=max_length, padding="longest",
                    return_tensors="np", return_token_type_ids=True, return_attention_mask=True)
    mask = np.asarray(out["attention_mask"], dtype=np.int32)
    label_dtype = np.float32 if task.is_regression else np.int32
    return Encoded(
        input_ids=np.asarray(out["input_ids"], dtype=np.int32),
        attention_mask=mask,
        token_type_ids=np.asarray(out["token_type_ids"], dtype=np.int32),
        labels=np.asarray(list(dataset["label"]), dtype=label_dtype),
        lengths=mask.sum(axis=1).astype(np.int32),
        pad_id=int(tokenizer.pad_token_id or 0),
    )


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
    group_by_length: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield batches of shape ``(batch_size, bucket)`` in the order of :func:`batch_plan`.

    Keys: input_ids, attention_mask, token_type_ids, labels and weights (float32, 1 for real
    rows). A short last batch is filled up to ``batch_size`` with copies of its first row that
    have weight 0. ``start_batch`` skips that many batches of this epoch (resuming).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = batch_plan(enc, batch_size, buckets=buckets, shuffle=shuffle, seed=seed, epoch=epoch,
                      drop_remainder=drop_remainder, group_by_length=group_by_length)
    columns = {"input_ids": (enc.input_ids, enc.pad_id), "attention_mask": (enc.attention_mask, 0),
               "token_type_ids": (enc.token_type_ids, 0), "labels": (enc.labels, None)}
    yield from padded_batches(columns, plan[start_batch:], batch_size)
