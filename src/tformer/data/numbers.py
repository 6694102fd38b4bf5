"""The built-in demo corpus: English number words to German number words, e.g.

    342021 -> "three hundred forty-two thousand twenty-one" -> "dreihundertzweiundvierzigtausendeinundzwanzig"

It needs no download, any amount of it is free, and it exercises what translation needs: reordering
("forty-two" -> "zweiundvierzig"), compounding, and forms that depend on context ("one" is "eins" standing
alone and at the end, as in "einhunderteins", but "ein" inside a word: "einundzwanzig", "einhunderteintausend").
The test and validation numbers never occur in training, so a model must generalise rather than memorise.

Forms, taken from `num2words` with two normalisations:
- English drops "and" and commas (num2words' British "one hundred and one thousand, two hundred"
  becomes "one hundred one thousand two hundred"), so every number has one spelling with no optional
  words.
- German fixes one num2words error: a thousands count ending in "eins" becomes "ein" before "tausend"
  (num2words writes "einhunderteinstausend" for 101000; German is "einhunderteintausend").

Spelling every number with num2words takes about 80 microseconds per language, far too slow for
300k pairs, so each number below 1000 is spelled once and numbers up to 999_999 are composed as
"<thousands> thousand <rest>". `tests/test_numbers.py` checks the composition against num2words itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

MAX_SUPPORTED = 999_999

NumberPair = tuple[int, str, str]  # (number, english, german)


@dataclass(frozen=True)
class NumberSplits:
    """Train / validation / test triples (number, english, german); no number is in two splits."""

    train: list[NumberPair]
    valid: list[NumberPair]
    test: list[NumberPair]


def english(n: int) -> str:
    """English words for 0 <= n <= 999_999, without "and" or commas."""
    units = _english_below_thousand()
    _check_range(n)
    thousands, rest = divmod(n, 1000)
    if thousands == 0:
        return units[rest]
    words = f"{units[thousands]} thousand"
    return f"{words} {units[rest]}" if rest else words


def german(n: int) -> str:
    """German words for 0 <= n <= 999_999, written as one word as German does."""
    units = _german_below_thousand()
    _check_range(n)
    thousands, rest = divmod(n, 1000)
    if thousands == 0:
        return units[rest]
    prefix = units[thousands]
    if prefix.endswith("eins"):
        prefix = prefix[:-1]  # "eins" is the number standing alone; "ein" in compounds
    return prefix + "tausend" + (units[rest] if rest else "")


def normalize_english(text: str) -> str:
    """num2words' English with "and" and commas removed: the form `english` produces."""
    return " ".join(word for word in text.replace(",", " ").split() if word != "and")


def make_number_splits(
    *,
    n_train: int,
    n_valid: int,
    n_test: int,
    max_number: int = MAX_SUPPORTED,
    seed: int,
    balanced_fraction: float = 0.0,
) -> NumberSplits:
    """Distinct numbers drawn uniformly from [0, max_number], dealt into the three splits.

    With `balanced_fraction` > 0, that share of the training numbers is drawn instead from a
    digit-balanced distribution (`balanced_numbers`), so short forms such as "two hundred one" or
    "four thousand two", which a uniform draw almost never produces (numbers below 1000 are 0.1% of
    the range), are seen often enough to be learnt. Validation and test numbers stay uniform and never
    occur in training; balanced draws may repeat a number within training.
    """
    counts = {"n_train": n_train, "n_valid": n_valid, "n_test": n_test}
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"{name} must be non-negative, got {value}")
    if not 0 < max_number <= MAX_SUPPORTED:
        raise ValueError(f"max_number must be in 1..{MAX_SUPPORTED}, got {max_number}")
    if not 0.0 <= balanced_fraction <= 1.0:
        raise ValueError(f"balanced_fraction must be in [0, 1], got {balanced_fraction}")
    n_balanced = round(n_train * balanced_fraction)
    n_uniform = n_train - n_balanced
    total = n_uniform + n_valid + n_test
    if total > max_number + 1:
        raise ValueError(f"{total} distinct numbers requested but only {max_number + 1} exist in 0..{max_number}")
    rng = np.random.default_rng(seed)
    numbers = rng.choice(max_number + 1, size=total, replace=False).tolist()
    held_out = set(numbers[n_uniform:])
    balanced = balanced_numbers(rng, n_balanced, max_number=max_number, exclude=held_out)
    train_numbers = numbers[:n_uniform] + balanced
    rng.shuffle(train_numbers)
    return NumberSplits(
        train=_triples(train_numbers),
        valid=_triples(numbers[n_uniform : n_uniform + n_valid]),
        test=_triples(numbers[n_uniform + n_valid :]),
    )


def _triples(numbers: list[int]) -> list[NumberPair]:
    return [(n, english(n), german(n)) for n in numbers]


def balanced_numbers(rng: np.random.Generator, count: int, *, max_number: int, exclude: set[int]) -> list[int]:
    """`count` numbers whose thousands part and rest are each 0, or 1, 2 or 3 digits long, with equal odds."""
    lowest, highest = np.array([0, 1, 10, 100]), np.array([0, 9, 99, 999])
    drawn: list[int] = []
    while len(drawn) < count:
        size = 2 * (count - len(drawn)) + 16
        thousands_digits, rest_digits = rng.integers(0, 4, size), rng.integers(0, 4, size)
        thousands = rng.integers(lowest[thousands_digits], highest[thousands_digits] + 1)
        rest = rng.integers(lowest[rest_digits], highest[rest_digits] + 1)
        candidates = (thousands * 1000 + rest).tolist()
        drawn += [n for n in candidates if n <= max_number and n not in exclude][: count - len(drawn)]
    return drawn


def write_number_corpus(splits: NumberSplits, directory: str | Path) -> dict[str, Path]:
    """Write train/valid/test .en and .de files, one sentence per line, aligned; returns name -> path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for split, triples in (("train", splits.train), ("valid", splits.valid), ("test", splits.test)):
        for language, column in (("en", 1), ("de", 2)):
            path = directory / f"{split}.{language}"
            try:
                path.write_text("".join(f"{triple[column]}\n" for triple in triples), encoding="utf-8")
            except OSError as error:  # a full disk's error from write() names no file
                if error.filename is not None or error.errno is None:
                    raise
                raise OSError(error.errno, error.strerror, str(path)) from None
            written[f"{split}.{language}"] = path
    return written


def _check_range(n: int) -> None:
    if not 0 <= n <= MAX_SUPPORTED:
        raise ValueError(f"number {n} is outside 0..{MAX_SUPPORTED}")


# num2words is imported where it is used: only the number-words task needs it, and `tformer.data` (which
# every training run imports) must not fail where it is missing.
@cache
def _english_below_thousand() -> tuple[str, ...]:
    from num2words import num2words

    return tuple(normalize_english(num2words(n, lang="en")) for n in range(1000))


@cache
def _german_below_thousand() -> tuple[str, ...]:
    from num2words import num2words

    return tuple(num2words(n, lang="de") for n in range(1000))
