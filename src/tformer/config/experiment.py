"""A training run's configuration (`ExperimentConfig`): the model and decode sections with the data
and training ones defined here, read from nested tables, a TOML file and `--set` overrides."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tformer.config.checks import ConfigError, check_choices, check_finite, check_int64, check_types
from tformer.config.decode import DecodeConfig
from tformer.config.loading import (
    config_from_dict,
    config_to_dict,
    did_you_mean,
    field_names,
    load_toml,
    parse_override,
)
from tformer.config.model import PRESETS, ModelConfig
from tformer.config.pieces import BYTE_PIECES, SPECIAL_PIECES, smallest_vocab_size

TokenizerModel = Literal["bpe", "unigram"]
ScheduleName = Literal["inverse_sqrt", "peak"]
StopMetric = Literal["bleu", "chrf", "loss"]
# sacreBLEU's word splitting for BLEU (tformer.evaluation); those that download a model at run time are left out
BleuTokenize = Literal["13a", "intl", "zh", "ja-mecab", "ko-mecab", "char", "none"]
BLEU_TOKENIZE: tuple[str, ...] = typing.get_args(BleuTokenize)  # `evaluate --tokenize` lists them
Precision = Literal["auto", "fp32", "bf16"]
CompileMode = Literal["none", "layers", "model"]  # how training compiles (runtime.compile_*), not a config key


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the training and validation text comes from, and how it becomes tokens.

    `tokenizer` names a directory written by `Tokenizer.to_files`; when it is None a tokenizer of
    `vocab_size` pieces is trained on the training data (joint over both sides when `joint_vocab`), on
    at most `tokenizer_max_pairs` of its pairs drawn at random by train.seed (0: all; Marian's default
    is the same 2 million lines), since sentencepiece's time and memory grow with every line it reads.
    `character_coverage` is the share of the text's characters the vocabulary must hold as pieces; the
    rarest characters beyond it become <unk>. 1.0 keeps every character (right for alphabets);
    sentencepiece advises 0.9995 for Chinese or Japanese, whose thousands of rare characters would
    otherwise take up the vocabulary or exceed it. `byte_fallback` spells those left out (and any never
    seen) as their UTF-8 bytes instead, with 256 byte pieces out of `vocab_size`, so the model can read
    and write every character; false keeps the tokenizers of earlier runs.
    """

    data_dir: str | None = None  # relative data paths below are taken from here (default: working directory)
    train_src: str | None = None
    train_tgt: str | None = None
    valid_src: str | None = None
    valid_tgt: str | None = None
    tokenizer: str | None = None
    vocab_size: int = 8000
    tokenizer_model: TokenizerModel = "bpe"
    joint_vocab: bool = True
    tokenizer_max_pairs: int = 2_000_000
    character_coverage: float = 1.0
    byte_fallback: bool = False
    max_chars: int = 2000
    strict: bool = False

    def __post_init__(self) -> None:
        check_types(self, "data")
        check_choices(self, "data")
        for name in ("data_dir", "train_src", "train_tgt", "valid_src", "valid_tgt", "tokenizer"):
            if getattr(self, name) == "":  # read as the working directory; a run stores its paths absolute
                raise ConfigError(f"data.{name} is empty: give a path, or leave it out")
        if (self.valid_src is None) != (self.valid_tgt is None):
            raise ConfigError("give both data.valid_src and data.valid_tgt, or neither")
        if self.byte_fallback and self.vocab_size < smallest_vocab_size(byte_fallback=True):
            raise ConfigError(
                f"data.vocab_size must be at least {smallest_vocab_size(byte_fallback=True)} with "
                f"data.byte_fallback = true ({SPECIAL_PIECES} special + {BYTE_PIECES} byte pieces + 1 learned piece), "
                f"got {self.vocab_size}: add {BYTE_PIECES} to the vocab_size you would use without byte fallback, "
                "or set data.byte_fallback = false"
            )
        if self.vocab_size < 8:
            raise ConfigError(f"data.vocab_size must be at least 8, got {self.vocab_size}")
        if self.vocab_size >= 2**31:  # sentencepiece's trainer reads it as a 32-bit int, after the text is read
            raise ConfigError(
                f"data.vocab_size must be below 2**31 (sentencepiece's limit), got {self.vocab_size}; it is an upper "
                "bound: a corpus gives the pieces it has"
            )
        if self.max_chars < 1:  # the reader refused it too, after a run had begun, naming no section
            raise ConfigError(f"data.max_chars must be at least 1, got {self.max_chars}")
        if self.tokenizer_max_pairs < 0:
            raise ConfigError(f"data.tokenizer_max_pairs must be 0 (all pairs) or more, got {self.tokenizer_max_pairs}")
        if not 0.98 <= self.character_coverage <= 1.0:  # sentencepiece's own bounds
            raise ConfigError(f"data.character_coverage must be between 0.98 and 1.0, got {self.character_coverage}")
        check_int64(self, "data")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation, validation, checkpointing and stopping of one training run.

    lr: "inverse_sqrt" is the paper's lr_scale * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5);
    "peak" warms up linearly to `peak_lr`, then decays as peak_lr * sqrt(warmup / step).
    `warmup_ramp = false` holds the schedule's peak for the first `warmup_steps` updates instead of
    rising to it (the same decay afterwards): the "no warm-up" ablation.
    A step is one optimizer update over `accumulate` micro-batches of about `max_tokens` tokens each.
    Limits (`max_steps`, `max_epochs`, `max_time_s`, `clip_norm`, `patience`, `bleu_every`) are off at 0.
    """

    max_tokens: int = 4096
    accumulate: int = 1
    max_steps: int = 100_000
    max_epochs: int = 0
    max_time_s: float = 0.0
    schedule: ScheduleName = "inverse_sqrt"
    lr_scale: float = 1.0
    peak_lr: float = 7e-4
    warmup_steps: int = 4000
    warmup_ramp: bool = True
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-9
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 0.0
    seed: int = 0
    log_every: int = 100
    valid_every: int = 1000
    bleu_every: int = 0
    bleu_max_sentences: int = 500
    bleu_tokenize: BleuTokenize = "13a"  # zh, ja-mecab, ko-mecab or char for text written without spaces
    save_every: int = 1000
    keep_last: int = 5
    stop_metric: StopMetric = "loss"
    patience: int = 0
    device: str = "auto"
    precision: Precision = "auto"
    cuda_graphs: bool = False  # each batch shape's step recorded as a CUDA graph (docs/training.md)

    def __post_init__(self) -> None:
        check_types(self, "train")
        check_finite(self, "train")
        check_choices(self, "train")
        if self.cuda_graphs and self.accumulate != 1:
            raise ConfigError("train.cuda_graphs records one micro-batch per step: set train.accumulate = 1")
        for name in ("max_tokens", "accumulate", "warmup_steps", "log_every", "valid_every", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_steps", "max_epochs", "max_time_s", "clip_norm", "patience", "bleu_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 (off) or positive, got {getattr(self, name)}")
        if self.max_steps == 0 and self.max_epochs == 0 and self.max_time_s == 0:
            raise ConfigError("set at least one of train.max_steps, train.max_epochs, train.max_time_s")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        for name in ("lr_scale", "peak_lr"):
            if not getattr(self, name) > 0:  # written so that NaN fails too
                raise ConfigError(f"train.{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:  # the tokenizer trainer and numpy take unsigned 32-bit seeds
            raise ConfigError(f"train.seed must be in [0, 2**32), got {self.seed}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ConfigError(f"train.adam_eps must be positive, got {self.adam_eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay must be 0 (off) or positive, got {self.weight_decay}")
        if self.stop_metric in ("bleu", "chrf") and self.bleu_every == 0:
            raise ConfigError(f"train.stop_metric={self.stop_metric} needs train.bleu_every > 0")
        if self.bleu_max_sentences < 1:
            raise ConfigError(f"train.bleu_max_sentences must be at least 1, got {self.bleu_max_sentences}")
        check_int64(self, "train")


@dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Everything a training run needs: one section per component, each component sees only its own."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)


EXPERIMENT_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "decode": DecodeConfig,
}


def experiment_from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """An ExperimentConfig from nested tables; `[model] preset = "tiny"` picks the base shape."""
    unknown = sorted(set(values) - set(EXPERIMENT_SECTIONS))
    if unknown:
        raise ConfigError(
            f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(EXPERIMENT_SECTIONS)}"
            f"{did_you_mean(unknown, list(EXPERIMENT_SECTIONS))}"
        )
    sections: dict[str, Any] = {}
    for name, cls in EXPERIMENT_SECTIONS.items():
        table = values.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(not_a_table(name, table))
        also_valid: tuple[str, ...] = ()
        if name == "model":
            table, also_valid = expand_preset(table), ("preset",)
        others = {other: _section_keys(other) for other in EXPERIMENT_SECTIONS if other != name}
        sections[name] = config_from_dict(cls, table, section=name, also_valid=also_valid, other_sections=others)
    return ExperimentConfig(**sections)


def _section_keys(section: str) -> list[str]:
    """Every key a section accepts, [model] preset included."""
    return [*(("preset",) if section == "model" else ()), *field_names(EXPERIMENT_SECTIONS[section])]


def expand_preset(model_table: dict[str, Any]) -> dict[str, Any]:
    """A [model] table with its `preset` key replaced by that preset's values (the table's own keys win)."""
    if "preset" not in model_table:
        return model_table
    table = dict(model_table)
    base = table.pop("preset")
    if base not in PRESETS:
        raise ConfigError(f"unknown preset {base!r} in [model]; choose one of: {', '.join(PRESETS)}")
    return {**PRESETS[base], **table}


def not_a_table(section: str, value: Any) -> str:
    return f"[{section}] must be a table of key = value pairs, got {value!r}"


def set_key(values: dict[str, Any], section: str, key: str, value: Any) -> None:
    """values[section][key] = value, in place; a section that a config file gave as no table (`model = 3`)
    is refused as experiment_from_dict refuses it, not with a TypeError."""
    table = values.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(not_a_table(section, table))
    table[key] = value


def override_list(overrides: Sequence[str]) -> list[str]:
    """`overrides` as a list, after refusing one string where a list of them is wanted: iterated, its characters
    were read as overrides ("--set expects key=value, got 't'")."""
    if isinstance(overrides, str | bytes):
        raise TypeError(f"overrides must be a list of 'section.key=value' strings, not one: [{overrides!r}]")
    return list(overrides)


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of nested `values` with each `section.key=value` set (e.g. `train.max_steps=100`)."""
    result = {name: dict(table) if isinstance(table, dict) else table for name, table in values.items()}
    for text in override_list(overrides):
        keys, value = parse_override(text)
        if len(keys) != 2 or not all(keys):
            raise ConfigError(
                f"--set expects section.key=value (sections: {', '.join(EXPERIMENT_SECTIONS)}); got {text!r}"
            )
        section, key = keys
        if section not in EXPERIMENT_SECTIONS:
            raise ConfigError(
                f"unknown section {section!r} in --set {text}; valid sections: {', '.join(EXPERIMENT_SECTIONS)}"
                f"{did_you_mean([section], list(EXPERIMENT_SECTIONS))}"
            )
        set_key(result, section, key, value)
    return result


def load_experiment(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """An ExperimentConfig from a TOML file (or defaults when `path` is None) and `--set` overrides."""
    values = load_toml(path) if path is not None else {}
    return experiment_from_dict(apply_overrides(values, overrides))  # which refuses one string for a list


def experiment_to_dict(experiment: ExperimentConfig) -> dict[str, Any]:
    return {name: config_to_dict(getattr(experiment, name)) for name in EXPERIMENT_SECTIONS}
