"""Scores against sacreBLEU called directly, and the perfect and zero cases."""

from __future__ import annotations

import pytest
import sacrebleu

from tformer.evaluation import EvaluationError, score

HYPOTHESES = ["The cat sat on the mat.", "a dog barks loudly", "It is raining today"]
REFERENCES = ["The cat sat on the mat.", "A dog barks loudly.", "Today it rains."]


def test_scores_equal_sacrebleu_called_directly() -> None:
    scores = score(HYPOTHESES, REFERENCES)
    assert scores.bleu == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score)
    assert scores.bleu_lowercase == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], lowercase=True).score)
    assert scores.chrf == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, [REFERENCES]).score)
    assert scores.bleu_lowercase > scores.bleu  # "a dog" only matches when lowercased
    assert "case:mixed|" in scores.bleu_signature and "tok:13a" in scores.bleu_signature
    assert scores.chrf_signature.startswith("nrefs:1")


def test_perfect_and_zero_scores() -> None:
    perfect = score(REFERENCES, REFERENCES)
    assert perfect.bleu == pytest.approx(100.0) and perfect.chrf == pytest.approx(100.0)
    zero = score(["xyz qqq"] * 3, REFERENCES)
    assert zero.bleu == 0.0 and zero.bleu_lowercase == 0.0


def test_misaligned_or_empty_inputs_are_user_errors() -> None:
    with pytest.raises(EvaluationError, match="2 hypotheses but 3 references"):
        score(HYPOTHESES[:2], REFERENCES)
    with pytest.raises(EvaluationError, match="nothing to score"):
        score([], [])
    assert issubclass(EvaluationError, ValueError)
