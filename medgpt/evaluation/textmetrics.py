"""Reference-based text metrics for generated answers: ROUGE-L (rouge-score) and BLEU (sacrebleu).

Chinese has no spaces, so both segment it by characters:
  ROUGE-L  tokens are lower-cased runs of ASCII letters and digits (what rouge-score's own tokenizer keeps,
           without stemming) plus every CJK character on its own; rouge-score's default tokenizer would
           drop Chinese text entirely.
  BLEU     sacrebleu's `13a` tokenizer, or `zh` (13a plus one token per Chinese character) when any
           reference holds Chinese characters; the tokenizer used is reported beside the score.
"""

from __future__ import annotations

import re

_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_HAS_CJK = re.compile(f"[{_CJK}]")
_TOKEN = re.compile(f"[a-z0-9]+|[{_CJK}]")


def has_cjk(text: str) -> bool:
    return bool(_HAS_CJK.search(text or ""))


def tokenize(text: str) -> list[str]:
    """ROUGE tokens: lower-cased ASCII words and numbers, one token per CJK character; punctuation dropped."""
    return _TOKEN.findall((text or "").lower())


class _Tokenizer:
    """rouge-score's tokenizer interface (`tokenize(text) -> list[str]`)."""

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text)


_scorer = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (0..1) of one answer against its reference."""
    global _scorer
    if _scorer is None:
        from rouge_score import rouge_scorer

        _scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())
    return float(_scorer.score(reference, prediction)["rougeL"].fmeasure)


def bleu_tokenizer(references: list[str]) -> str:
    return "zh" if any(has_cjk(r) for r in references) else "13a"


def corpus_bleu(predictions: list[str], references: list[str]) -> tuple[float, str]:
    """(corpus BLEU on sacrebleu's 0..100 scale, the tokenizer used); one reference per answer."""
    from sacrebleu.metrics import BLEU

    tok = bleu_tokenizer(references)
    return float(BLEU(tokenize=tok).corpus_score(list(predictions), [list(references)]).score), tok
