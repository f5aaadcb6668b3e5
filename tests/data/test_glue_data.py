"""GLUE loading (local TSV quirks, Hub schema, clear errors) and deterministic bucketed batches."""

import numpy as np
import pytest

from jpeft.data import glue as G

ROWS = {"cola": (8551, 1043), "sst2": (67349, 872), "mrpc": (3668, 408), "stsb": (5749, 1500),
        "rte": (2490, 277), "wnli": (635, 71)}


@pytest.fixture(scope="module")
def glue_dir():
    root = G.default_data_dir()
    if not (root / "SST-2" / "dev.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {root} (set JPEFT_GLUE_DIR)")
    return root


@pytest.mark.real
@pytest.mark.parametrize("task", sorted(ROWS))
def test_local_tasks_load_with_hub_schema(glue_dir, task):
    spec = G.get_task(task)
    for split, rows in zip(("train", "validation"), ROWS[task]):
        ds = G.load_glue(task, split)
        assert len(ds) == rows
        assert ds.column_names == [*spec.text_fields, "label", "idx"]
        labels = np.asarray(list(ds["label"]))
        if spec.is_regression:
            assert labels.dtype.kind == "f" and labels.min() >= 0 and labels.max() <= 5
        else:
            assert set(np.unique(labels)) == {0, 1}


@pytest.mark.real
def test_quotes_bom_and_string_labels(glue_dir):
    mrpc = G.load_glue("mrpc", "dev")
    assert mrpc[0]["sentence2"].startswith('"The foodservice pie business')  # quote kept verbatim
    assert mrpc[0]["label"] == 1  # the BOM did not eat the first column
    rte = G.load_glue("rte", "validation")
    assert rte[0]["label"] == 1  # 'not_entailment' -> 1, as on the Hub
    cola = G.load_glue("cola", "validation")
    assert cola[0]["sentence"] == "The sailors rode the breeze clear of the rocks."
    assert len(G.load_glue("qnli", "validation")) == 5463


@pytest.mark.real
def test_missing_file_names_path_and_both_fixes(glue_dir):
    with pytest.raises(FileNotFoundError) as err:
        G.load_glue("qnli", "train")
    msg = str(err.value)
    assert "QNLI/train.tsv" in msg and "--data-dir" in msg and "nyu-mll/glue" in msg


def test_missing_file_in_user_dir(tmp_path):
    (tmp_path / "RTE").mkdir()
    with pytest.raises(FileNotFoundError, match=r"RTE/dev.tsv.*--data-dir"):
        G.load_glue("rte", "validation", tmp_path)


def test_user_dir_and_unknown_task(tmp_path):
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text('sentence\tlabel\na "quoted" null\t1\nNA\t0\n')
    ds = G.load_glue("SST-2", "train", tmp_path)
    assert list(ds["sentence"]) == ['a "quoted" null', "NA"]
    assert list(ds["label"]) == [1, 0]
    with pytest.raises(ValueError, match="known tasks: cola, sst2"):
        G.get_task("mnli-mm")
    with pytest.raises(ValueError, match="split"):
        G.load_glue("sst2", "test", tmp_path)


def _encoded(n=37, width=20, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, width + 1, n)
    mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)
    return G.Encoded(input_ids=(rng.integers(5, 99, (n, width)) * mask).astype(np.int32),
                     attention_mask=mask, token_type_ids=np.zeros((n, width), np.int32),
                     labels=np.arange(n, dtype=np.int32), lengths=lengths.astype(np.int32))


def test_batches_cover_each_example_once_with_bounded_shapes():
    enc = _encoded()
    plain = list(G.iterate_batches(enc, 8, buckets=(8, 16, 32), shuffle=True, seed=1, epoch=0,
                                   group_by_length=False))
    assert len(plain) == G.num_batches(37, 8) == 5
    assert plain[-1]["weights"].sum() == 37 - 4 * 8
    grouped = list(G.iterate_batches(enc, 8, buckets=(8, 16, 32), shuffle=True, seed=1, epoch=0))
    assert len(grouped) == G.num_epoch_batches(enc, 8, buckets=(8, 16, 32))
    for batches in (plain, grouped):
        seen = np.concatenate([b["labels"][b["weights"] > 0] for b in batches])
        assert sorted(seen.tolist()) == list(range(37))
        for b in batches:
            assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] in (8, 16, 32)
            real = b["weights"] > 0
            assert b["attention_mask"][real].sum(1).max() <= b["input_ids"].shape[1]
            assert b["attention_mask"][~real].sum() == b["attention_mask"][real][:1].sum() * (~real).sum()
    # grouping by length pads less
    padded = lambda bs: sum(b["input_ids"].shape[1] * b["weights"].sum() for b in bs)
    assert padded(grouped) < padded(plain)
    for b in grouped:  # every real row sits in its own bucket
        real = b["weights"] > 0
        lengths = b["attention_mask"][real].sum(1)
        assert all(G.bucket_length(int(l), (8, 16, 32)) == b["input_ids"].shape[1] for l in lengths)


def test_order_is_a_function_of_seed_and_epoch_and_resumable():
    enc = _encoded()
    order = lambda **kw: np.concatenate(
        [b["labels"] for b in G.iterate_batches(enc, 8, buckets=(32,), shuffle=True, **kw)])
    assert np.array_equal(order(seed=1, epoch=0), order(seed=1, epoch=0))
    assert not np.array_equal(order(seed=1, epoch=0), order(seed=1, epoch=1))
    assert not np.array_equal(order(seed=1, epoch=0), order(seed=2, epoch=0))
    tail = order(seed=1, epoch=0, start_batch=2)
    assert np.array_equal(tail, order(seed=1, epoch=0)[16:])


def test_buckets():
    assert G.default_buckets(128) == (16, 32, 64, 128)
    assert G.default_buckets(100) == (16, 32, 64, 100)
    assert G.bucket_length(33, (32, 64)) == 64
    with pytest.raises(ValueError, match="largest bucket"):
        G.bucket_length(65, (32, 64))


@pytest.mark.real
def test_encode_pairs_with_real_tokenizer(glue_dir, minilm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    ds = G.load_glue("mrpc", "validation").select(range(16))
    enc = G.encode(ds, tok, "mrpc", max_length=48)
    assert enc.input_ids.shape == (16, 48) or enc.input_ids.shape[1] <= 48
    assert (enc.token_type_ids.max(axis=1) == 1).all()  # two segments
    assert (enc.lengths == enc.attention_mask.sum(1)).all()
    assert (enc.input_ids[:, 0] == tok.cls_token_id).all()
