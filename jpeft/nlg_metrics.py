"""Corpus-level text generation metrics as the E2E NLG Challenge reports them.

``e2e_scores(hypotheses, references)`` returns BLEU, NIST, METEOR, ROUGE-L and CIDEr for one
hypothesis per input and a list of references per input (the E2E test set has 1–N references per
meaning representation). Every number comes from an established implementation; nothing here
computes a metric itself:

=========  =====================================================================================
BLEU       ``sacrebleu.corpus_bleu`` (13a tokenisation, case-sensitive: what the challenge's
           ``mteval-v13a`` script computes), on a 0–100 scale, variable reference counts
NIST       ``nltk.translate.nist_score.corpus_nist`` (n = 5) on the same 13a tokens
METEOR     ``pycocoevalcap`` (METEOR 1.5 jar), after its PTB tokeniser (lower case)
ROUGE-L    ``pycocoevalcap`` Rouge (β = 1.2), same tokens
CIDEr      ``pycocoevalcap`` Cider (CIDEr-D as in the COCO code; document frequencies from the
           references of this corpus), same tokens
=========  =====================================================================================

The challenge's ``measure_scores.py`` (tuetschek/e2e-metrics) runs the same pycocoevalcap scorers
on PTB-tokenised text for METEOR, ROUGE-L and CIDEr, and Perl ``mteval-v13a`` for BLEU and NIST.
METEOR and the PTB tokeniser are Java programs: ``java`` must be on the PATH.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Any

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def _check(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists; "
                         "give one list of references per hypothesis")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    empty = [i for i, refs in enumerate(references) if not [r for r in refs if r]]
    if empty:
        raise ValueError(f"inputs {empty[:10]} have no (non-empty) reference")


def bleu_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, 0–100) and NIST-5 (nltk) with 13a tokenisation."""
    import sacrebleu
    from nltk.translate.nist_score import corpus_nist
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    _check(hypotheses, references)
    width = max(len(refs) for refs in references)
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
    bleu = sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize="13a")
    tok = Tokenizer13a()
    nist = corpus_nist([[tok(r).split() for r in refs] for refs in references],
                       [tok(h).split() for h in hypotheses], n=5)
    return {"BLEU": float(bleu.score), "NIST": float(nist)}


def coco_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *,
                per_item: bool = False) -> dict[str, Any]:
    """METEOR, ROUGE-L and CIDEr from ``pycocoevalcap`` after its PTB tokeniser (needs Java):
    corpus scores, or with ``per_item`` the list of each input's scores (CIDEr's n-gram weights
    still come from the whole corpus of references)."""
    if shutil.which("java") is None:
        raise RuntimeError("METEOR and the PTB tokenizer of pycocoevalcap are Java programs and no "
                           "`java` is on the PATH; install a Java runtime (e.g. apt install "
                           "default-jre-headless)")
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    _check(hypotheses, references)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs if r] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    # An empty hypothesis tokenises to "": the scorers need one (possibly empty) string per input.
    res = {i: caps or [""] for i, caps in res.items()}
    scorers = {"METEOR": Meteor(), "ROUGE_L": Rouge(), "CIDEr": Cider()}
    out: dict[str, Any] = {}
    for name, scorer in scorers.items():
        corpus, items = scorer.compute_score(gts, res)
        out[name] = [float(x) for x in items] if per_item else float(corpus)
    return out


def e2e_scores(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU, NIST, METEOR, ROUGE_L and CIDEr of ``hypotheses`` (one string per input) against
    ``references`` (a list of strings per input); see the module docstring."""
    return {**bleu_nist(hypotheses, references), **coco_scores(hypotheses, references)}


__all__ = ["METRICS", "bleu_nist", "coco_scores", "e2e_scores"]
