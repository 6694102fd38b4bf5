"""The number-words demo corpus: spelling matches num2words, splits are disjoint and reproducible."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
from num2words import num2words

from tformer.data.corpus import read_parallel
from tformer.data.numbers import english, german, make_number_splits, normalize_english, write_number_corpus


def test_known_spellings() -> None:
    assert english(0) == "zero" and german(0) == "null"
    assert english(342) == "three hundred forty-two"
    assert german(342) == "dreihundertzweiundvierzig"
    assert english(101_100) == "one hundred one thousand one hundred"
    assert german(101_000) == "einhunderteintausend"  # num2words writes "einhunderteinstausend"
    assert german(1_001) == "eintausendeins"
    assert english(999_999) == "nine hundred ninety-nine thousand nine hundred ninety-nine"


# Written out by hand from German and English grammar, not from num2words: the corpus is built from
# num2words (>= 0.5.13, no upper bound), so comparing with it alone would follow any change it makes.
HAND_CHECKED = {
    0: ("zero", "null"),
    1: ("one", "eins"),  # "eins" standing alone, "ein" in compounds
    11: ("eleven", "elf"),
    12: ("twelve", "zwölf"),
    16: ("sixteen", "sechzehn"),  # not "sechszehn"
    17: ("seventeen", "siebzehn"),  # not "siebenzehn"
    21: ("twenty-one", "einundzwanzig"),
    30: ("thirty", "dreißig"),
    60: ("sixty", "sechzig"),
    70: ("seventy", "siebzig"),
    71: ("seventy-one", "einundsiebzig"),
    100: ("one hundred", "einhundert"),
    101: ("one hundred one", "einhunderteins"),  # no "and" in English; "eins" at the end in German
    116: ("one hundred sixteen", "einhundertsechzehn"),
    1_000: ("one thousand", "eintausend"),
    1_001: ("one thousand one", "eintausendeins"),
    1_100: ("one thousand one hundred", "eintausendeinhundert"),
    21_000: ("twenty-one thousand", "einundzwanzigtausend"),
    100_000: ("one hundred thousand", "einhunderttausend"),
    100_001: ("one hundred thousand one", "einhunderttausendeins"),
    101_000: ("one hundred one thousand", "einhunderteintausend"),
    201_001: ("two hundred one thousand one", "zweihunderteintausendeins"),
    317_060: ("three hundred seventeen thousand sixty", "dreihundertsiebzehntausendsechzig"),
    342_005: ("three hundred forty-two thousand five", "dreihundertzweiundvierzigtausendfünf"),  # README
    999_999: (
        "nine hundred ninety-nine thousand nine hundred ninety-nine",
        "neunhundertneunundneunzigtausendneunhundertneunundneunzig",
    ),
}


@pytest.mark.parametrize("number", sorted(HAND_CHECKED))
def test_spellings_checked_by_hand(number: int) -> None:
    assert (english(number), german(number)) == HAND_CHECKED[number]


def test_composition_matches_num2words_on_a_sample() -> None:
    sample = [*range(0, 2100), 999_999, 100_000, 101_001, *random.Random(7).sample(range(999_999), 400)]
    for n in sample:
        assert english(n) == normalize_english(num2words(n, lang="en")), n
        assert german(n) == num2words(n, lang="de").replace("einstausend", "eintausend"), n


def test_english_has_no_optional_words() -> None:
    for n in random.Random(1).sample(range(999_999), 200):
        words = english(n).split()
        assert "and" not in words and not any("," in w for w in words)


def test_splits_are_disjoint_deterministic_and_sized() -> None:
    splits = make_number_splits(n_train=3000, n_valid=200, n_test=300, max_number=9999, seed=5)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (3000, 200, 300)
    train, valid, test = ({n for n, _, _ in part} for part in (splits.train, splits.valid, splits.test))
    assert len(train) == 3000 and not train & valid and not train & test and not valid & test
    assert max(train | valid | test) <= 9999
    assert make_number_splits(n_train=3000, n_valid=200, n_test=300, max_number=9999, seed=5) == splits
    assert make_number_splits(n_train=3000, n_valid=200, n_test=300, max_number=9999, seed=6) != splits
    number, en, de = splits.test[0]
    assert (en, de) == (english(number), german(number))


def test_300k_pairs_are_drawn_without_repeats() -> None:
    splits = make_number_splits(n_train=300_000, n_valid=1000, n_test=1000, seed=0)
    assert len(splits.train) == 300_000
    assert len({n for n, _, _ in (*splits.train, *splits.valid, *splits.test)}) == 302_000


def test_bad_requests_are_value_errors() -> None:
    with pytest.raises(ValueError, match="12 distinct numbers requested but only 11 exist"):
        make_number_splits(n_train=10, n_valid=1, n_test=1, max_number=10, seed=0)
    with pytest.raises(ValueError, match="max_number must be in"):
        make_number_splits(n_train=1, n_valid=1, n_test=1, max_number=1_000_000, seed=0)
    with pytest.raises(ValueError, match="n_valid must be non-negative"):
        make_number_splits(n_train=1, n_valid=-1, n_test=1, seed=0)
    with pytest.raises(ValueError, match="outside"):
        german(1_000_000)


def test_written_corpus_reads_back_aligned(tmp_path: Path) -> None:
    splits = make_number_splits(n_train=50, n_valid=5, n_test=5, seed=2)
    paths = write_number_corpus(splits, tmp_path / "numbers")
    assert sorted(paths) == sorted(f"{s}.{lang}" for s in ("train", "valid", "test") for lang in ("en", "de"))
    corpus = read_parallel(paths["train.en"], paths["train.de"])
    assert corpus.sources == [en for _, en, _ in splits.train]
    assert corpus.targets == [de for _, _, de in splits.train]


def test_balanced_training_numbers_cover_short_forms_and_never_meet_held_out_ones() -> None:
    splits = make_number_splits(n_train=20_000, n_valid=500, n_test=2_000, seed=3, balanced_fraction=0.5)
    train = [n for n, _, _ in splits.train]
    held_out = {n for n, _, _ in splits.valid} | {n for n, _, _ in splits.test}
    assert len(train) == 20_000 and not held_out & set(train)
    assert sum(n < 1000 for n in train) > 20_000 * 0.5 / 4 * 0.9  # a quarter of balanced draws: thousands part 0
    assert sum(n % 1000 < 10 for n in train) > 20_000 * 0.5 / 4
    assert all(english(n) == e and german(n) == g for n, e, g in splits.train[:200])
    again = make_number_splits(n_train=20_000, n_valid=500, n_test=2_000, seed=3, balanced_fraction=0.5)
    assert again == splits


def test_training_and_the_cli_import_without_num2words() -> None:
    """Only the number-words task needs num2words; a machine without it can still train real data."""
    code = "import sys; sys.modules['num2words'] = None; import tformer.training, tformer.cli.main, tformer.data"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
