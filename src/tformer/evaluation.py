"""Corpus-level translation quality with sacreBLEU: cased BLEU, lowercased BLEU and chrF, each
reported with its signature so that numbers can be compared across papers and runs.

Scores are computed on detokenized text against one reference per segment, or several (each set of
references aligned with the hypotheses, as in sacreBLEU's multi-reference scoring), as sacreBLEU intends.
BLEU splits text into words with sacreBLEU's `13a` tokenisation by default; text written without
spaces needs another (`zh` for Chinese, `ja-mecab` for Japanese, `ko-mecab` for Korean, `char`):
under `13a` a whole Chinese or Japanese sentence is one word, so even a perfect translation can score
0. `tokenization_advice` says so when the references look like such text. chrF reads characters and
needs no tokenisation. Translations come out in the form the tokenizer normalises text to (NFKC:
full-width punctuation becomes ASCII, `…` three periods): `normalization_advice` says so when many
references hold characters that no translation can then match.

SacreBLEU's own check for tokenized hypotheses (100 or more ending in " .") logs three lines on every
BLEU computed, twice per validation while training; here it is one warning line, given once.
"""

from __future__ import annotations

import unicodedata
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

from sacrebleu.metrics import BLEU, CHRF

from tformer.config import BLEU_TOKENIZE
from tformer.data.scripts import mostly_unspaced
from tformer.data.tokenizer import Tokenizer, normalize

EXTRAS = {"ja-mecab": "ja", "ko-mecab": "ko"}  # tokenisations that need `pip install 'sacrebleu[XX]'`
NORMALIZED_SHARE = 0.01  # of the references, from which characters normalisation changes are worth a warning
TOKENIZED_LINES = 100  # hypotheses ending in " ." from which sacreBLEU suspects tokenized text
TOKENIZED_WARNING = (
    "100 or more translations end in a tokenized period (' .'): BLEU expects detokenized text, so "
    "scores of tokenized text are not comparable with published ones"
)


class EvaluationError(ValueError):
    """Hypotheses and references cannot be scored together."""


@dataclass(frozen=True)
class Scores:
    bleu: float
    bleu_lowercase: float
    chrf: float
    bleu_signature: str
    chrf_signature: str
    bleu_lowercase_signature: str  # case:lc: a lowercased score is not comparable with a cased one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"BLEU {self.bleu:.2f} ({self.bleu_signature})\n"
            f"BLEU lowercase {self.bleu_lowercase:.2f} ({self.bleu_lowercase_signature})\n"
            f"chrF {self.chrf:.2f} ({self.chrf_signature})"
        )


def score(hypotheses: list[str], references: list[str], *more_references: list[str], tokenize: str = "13a") -> Scores:
    """BLEU (words split by sacreBLEU's `tokenize`), lowercased BLEU and chrF of `hypotheses` against
    aligned `references`, and against every further set of aligned references given (multi-reference)."""
    reference_sets = [references, *more_references]
    for name, lines in [("hypotheses", hypotheses), *(("references", aligned) for aligned in reference_sets)]:
        if isinstance(lines, str):  # sacreBLEU would score each of its characters as a segment
            raise TypeError(f"{name} must be a list of strings (one per segment), not one str: wrap it in a list")
    for number, aligned in enumerate(reference_sets, start=1):
        if len(hypotheses) != len(aligned):
            references_found = f"reference set {number} has {len(aligned)}" if more_references else len(aligned)
            raise EvaluationError(
                f"{len(hypotheses)} hypotheses but {references_found} references; they must be aligned line by line"
            )
    if not references:
        raise EvaluationError("nothing to score: no references")
    bleu, bleu_lower = bleu_metric(tokenize), bleu_metric(tokenize, lowercase=True)
    chrf = CHRF()
    if sum(hypothesis.endswith(" .") for hypothesis in hypotheses) >= TOKENIZED_LINES:
        warnings.warn(TOKENIZED_WARNING, UserWarning, stacklevel=2)
    return Scores(
        bleu=bleu.corpus_score(hypotheses, reference_sets).score,
        bleu_lowercase=bleu_lower.corpus_score(hypotheses, reference_sets).score,
        chrf=chrf.corpus_score(hypotheses, reference_sets).score,
        bleu_signature=str(bleu.get_signature()),
        chrf_signature=str(chrf.get_signature()),
        bleu_lowercase_signature=str(bleu_lower.get_signature()),
    )


