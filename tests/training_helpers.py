"""Helpers for the training tests: a tiny synthetic translation corpus and a tiny experiment.

The task is word-by-word translation of a made-up language, learnable by a tiny model in a few
hundred steps, so end-to-end tests exercise real learning without real data.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tformer.config import ExperimentConfig, load_experiment
from tformer.training import start_run

SOURCE_WORDS = ["ka", "lo", "mi", "nu", "pe", "ro", "su", "ti", "va", "zo", "be", "do"]
TARGET_WORDS = ["cat", "dog", "sun", "moon", "tree", "rock", "fish", "bird", "star", "leaf", "rain", "snow"]


def write_corpus(directory: Path, *, n_train: int = 200, n_valid: int = 12, seed: int = 0) -> dict[str, Path]:
    """train.src/.tgt and valid.src/.tgt under `directory`; returns their paths by name."""
    rng = random.Random(seed)
    dictionary = dict(zip(SOURCE_WORDS, TARGET_WORDS, strict=True))
    paths = {}
    for split, count in (("train", n_train), ("valid", n_valid)):
        sources, targets = [], []
        for _ in range(count):
            words = [rng.choice(SOURCE_WORDS) for _ in range(rng.randint(2, 6))]
            sources.append(" ".join(words))
            targets.append(" ".join(dictionary[word] for word in words))
        for side, lines in (("src", sources), ("tgt", targets)):
            path = directory / f"{split}.{side}"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8")
            paths[f"{split}_{side}"] = path
    return paths


def tiny_experiment(corpus: dict[str, Path], *overrides: str, valid: bool = True) -> ExperimentConfig:
    """A tiny model and short schedule over `corpus`; `overrides` are `section.key=value` strings."""
    settings = [
        "model.preset=tiny",
        f"data.train_src='{corpus['train_src']}'",
        f"data.train_tgt='{corpus['train_tgt']}'",
        "data.vocab_size=48",
        "train.max_tokens=256",
        "train.max_steps=8",
        "train.warmup_steps=4",
        "train.schedule=peak",
        "train.peak_lr=0.005",
        "train.log_every=1",
        "train.valid_every=4",
        "train.save_every=4",
        "train.device=cpu",
        "decode.beam_size=2",
        "decode.max_len_b=8",
    ]
    if valid:
        settings += [f"data.valid_src='{corpus['valid_src']}'", f"data.valid_tgt='{corpus['valid_tgt']}'"]
    return load_experiment(None, [*settings, *overrides])


def trained_run(directory: Path, *overrides: str, n_train: int) -> Path:
    """DIRECTORY/run, a tiny run over a corpus of `n_train` pairs written beside it, trained on one thread (a
    module fixture's, which its tests share: copy it to change it)."""
    corpus = write_corpus(directory, n_train=n_train)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start_run(tiny_experiment(corpus, *overrides), directory / "run", quiet=True).train()
    finally:
        torch.set_num_threads(before)
    return directory / "run"
