"""The built-in main job: learn to write numbers in German, on a CPU, in about two minutes.

English number words go in ("three hundred forty-two thousand five"), German comes out
("dreihundertzweiundvierzigtausendfünf"). German joins everything into one word and says units before
tens ("zweiundvierzig" = two-and-forty), so the model must learn to reorder, not only to look words up.
The corpus is generated here (no download); the test numbers are drawn from the same range as the
training numbers (0 to 999,999) but never appear in training.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tformer.atomic_file import remove_empty_directories
from tformer.config import DataConfig, DecodeConfig, ExperimentConfig, TrainConfig, preset
from tformer.data.numbers import NumberSplits, make_number_splits, write_number_corpus
from tformer.decoding.pipeline import Translator
from tformer.evaluation import score
from tformer.training import checkpoint, checkpoint_save
from tformer.training.average import average_checkpoints
from tformer.training.checkpoint_load import LoadedRun, load_run
from tformer.training.run import start_run
from tformer.training.run_directory import check_new_run_dir, create_run_dir
from tformer.viz.attention_maps import save_cross_attention_png


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Sizes of the demo. The defaults reach >= 99% exact match on 2 CPU cores in about 2½ minutes
    (training stops at 150 s)."""

    n_train: int = 300_000
    n_valid: int = 500
    n_test: int = 2_000
    balanced_fraction: float = 0.1  # share of training numbers drawn digit-balanced (see make_number_splits)
    average_last: int = 5  # checkpoints (one per 100 steps) averaged into the final model, as paper §6.1
    train_steps: int = 1_300
    warmup_steps: int = 200  # below train_steps: the learning rate reaches its peak and decays
    train_seconds: float = 150.0  # a cap for slow machines; 1,300 steps take about 2 minutes on 2 cores
    seed: int = 0
    n_examples: int = 8


@dataclass(frozen=True)
class DemoResult:
    run_dir: Path
    exact_match: float
    chrf: float
    n_test: int
    train_seconds: float
    total_seconds: float
    attention_png: Path


def demo_experiment(data_dir: Path, config: DemoConfig) -> ExperimentConfig:
    """A 2+2-layer, d_model 128 Transformer: big enough to reorder, small enough for a CPU."""
    model = preset("tiny", d_model=128, n_heads=4, d_ff=512, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0)
    return ExperimentConfig(
        model=model,
        data=DataConfig(
            train_src=str(data_dir / "train.en"),
            train_tgt=str(data_dir / "train.de"),
            valid_src=str(data_dir / "valid.en"),
            valid_tgt=str(data_dir / "valid.de"),
            vocab_size=256,
        ),
        train=TrainConfig(
            max_tokens=2048,
            max_steps=config.train_steps,
            max_time_s=config.train_seconds,
            schedule="peak",
            peak_lr=2e-3,
            warmup_steps=config.warmup_steps,
            label_smoothing=0.0,
            clip_norm=1.0,
            seed=config.seed,
            log_every=50,
            valid_every=100_000,
            save_every=100,
            keep_last=config.average_last,
            device="cpu",
        ),
        decode=DecodeConfig(beam_size=1, max_len_a=1.0, max_len_b=10),
    )


# the demo has no --resume or --overwrite: a used directory is left alone and another one chosen
DEMO_RUN_DIR_ADVICE = "choose another --out, or delete it to run the demo there again"


def run_demo(run_dir: Path, config: DemoConfig = DemoConfig(), *, quiet: bool = False) -> DemoResult:
    """Generate the data, train, evaluate on held-out numbers, save the run and one attention map."""
    started = time.monotonic()
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    run_dir = Path(run_dir)
    data_dir = run_dir / "data"
    # every setting and the directory are checked before anything is generated or written: a failure
    # found later would leave files that make the corrected command refuse the directory
    experiment = demo_experiment(data_dir, config)
    advice = DEMO_RUN_DIR_ADVICE
    check_new_run_dir(run_dir, advice=advice, files_advice=advice, others_advice=advice)
    splits = _write_numbers(data_dir, config, say)
    trainer = start_run(experiment, run_dir, quiet=quiet, checked=True)
    trainer.stop_advice = _stopped_at_the_time_cap  # in place of the warm-up advice, which names --set
    training_started = time.monotonic()
    trainer.train()
    train_seconds = time.monotonic() - training_started
    _average_into_best(run_dir, config.average_last, say)
    run = load_run(run_dir, which="best")
    sources = [english for _, english, _ in splits.test]
    references = [german for _, _, german in splits.test]
    hypotheses, exact, chrf = _evaluate(run, sources, references)
    attention_png = save_cross_attention_png(
        run.model, run.tokenizer, sources[0], run_dir / "cross_attention.png", decode_config=run.experiment.decode
    )
    say(f"cross-attention of {sources[0]!r} saved to {attention_png}")
    result = DemoResult(
        run_dir=run_dir,
        exact_match=exact,
        chrf=chrf,
        n_test=len(references),
        train_seconds=train_seconds,
        total_seconds=time.monotonic() - started,
        attention_png=attention_png,
    )
    _report(result, splits.test, hypotheses, config.n_examples)
    return result


