"""The E2E NLG Challenge data (Novikova et al., 2017) for decoder LMs: loading, ``[MR; reference]``
sequences with the loss on the reference, left-padded prompts for decoding.

Splits are the challenge's CSV files (``mr,ref`` columns, one pair per row) read from a local
folder (``trainset.csv``, ``devset.csv``, ``testset_w_refs.csv``; default ``$JPEFT_E2E_DIR``, else
``<repo>/../shared/data/e2e``) or, when that folder does not exist, from the Hub dataset
``tuetschek/e2e_nlg`` (columns ``meaning_representation``, ``human_reference``). Either way the
result is a ``datasets.Dataset`` with columns ``mr`` and ``ref``.

A training example is ``prompt(mr) + " " + ref + EOS``, with ``prompt(mr) = "Data: {mr}\\nText:"``;
``loss_mask`` is 1 on the reference tokens and EOS only, so the causal LM loss
(:func:`jpeft.train.trainer.causal_lm_loss`) is ``-Σ log p(ref, EOS | prompt)`` per token.
For decoding, :func:`group_references` collects every reference of each distinct MR (the test
set has 630 MRs with 4,693 references); :func:`prompt_batches` left-pads the prompts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jpeft.data.batching import batch_plan, padded_batches

HUB_DATASET = "tuetschek/e2e_nlg"
FILES = {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
_SPLIT_ALIASES = {"dev": "validation", "devset": "validation", "trainset": "train", "testset": "test"}
PROMPT_TEMPLATE = "Data: {mr}\nText:"


def default_data_dir() -> Path:
    """``$JPEFT_E2E_DIR`` if set, else ``<repo root>/../shared/data/e2e``."""
    env = os.environ.get("JPEFT_E2E_DIR")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "e2e").resolve()


def _split(split: str) -> str:
    split = _SPLIT_ALIASES.get(split, split)
    if split not in FILES:
        raise ValueError(f"unknown E2E split {split!r}; choose one of {', '.join(FILES)} (or dev)")
    return split


def load_e2e(split: str, data_dir: str | os.PathLike[str] | None = None) -> Any:
    """One split as a ``datasets.Dataset`` with string columns ``mr`` and ``ref``.

    ``data_dir=None`` uses :func:`default_data_dir` when it exists, else the Hub
    (``tuetschek/e2e_nlg``, needs the network). A given ``data_dir`` must hold the CSV file.
    """
    import datasets

    split = _split(split)
    folder = Path(data_dir) if data_dir is not None else default_data_dir()
    path = folder / FILES[split]
    if path.is_file():
        features = datasets.Features({"mr": datasets.Value("string"), "ref": datasets.Value("string")})
        # keep_default_na=False: "NA"/"null" are words, not missing values.
        ds = datasets.load_dataset("csv", data_files={split: str(path)}, split=split, features=features,
                                   keep_default_na=False, na_filter=False, encoding="utf-8")
        return ds
    if data_dir is not None:
        raise FileNotFoundError(f"{path} does not exist; --data-dir must hold the E2E files "
                                f"{', '.join(FILES.values())} (from tuetschek/e2e-dataset)")
    try:
        ds = datasets.load_dataset(HUB_DATASET, split=split)
    except Exception as err:  # network errors, offline mode ...
        raise FileNotFoundError(
            f"no local E2E data at {folder} and the Hub dataset {HUB_DATASET} is not reachable "
            f"({type(err).__name__}: {err}); pass --data-dir=FOLDER holding {FILES[split]} or set "
            "JPEFT_E2E_DIR") from err
    return ds.rename_columns({"meaning_representation": "mr", "human_reference": "ref"}).select_columns(["mr", "ref"])


def prompt_text(mr: str) -> str:
    """The model's input for one meaning representation (the reference follows after a space)."""
    return PROMPT_TEMPLATE.format(mr=mr)


def group_references(dataset: Any) -> tuple[list[str], list[list[str]]]:
    """Distinct MRs in order of first appearance and, for each, all its references."""
    refs: dict[str, list[str]] = {}
    for mr, ref in zip(dataset["mr"], dataset["ref"]):
        refs.setdefault(mr, []).append(ref)
    return list(refs), list(refs.values())