def bleu_metric(tokenize: str, *, lowercase: bool = False) -> BLEU:
    """sacreBLEU's BLEU with one of BLEU_TOKENIZE; a missing optional package is a one-line error."""
    if tokenize not in BLEU_TOKENIZE:
        raise EvaluationError(f"unknown BLEU tokenisation {tokenize!r}; choose one of: {', '.join(BLEU_TOKENIZE)}")
    try:
        return BLEU(tokenize=tokenize, lowercase=lowercase, force=True)  # score() does sacreBLEU's check
    except (RuntimeError, ImportError):  # sacreBLEU's MeCab tokenisers without their packages
        raise EvaluationError(
            f"BLEU tokenisation {tokenize} needs packages that are not installed: "
            f"pip install 'sacrebleu[{EXTRAS.get(tokenize, tokenize)}]'"
        ) from None


def tokenization_advice(references: list[str], tokenize: str) -> str:
    """A one-line warning when most of the references' letters are Chinese, Japanese or Thai and
    `tokenize` is one that splits words at spaces (13a, intl); "" otherwise."""
    if tokenize not in ("13a", "intl"):
        return ""
    if not mostly_unspaced(references):
        return ""
    return (
        f"the references are mostly Chinese, Japanese or Thai, written without spaces, which BLEU's {tokenize} "
        "tokenisation reads as one word per sentence (near 0 even for good translations): score BLEU with "
        "zh (Chinese), ja-mecab (Japanese) or char (--tokenize, or train.bleu_tokenize while training)"
    )


def normalization_advice(references: list[str]) -> str:
    """A one-line warning when at least NORMALIZED_SHARE of the references hold characters that the
    tokenizer's normalisation changes (full-width punctuation in Chinese, `…`): translations never
    hold them, so even a perfect one loses BLEU and chrF there; "" otherwise. Spacing is not counted:
    neither metric reads it."""
    changed = [text for text in references if normalize(text).split() != text.split()]
    if not changed or len(changed) < NORMALIZED_SHARE * len(references):
        return ""
    clusters = Counter(cluster for text in changed for cluster in _clusters(text) if _nfkc(cluster) != cluster)
    shown = ", ".join(f"'{_escaped(c)}' -> '{_escaped(_nfkc(c))}'" for c, _ in clusters.most_common(3))
    decomposed = " (decomposed accents, Unicode NFD)" if any(_nfc(text) != text for text in changed) else ""
    return (
        f"{len(changed)} of {len(references)} references hold characters{decomposed} that the tokenizer's "
        f"normalisation (Unicode NFKC) changes{f' ({shown})' if shown else ''}; translations never hold them, so "
        "even a perfect one loses BLEU and chrF there: to compare like with like, score against references passed "
        "through tformer.data.tokenizer.normalize"
    )


def _clusters(text: str) -> list[str]:
    """`text` cut into characters, each with the combining marks after it (`e` + U+0301 is one cluster):
    NFKC changes decomposed accents only as such pairs, never a character alone. A mark after a space starts
    a cluster of its own: it is not the previous word's."""
    clusters: list[str] = []
    after_space = False
    for c in text:
        if clusters and unicodedata.combining(c) and not after_space:
            clusters[-1] += c
        elif not c.isspace():
            clusters.append(c)
        after_space = c.isspace()
    return clusters


def _nfkc(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def _escaped(text: str) -> str:
    """`text` with its combining marks and spaces spelt out (`e\\u0301`, `\\u0020\\u0301`), which would otherwise
    look the same as the composed letter, or vanish, in a terminal."""
    return "".join(f"\\u{ord(c):04x}" if unicodedata.combining(c) or c.isspace() else c for c in text)


def reference_advice(references: list[str], tokenize: str, tokenizer: object) -> list[str]:
    """The warnings that the references call for before they are scored: `tokenization_advice`, and
    `normalization_advice` for a tformer tokenizer (an imported Marian one normalises by its own rule)."""
    advice = [tokenization_advice(references, tokenize)]
    if isinstance(tokenizer, Tokenizer):
        advice.append(normalization_advice(references))
    return [line for line in advice if line]