def _write_numbers(data_dir: Path, config: DemoConfig, say: Callable[[str], None]) -> NumberSplits:
    """Draw the training, validation and test numbers and write them as parallel text files."""
    created = create_run_dir(data_dir.parent)  # --out and its parents that the data creates
    data_dir.mkdir(exist_ok=True)  # in a directory just made or checked empty
    created.insert(0, data_dir)
    splits = make_number_splits(
        n_train=config.n_train,
        n_valid=config.n_valid,
        n_test=config.n_test,
        seed=config.seed,
        balanced_fraction=config.balanced_fraction,
    )
    say(f"demo: {config.n_train:,} training pairs, {config.n_test:,} held-out test numbers (0 to 999,999)")
    try:
        write_number_corpus(splits, data_dir)
    except OSError:  # a full disk: what was written would make the same command refuse --out once space is freed
        shutil.rmtree(data_dir, ignore_errors=True)  # --out was checked empty: data/ is the demo's own
        remove_empty_directories(created)
        raise
    return splits


def _stopped_at_the_time_cap(step: int, train: TrainConfig) -> str | None:
    """The demo's warning when its time cap (--train-seconds) ended training before its --train-steps: the
    machine is slower or busier than the one the demo is sized for, so it scores lower (before the end of the
    warm-up, nothing right at all)."""
    if train.max_steps == 0 or step >= train.max_steps or train.max_time_s <= 0:
        return None
    return (
        f"warning: training stopped at step {step:,} of {train.max_steps:,}, at the demo's {train.max_time_s:g}-second "
        "cap (--train-seconds): this machine is slower or busier than the 2 cores the demo is sized for, so the "
        "model scores lower; rerun with --train-seconds 0 (no cap) to train every step"
    )


def _average_into_best(run_dir: Path, average_last: int, say: Callable[[str], None]) -> None:
    """Averaging the last checkpoints smooths the noise of the last updates (98.6% -> 99.75% exact match
    in one measured run); the average becomes the run's "best" checkpoint, which translate loads."""
    n_averaged = min(average_last, len(checkpoint.step_checkpoints(run_dir)))
    averaged = average_checkpoints(run_dir, last=n_averaged)
    checkpoint_save.write_pointer(run_dir, "best", averaged.name)
    say(f"averaged the last {n_averaged} checkpoints into {averaged}")


def _evaluate(run: LoadedRun, sources: list[str], references: list[str]) -> tuple[list[str], float, float]:
    """Translate the test numbers with the run's decode settings: the translations, their exact-match
    rate and chrF."""
    translator = Translator(run.model, run.tokenizer, run.experiment.decode, max_batch_tokens=8192)
    hypotheses = translator.translate_texts(sources)  # the searches run under torch.inference_mode
    exact = sum(h == r for h, r in zip(hypotheses, references, strict=True)) / len(references)
    return hypotheses, exact, score(hypotheses, references).chrf


def _report(result: DemoResult, test, hypotheses: list[str], n_examples: int) -> None:
    print(f"held-out numbers: {result.n_test:,}")
    # BLEU is left out on purpose: each output is a single German word, which has no 4-grams to match.
    print(f"exact match: {100 * result.exact_match:.2f}%   chrF: {result.chrf:.2f}")
    print(f"training: {result.train_seconds:.0f} s   whole demo: {result.total_seconds:.0f} s")
    print("examples (number | English | model's German | correct?):")
    for (number, english, german), hypothesis in list(zip(test, hypotheses, strict=True))[:n_examples]:
        mark = "ok" if hypothesis == german else f"expected {german}"
        print(f"  {number:>7} | {english} | {hypothesis} | {mark}")
    print(f"run saved in {result.run_dir}: try  tformer translate {result.run_dir}")
    print(f"cross-attention map: {result.attention_png}")


def quick_config() -> DemoConfig:
    """A seconds-long version for tests: same pipeline, far less data and training."""
    return dataclasses.replace(
        DemoConfig(),
        n_train=3_000,
        n_valid=50,
        n_test=100,
        train_steps=20,
        warmup_steps=5,
        train_seconds=10.0,
        n_examples=3,
    )