@dataclasses.dataclass
class LMEncoded:
    """Tokenised ``[prompt; reference; EOS]`` sequences, right-padded to the longest one."""

    input_ids: np.ndarray       # (N, L) int32
    attention_mask: np.ndarray  # (N, L) int32
    loss_mask: np.ndarray       # (N, L) int32: 1 on reference tokens and EOS
    lengths: np.ndarray         # (N,) int32 real tokens
    pad_id: int = 0

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def target_tokens(self) -> int:
        return int(self.loss_mask.sum())


def _eos(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no EOS token; E2E sequences end with one")
    return int(tokenizer.eos_token_id)


def encode(dataset: Any, tokenizer: Any, max_length: int = 128) -> LMEncoded:
    """Tokenise ``mr``/``ref`` pairs as ``[prompt; " " + ref; EOS]`` (no other special tokens).

    A sequence longer than ``max_length`` keeps its whole prompt and loses the end of its reference
    (the EOS included); a prompt alone longer than ``max_length`` is an error.
    """
    eos = _eos(tokenizer)
    prompts = tokenizer([prompt_text(m) for m in dataset["mr"]], add_special_tokens=False)["input_ids"]
    targets = tokenizer([" " + r for r in dataset["ref"]], add_special_tokens=False)["input_ids"]
    n = len(prompts)
    ids = np.full((n, max_length), eos, np.int32)
    loss = np.zeros((n, max_length), np.int32)
    lengths = np.zeros(n, np.int32)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        if len(p) >= max_length:
            raise ValueError(f"example {i}: the prompt has {len(p)} tokens, max_length={max_length}; "
                             "raise --max-length")
        seq = (p + t + [eos])[:max_length]
        ids[i, :len(seq)] = seq
        loss[i, len(p):len(seq)] = 1
        lengths[i] = len(seq)
    width = int(lengths.max()) if n else 1
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    return LMEncoded(ids[:, :width], mask, loss[:, :width], lengths, pad_id=eos)


def iterate_batches(enc: LMEncoded, batch_size: int, *, buckets: Sequence[int], shuffle: bool,
                    seed: int = 0, epoch: int = 0, start_batch: int = 0,
                    group_by_length: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """Batches ``input_ids``, ``attention_mask``, ``loss_mask`` ``(batch_size, bucket)`` and
    ``weights`` in the order of :func:`jpeft.data.batching.batch_plan` (resumable by
    ``start_batch``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    plan = batch_plan(enc, batch_size, buckets=buckets, shuffle=shuffle, seed=seed, epoch=epoch,
                      group_by_length=group_by_length)
    columns = {"input_ids": (enc.input_ids, enc.pad_id), "attention_mask": (enc.attention_mask, 0),
               "loss_mask": (enc.loss_mask, 0)}
    yield from padded_batches(columns, plan[start_batch:], batch_size)


def prompt_batches(mrs: Sequence[str], tokenizer: Any, batch_size: int, *, multiple: int = 8
                   ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """``(count, batch)`` of left-padded prompts for generation: ``input_ids`` and
    ``attention_mask`` ``(batch_size, T)``, ``T`` the longest prompt of the batch rounded up to
    ``multiple`` (fewer distinct shapes, fewer compilations); the last batch is filled with copies
    of its first prompt, ``count`` says how many rows are real."""
    pad = _eos(tokenizer)
    ids = tokenizer([prompt_text(m) for m in mrs], add_special_tokens=False)["input_ids"]
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        count = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - count)
        width = -(-max(len(x) for x in chunk) // multiple) * multiple
        input_ids = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for row, seq in enumerate(chunk):
            input_ids[row, width - len(seq):] = seq
            mask[row, width - len(seq):] = 1
        yield count, {"input_ids": input_ids, "attention_mask": mask}


def decode_text(tokenizer: Any, tokens: np.ndarray) -> str:
    """Generated ids up to (without) the first EOS, as stripped text."""
    eos = _eos(tokenizer)
    tokens = list(np.asarray(tokens).tolist())
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


__all__ = ["FILES", "HUB_DATASET", "LMEncoded", "decode_text", "default_data_dir", "encode",
           "group_references", "iterate_batches", "load_e2e", "prompt_batches", "prompt_text"]
