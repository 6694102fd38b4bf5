"""Scores against sacreBLEU called directly, and the perfect and zero cases."""

from __future__ import annotations

import unicodedata

import pytest
import sacrebleu

from tformer import evaluation
from tformer.config import ConfigError, TrainConfig, experiment_from_dict
from tformer.data.tokenizer import normalize
from tformer.evaluation import EvaluationError, bleu_metric, normalization_advice, score, tokenization_advice

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


def test_each_score_has_sacrebleus_own_signature_lowercased_bleu_included() -> None:
    """The lowercased BLEU had no signature: printed and in --json without one, it could not be told from
    a cased score in a table. Each signature is the one sacreBLEU gives for the same metric."""
    from sacrebleu.metrics import BLEU, CHRF

    scores = score(HYPOTHESES, REFERENCES)
    for metric, signature in [
        (BLEU(), scores.bleu_signature),
        (BLEU(lowercase=True), scores.bleu_lowercase_signature),
        (CHRF(), scores.chrf_signature),
    ]:
        metric.corpus_score(HYPOTHESES, [REFERENCES])
        assert signature == str(metric.get_signature())
    assert "|case:lc|" in scores.bleu_lowercase_signature and "|case:mixed|" in scores.bleu_signature
    assert f"BLEU lowercase {scores.bleu_lowercase:.2f} ({scores.bleu_lowercase_signature})" in scores.summary()
    assert scores.to_dict()["bleu_lowercase_signature"] == scores.bleu_lowercase_signature


SECOND_REFERENCES = ["A cat sat on the mat.", "a dog barks loudly", "It is raining today."]


def test_several_references_equal_sacrebleus_multi_reference_scores() -> None:
    scores = score(HYPOTHESES, REFERENCES, SECOND_REFERENCES)
    both = [REFERENCES, SECOND_REFERENCES]
    assert scores.bleu == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, both).score)
    assert scores.bleu_lowercase == pytest.approx(sacrebleu.corpus_bleu(HYPOTHESES, both, lowercase=True).score)
    assert scores.chrf == pytest.approx(sacrebleu.corpus_chrf(HYPOTHESES, both).score)
    assert scores.bleu > score(HYPOTHESES, REFERENCES).bleu  # the second set matches lines 2 and 3 better
    assert "nrefs:2" in scores.bleu_signature and scores.chrf_signature.startswith("nrefs:2")
    with pytest.raises(EvaluationError, match="3 hypotheses but reference set 2 has 2 references"):
        score(HYPOTHESES, REFERENCES, SECOND_REFERENCES[:2])


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


JAPANESE = ["猫が座る", "犬が走る", "お茶が好きです"]


def test_bleu_tokenisation_for_text_written_without_spaces() -> None:
    """Under 13a a Japanese or Chinese sentence is one word: a perfect translation scored BLEU 0, and a
    run that stopped or picked its best checkpoint on BLEU did so on noise."""
    assert score(JAPANESE, JAPANESE).bleu == 0.0
    for tokenize in ("zh", "char"):
        scores = score(JAPANESE, JAPANESE, tokenize=tokenize)
        assert scores.bleu == pytest.approx(100.0) and f"tok:{tokenize}|" in scores.bleu_signature
    hypotheses = ["猫が走る", "犬が走る", "お茶が嫌いです"]
    expected = sacrebleu.corpus_bleu(hypotheses, [JAPANESE], tokenize="zh").score
    assert score(hypotheses, JAPANESE, tokenize="zh").bleu == pytest.approx(expected)
    with pytest.raises(EvaluationError, match="unknown BLEU tokenisation 'flores200'"):
        score(JAPANESE, JAPANESE, tokenize="flores200")


def test_advice_when_references_are_written_without_spaces() -> None:
    assert "zh (Chinese), ja-mecab (Japanese) or char" in tokenization_advice(JAPANESE, "13a")
    assert "\n" not in tokenization_advice(JAPANESE, "intl")
    assert tokenization_advice(JAPANESE, "zh") == ""
    assert tokenization_advice(REFERENCES, "13a") == ""
    assert tokenization_advice(["Das ist gut, 猫."], "13a") == ""  # a few such characters in Latin text


