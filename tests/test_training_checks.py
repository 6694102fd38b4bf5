"""What a run refuses or reports before it trains on something other than what was asked: separate
vocabularies with shared embeddings, validation pairs over the token budget, and a changed stopping
metric on resume (the logging window across a resume is in test_checkpoint_resume.py, the closing line
of a multi-process run in test_cli_train.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import tiny_experiment, write_corpus

from tformer.cli.main import main
from tformer.config import ConfigError
from tformer.data.tokenizer import Tokenizer
from tformer.training import checkpoint as ckpt
from tformer.training import resume_run, start_run
from tformer.training.validation import EarlyStopping

pytestmark = pytest.mark.usefixtures("one_thread")

SHARED_WITH_SEPARATE = "set model.share_embeddings=false, or data.joint_vocab=true"


# ---------------------------------------------------------------- 1: separate vocabularies, one embedding
def test_separate_vocabularies_refuse_shared_embeddings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = write_corpus(tmp_path, n_train=40)
    with pytest.raises(ConfigError, match=SHARED_WITH_SEPARATE):
        start_run(tiny_experiment(corpus, "data.joint_vocab=false"), tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()

    argv = [
        "train", "--out", str(tmp_path / "cli"), "--train-src", str(corpus["train_src"]),
        "--train-tgt", str(corpus["train_tgt"]), "--vocab-size", "48", "--set", "data.joint_vocab=false", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: data.joint_vocab=false") and SHARED_WITH_SEPARATE in err
    assert len(err.strip().splitlines()) == 1

    # a tokenizer directory with separate vocabularies, given with the default share_embeddings=true
    lines = [corpus["train_src"].read_text().splitlines(), corpus["train_tgt"].read_text().splitlines()]
    Tokenizer.train(*lines, vocab_size=48, joint=False).to_files(tmp_path / "tok")
    with_tokenizer = tiny_experiment(corpus, f"data.tokenizer='{tmp_path / 'tok'}'")
    with pytest.raises(ConfigError, match=r"separate source and target vocabularies.*share_embeddings=false"):
        start_run(with_tokenizer, tmp_path / "run", quiet=True)


def test_a_given_tokenizer_says_which_tokenizer_settings_play_no_part(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """data.vocab_size and the other tokenizer-training keys were ignored without a word next to data.tokenizer."""
    corpus = write_corpus(tmp_path, n_train=40)
    lines = [corpus["train_src"].read_text().splitlines(), corpus["train_tgt"].read_text().splitlines()]
    Tokenizer.train(*lines, vocab_size=48).to_files(tmp_path / "tok")
    settings = (f"data.tokenizer='{tmp_path / 'tok'}'", "data.vocab_size=99", "train.max_steps=1")
    capsys.readouterr()
    start_run(tiny_experiment(corpus, *settings, valid=False), tmp_path / "run", quiet=False)
    err = capsys.readouterr().err
    # only what differs from the defaults is named
    assert f"tokenizer: {tmp_path / 'tok'} is used as it is, so data.vocab_size=99 plays no part\n" in err


def test_a_tokenizer_with_fewer_pieces_than_asked_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """data.vocab_size is an upper bound; a small text gave far fewer pieces without a word about it."""
    corpus = write_corpus(tmp_path, n_train=40)
    capsys.readouterr()
    settings = ("data.vocab_size=8000", "train.max_steps=1")
    trainer = start_run(tiny_experiment(corpus, *settings, valid=False), tmp_path / "run", quiet=False)
    pieces = trainer.tokenizer.src_vocab_size
    assert pieces < 8000
    err = capsys.readouterr().err
    assert f"tokenizer: the training text yields {pieces:,} pieces, fewer than data.vocab_size=8,000\n" in err
    start_run(tiny_experiment(corpus, f"data.vocab_size={pieces}", "train.max_steps=1"), tmp_path / "b", quiet=False)
    assert "fewer than data.vocab_size" not in capsys.readouterr().err  # exactly as many as asked: nothing said


def test_separate_vocabularies_train_with_separate_embeddings(tmp_path: Path) -> None:
    corpus = write_corpus(tmp_path, n_train=40)
    settings = ("data.joint_vocab=false", "model.share_embeddings=false", "train.max_steps=1")
    trainer = start_run(tiny_experiment(corpus, *settings, valid=False), tmp_path / "run", quiet=True)
    assert not trainer.tokenizer.joint
    assert (
        trainer.model.state_dict().keys()
        != start_run(tiny_experiment(corpus, "train.max_steps=1", valid=False), tmp_path / "joint", quiet=True)
        .model.state_dict()
        .keys()
    )  # two embedding matrices, not one


# ---------------------------------------------------------------- 2: validation pairs over train.max_tokens
def _long_valid(tmp_path: Path, corpus: dict[str, Path], *, short: int) -> dict[str, Path]:
    """Validation files of `short` short pairs and two long ones (30 words a side)."""
    sources = ["ka lo"] * short + [" ".join(["ka lo mi"] * 10)] * 2
    targets = ["cat dog"] * short + [" ".join(["cat dog sun"] * 10)] * 2
    paths = dict(corpus)
    for side, lines in (("src", sources), ("tgt", targets)):
        paths[f"valid_{side}"] = tmp_path / f"long_valid_{short}.{side}"
        paths[f"valid_{side}"].write_text("\n".join(lines) + "\n")
    return paths


def test_validation_pairs_over_the_token_budget_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corpus = _long_valid(tmp_path, write_corpus(tmp_path, n_train=40), short=3)
    trainer = start_run(tiny_experiment(corpus, "train.max_tokens=24"), tmp_path / "run")
    err = capsys.readouterr().err
    assert "valid: skipped 2 pairs longer than train.max_tokens=24" in err
    assert sum(len(batch.indices) for batch in trainer.data.valid_batches) == 3


def test_validation_pairs_with_an_empty_side_are_counted(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The training data's report was printed, the validation data's not: a development set with empty
    lines was validated and scored on fewer pairs than it has, silently."""
    corpus = dict(write_corpus(tmp_path, n_train=40))
    for side, lines in (("src", ["ka lo", "", "mi nu", "pe"]), ("tgt", ["cat dog", "sun", "moon", "   "])):
        corpus[f"valid_{side}"] = tmp_path / f"gappy.{side}"
        corpus[f"valid_{side}"].write_text("\n".join(lines) + "\n")
    trainer = start_run(tiny_experiment(corpus), tmp_path / "run")
    err = capsys.readouterr().err
    assert "validation data: kept 2 of 4 pairs (skipped 2 with an empty side, 0 over the length limit)" in err
    assert trainer.data.valid_references == ["cat dog", "moon"]


