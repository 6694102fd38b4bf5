"""Corpus-level translation quality with sacreBLEU: cased BLEU (13a tokenisation), lowercased BLEU
and chrF, each reported with its signature so that numbers can be compared across papers and runs.

Scores are computed on detokenized text against one reference per segment, as sacreBLEU intends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sacrebleu.metrics import BLEU, CHRF


class EvaluationError(ValueError):
    """Hypotheses and references cannot be scored together."""


@dataclass(frozen=True)
class Scores:
    bleu: float
    bleu_lowercase: float
    chrf: float
    bleu_signature: str
    chrf_signature: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"BLEU {self.bleu:.2f} ({self.bleu_signature})\n"
            f"BLEU lowercase {self.bleu_lowercase:.2f}\n"
            f"chrF {self.chrf:.2f} ({self.chrf_signature})"
        )


def score(hypotheses: list[str], references: list[str]) -> Scores:
    """BLEU, lowercased BLEU and chrF of `hypotheses` against aligned `references`."""
    if len(hypotheses) != len(references):
        raise EvaluationError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; they must be aligned line by line"
        )
    if not references:
        raise EvaluationError("nothing to score: no references")
    bleu, bleu_lower, chrf = BLEU(), BLEU(lowercase=True), CHRF()
    return Scores(
        bleu=bleu.corpus_score(hypotheses, [references]).score,
        bleu_lowercase=bleu_lower.corpus_score(hypotheses, [references]).score,
        chrf=chrf.corpus_score(hypotheses, [references]).score,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
    )