def test_advice_is_given_once_more_than_half_the_letters_are_written_without_spaces() -> None:
    """UNSPACED_SHARE: 3 of 5 letters Chinese is mostly Chinese (advice), 2 of 4 is not."""
    assert "zh (Chinese)" in tokenization_advice(["猫狗鸟 ab"], "13a")
    assert tokenization_advice(["猫狗 ab"], "13a") == ""
    assert "zh (Chinese)" in tokenization_advice(["猫狗 1234, 5678!"], "13a")  # digits and punctuation: no letters


def test_advice_when_references_are_thai() -> None:
    assert "zh (Chinese), ja-mecab (Japanese) or char" in tokenization_advice(["แมวนั่งบนเสื่อ"], "13a")


def test_advice_when_references_hold_what_normalisation_changes() -> None:
    """Translations come out NFKC-normalised (the tokenizer's normalize), so a reference's full-width
    comma never matches: an exact translation of these references scored BLEU 62 and chrF 50 without
    a word of why."""
    chinese = ["我们今天去公园，天气很好！", "你好吗？我很好。", "他说：“好的”。"]
    perfect = [normalize(text) for text in chinese]
    assert score(perfect, chinese, tokenize="zh").bleu < 70
    advice = normalization_advice(chinese)
    assert "3 of 3 references" in advice and "'，' -> ','" in advice and "\n" not in advice
    assert normalization_advice(REFERENCES) == ""
    assert normalization_advice(["Ein Satz\u00a0: mit  Leerzeichen", "Ça va"]) == ""  # spaces and NFC letters: no cost
    assert normalization_advice(["Das kostet ½ Euro.", *REFERENCES * 40]) == ""  # one line in 121: not worth a warning


def test_advice_shows_decomposed_accents_and_spacing_accents_as_they_change() -> None:
    """Czech references in NFD (decomposed accents, as macOS tools write them) never match the NFC letters
    of a translation; the advice named no character at all, as each mark alone is left as it is, and
    showed '´' (used as an apostrophe) as a bare combining mark, hiding the space NFKC puts before it."""
    czech = [unicodedata.normalize("NFD", "Muž v modré košili."), unicodedata.normalize("NFD", "Žena běží.")]
    assert score([normalize(text) for text in czech], czech).chrf < 80
    advice = normalization_advice(czech)
    assert "decomposed accents, Unicode NFD" in advice and "'z\\u030c' -> 'ž'" in advice and "\n" not in advice
    assert "'´' -> '\\u0020\\u0301'" in normalization_advice(["L´homme est là."])
    assert "NFD" not in normalization_advice(["我们今天去公园，天气很好！"])
    # a mark after a space belongs to no letter: it was joined to the word before, showing a 'ｘ\u0301' never there
    assert "changes ('ｘ' -> 'x', '！' -> '!');" in normalization_advice(["ｘ \u0301y！"])


def test_a_tokenisation_whose_packages_are_missing_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def without_mecab(**options):
        raise RuntimeError("\nJapanese tokenization requires extra dependencies, but you do not have them installed.")

    monkeypatch.setattr(evaluation, "BLEU", without_mecab)
    with pytest.raises(EvaluationError, match=r"^BLEU tokenisation ja-mecab needs .*pip install 'sacrebleu\[ja\]'$"):
        bleu_metric("ja-mecab")


def test_training_config_takes_a_bleu_tokenisation() -> None:
    assert TrainConfig(bleu_tokenize="zh").bleu_tokenize == "zh"
    assert TrainConfig().bleu_tokenize == "13a"
    with pytest.raises(ConfigError, match="bleu_tokenize"):
        experiment_from_dict({"train": {"bleu_tokenize": "flores200"}})


def test_tokenized_hypotheses_give_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    """SacreBLEU logged three lines for each BLEU it computed (two per `score`, each validation)."""
    hypotheses = ["a man is riding a bike ."] * 100
    with pytest.warns(UserWarning, match=r"^100 or more translations end in a tokenized period") as caught:
        scores = score(hypotheses, hypotheses)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert caplog.records == []
    assert scores.bleu == pytest.approx(100.0) and "tok:13a" in scores.bleu_signature


def test_one_string_is_refused_not_scored_character_by_character() -> None:
    """`score("a cat", "a cat")` scored each character as a segment of its own (chrF 100, BLEU of
    one-letter segments) and returned numbers that looked like an answer."""
    with pytest.raises(TypeError, match=r"^hypotheses must be a list of strings \(one per segment\), not one str"):
        score("a cat sat", ["a cat sat"])
    with pytest.raises(TypeError, match=r"^references must be a list of strings"):
        score(["a cat sat"], ["a cat sat"], "a cat sat")