def test_validation_set_with_no_pair_in_the_token_budget_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corpus = _long_valid(tmp_path, write_corpus(tmp_path, n_train=40), short=0)
    with pytest.raises(ConfigError, match=r"every validation pair needs more than train.max_tokens=24 .*raise"):
        start_run(tiny_experiment(corpus, "train.max_tokens=24", "train.patience=2"), tmp_path / "run", quiet=True)
    argv = [
        "train", "--out", str(tmp_path / "cli"), "--train-src", str(corpus["train_src"]),
        "--train-tgt", str(corpus["train_tgt"]), "--valid-src", str(corpus["valid_src"]),
        "--valid-tgt", str(corpus["valid_tgt"]), "--vocab-size", "48", "--max-tokens", "24", "--quiet",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    # the command line typed --max-tokens, so the error names the flag (the Python call above, the key)
    assert err.startswith("error: every validation pair needs more than --max-tokens 24 token slots")
    assert err.strip().endswith("raise --max-tokens")
    assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- 3: a new stopping metric on resume
def test_early_stopping_state_names_its_metric() -> None:
    loss = EarlyStopping("loss", patience=2)
    loss.update(3.0, 1), loss.update(3.5, 2)
    bleu = EarlyStopping("bleu", patience=2)
    assert bleu.load_state_dict(loss.state_dict()).startswith("train.stop_metric changed from loss to bleu")
    assert (bleu.best, bleu.best_step, bleu.bad_evaluations) == (None, 0, 0)
    assert bleu.update(0.5, 3)  # any BLEU is a first best, not compared with a loss of 3.0

    old_format = {key: value for key, value in loss.state_dict().items() if key != "metric"}
    restored = EarlyStopping("loss", patience=2)
    assert restored.load_state_dict(old_format) is None and restored == loss


def test_resume_with_a_new_stop_metric_starts_early_stopping_afresh(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    corpus = write_corpus(tmp_path, n_train=40)
    start_run(tiny_experiment(corpus, "train.max_steps=4"), tmp_path / "run", quiet=True).train()
    same = resume_run(tmp_path / "run", overrides=["train.max_steps=8"])
    assert same.early_stopping.best is not None and same.early_stopping.best_step == 4
    assert "early stopping starts afresh" not in capsys.readouterr().err

    changed = resume_run(tmp_path / "run", overrides=["train.stop_metric=chrf", "train.bleu_every=4"])
    assert changed.early_stopping.metric == "chrf" and changed.early_stopping.best is None
    err = capsys.readouterr().err
    assert "train.stop_metric changed from loss to chrf: early stopping starts afresh" in err


def test_early_stopping_state_names_the_settings_its_metric_was_measured_with() -> None:
    """A BLEU measured with beam 4 and one measured with beam 1 (or a loss with and without label
    smoothing) do not compare: the state keeps the settings, and other ones start it afresh."""
    old = EarlyStopping("bleu", patience=2, measured_with={"decode.beam_size": 4, "train.bleu_tokenize": "13a"})
    old.update(20.0, 4), old.update(19.0, 8)
    same = EarlyStopping("bleu", patience=2, measured_with=dict(old.measured_with))
    assert same.load_state_dict(old.state_dict()) is None and same == old
    other = EarlyStopping("bleu", patience=2, measured_with={"decode.beam_size": 1, "train.bleu_tokenize": "13a"})
    message = other.load_state_dict(old.state_dict())
    assert message == (
        "decode.beam_size changed since the best bleu so far (20 at step 4) was measured: early stopping "
        "starts afresh, comparing only values measured the new way"
    )
    assert (other.best, other.best_step, other.bad_evaluations) == (None, 0, 0)
    older_format = {key: value for key, value in old.state_dict().items() if key != "measured_with"}
    assert other.load_state_dict(older_format) is None and other.best == 20.0  # as measured this way
    added = EarlyStopping("bleu", patience=2, measured_with={**old.measured_with, "decode.new_setting": 1})
    assert added.load_state_dict(old.state_dict()) is None  # a setting a later tformer adds changes nothing


def test_resume_that_changes_how_the_stop_metric_is_measured_starts_early_stopping_afresh(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A resume with --set train.label_smoothing=0 compared the new, unsmoothed validation losses with the
    best smoothed one (higher by the smoothing's entropy term): no step could beat it for a while, and
    with train.patience the run stopped early. A decode setting leaves a loss's state alone."""
    corpus = write_corpus(tmp_path, n_train=40)
    start_run(tiny_experiment(corpus, "train.max_steps=4"), tmp_path / "run", quiet=True).train()
    decode_only = resume_run(tmp_path / "run", overrides=["decode.beam_size=1", "train.max_steps=8"])
    assert decode_only.early_stopping.best_step == 4
    assert "early stopping starts afresh" not in capsys.readouterr().err

    changed = resume_run(tmp_path / "run", overrides=["train.label_smoothing=0.0", "train.max_steps=8"])
    assert changed.early_stopping.best is None
    err = capsys.readouterr().err
    assert "train.label_smoothing changed since the best loss so far (" in err
    assert "early stopping starts afresh, comparing only values measured the new way" in err


@pytest.mark.parametrize(
    ("dropped", "overrides", "line"),
    [
        (("metric", "measured_with"), ["train.stop_metric=chrf", "train.bleu_every=4"], "changed from loss to chrf"),
        (("measured_with",), ["train.label_smoothing=0.0"], "train.label_smoothing changed since the best loss"),
    ],
)
def test_an_older_checkpoint_resumed_with_another_stop_metric_starts_early_stopping_afresh(
    tmp_path: Path, capsys: pytest.CaptureFixture, dropped: tuple[str, ...], overrides: list[str], line: str
) -> None:
    """Checkpoints of older tformer keep early stopping's best value without its metric (or its settings): a
    resume with --set train.stop_metric=bleu took that state as the new metric's, compared BLEUs with the
    best loss (stopped by patience, 'bleu did not improve (best 5.341 at step 30)'); the checkpoint's
    experiment.json says how it was measured."""
    corpus = write_corpus(tmp_path, n_train=40)
    start_run(tiny_experiment(corpus, "train.max_steps=4"), tmp_path / "run", quiet=True).train()
    path = tmp_path / "run" / ckpt.CHECKPOINTS_DIR / ckpt.step_name(4) / ckpt.STATE_FILE
    state = torch.load(path, weights_only=True)
    for key in dropped:
        del state["early_stopping"][key]
    torch.save(state, path)
    changed = resume_run(tmp_path / "run", overrides=[*overrides, "train.max_steps=8"])
    assert changed.early_stopping.best is None and changed.early_stopping.best_step == 0
    assert line in capsys.readouterr().err
    same = resume_run(tmp_path / "run", overrides=["train.max_steps=8"])
    assert same.early_stopping.best_step == 4 and "afresh" not in capsys.readouterr().err


def test_checkpoints_without_the_new_trainer_state_keys_still_resume(tmp_path: Path) -> None:
    """Checkpoints written before the stopping metric's name, the logging window and the thread count were stored."""
    corpus = write_corpus(tmp_path, n_train=40)
    start_run(tiny_experiment(corpus, "train.max_steps=4"), tmp_path / "run", quiet=True).train()
    path = tmp_path / "run" / ckpt.CHECKPOINTS_DIR / ckpt.step_name(4) / ckpt.STATE_FILE
    state = torch.load(path, weights_only=True)
    assert state["early_stopping"].pop("metric") == "loss" and state.pop("log_window")["tokens"] == 0
    assert isinstance(state.pop("threads"), int)  # stored since resumes with another thread count say so
    torch.save(state, path)
    resumed = resume_run(tmp_path / "run", overrides=["train.max_steps=6"], quiet=True)
    assert resumed.early_stopping.best_step == 4 and resumed.train().step == 6
