"""Typed, frozen configuration for the model, with the paper's presets and strict loading.

Every field has one meaning and one place. Loading from a dict or TOML rejects unknown keys with a
message that lists the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from tformer.recipes import RECIPES_DIR, recipe_names, recipe_path

Activation = Literal["relu", "gelu", "silu", "swish"]
NormPosition = Literal["post", "pre"]
PositionalEncoding = Literal["sinusoidal", "learned"]
SinusoidalLayout = Literal["interleaved", "concatenated"]


class ConfigError(ValueError):
    """A configuration the user wrote is invalid; the message says how to fix it."""


# Float settings for which infinity means something: no limit (as 0 does). Earlier versions accepted
# `--max-time inf` and stored it, so such runs must keep loading.
UNLIMITED_BY_INF = frozenset({"max_time_s"})


def check_finite(config: Any, section: str) -> None:
    """Refuse NaN in every float field of a config dataclass, and infinities except where they mean
    "no limit" (UNLIMITED_BY_INF).

    NaN passes every range check written as a comparison (`nan <= 0` is false), so it would reach
    training or decoding and fail there, or silently do nothing; an infinite learning rate or length
    penalty means nothing. Runs first in each `__post_init__`, so the range checks after it see numbers."""
    for name in _float_fields(type(config)):
        value = getattr(config, name)
        if not isinstance(value, int | float) or math.isfinite(value):
            continue
        if math.isinf(value) and value > 0 and name in UNLIMITED_BY_INF:
            continue
        raise ConfigError(f"{section}.{name} must be a finite number, got {value}")


def check_int64(config: Any, section: str) -> None:
    """Refuse an integer field that does not fit in 64 bits, as torch holds it (translate --beam 10**22
    was an OverflowError traceback from torch). Runs last in each `__post_init__`, after the checks of
    the field's own range, whose messages say more."""
    for name in _int_fields(type(config)):
        value = getattr(config, name)
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            raise ConfigError(f"{section}.{name} must be a 64-bit integer (below 2**63 in size), got {value}")


def check_choices(config: Any, section: str) -> None:
    """Refuse a value outside its field's Literal choices. Configs read from files are checked when they
    are read (`config_from_dict`); this covers configs built in Python, where a typo such as
    norm_position="Pre" would otherwise silently build the default architecture."""
    for name, choices in _choice_fields(type(config)).items():
        value = getattr(config, name)
        if value not in choices:
            raise ConfigError(f"{section}.{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


@functools.cache
def _choice_fields(cls: type) -> dict[str, tuple[Any, ...]]:
    """The fields annotated with a Literal, and their allowed values."""
    hints = typing.get_type_hints(cls)
    return {
        field.name: typing.get_args(hints[field.name])
        for field in dataclasses.fields(cls)
        if typing.get_origin(hints[field.name]) is Literal
    }


@functools.cache
def _int_fields(cls: type) -> tuple[str, ...]:
    hints = typing.get_type_hints(cls)
    return tuple(field.name for field in dataclasses.fields(cls) if hints[field.name] is int)


@functools.cache
def _float_fields(cls: type) -> tuple[str, ...]:
    """Names of the fields annotated `float` (cached: configs are rebuilt by dataclasses.replace often)."""
    hints = typing.get_type_hints(cls)
    return tuple(field.name for field in dataclasses.fields(cls) if hints[field.name] is float)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape and wiring of the encoder-decoder Transformer.

    `share_embeddings=True` means a joint vocabulary: source embeddings, target embeddings and (with
    `tie_output=True`) the output projection are one matrix. `sinusoidal_layout="interleaved"` is the
    paper's PE(pos, 2i) = sin, PE(pos, 2i+1) = cos; "concatenated" puts all sines first, then all
    cosines, as Hugging Face's Marian does.
    """

    src_vocab_size: int = 8000
    tgt_vocab_size: int = 8000
    d_model: int = 512
    n_heads: int = 8
    d_ff: int = 2048
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    activation: Activation = "relu"
    norm_position: NormPosition = "post"
    positional_encoding: PositionalEncoding = "sinusoidal"
    sinusoidal_layout: SinusoidalLayout = "interleaved"
    max_positions: int = 1024
    share_embeddings: bool = True
    tie_output: bool = True
    scale_embeddings: bool = True
    final_logits_bias: bool = False
    layer_norm_eps: float = 1e-5
    pad_id: int = 0

    def __post_init__(self) -> None:
        check_finite(self, "model")
        check_choices(self, "model")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError(
                "share_embeddings=true needs src_vocab_size == tgt_vocab_size "
                f"(got {self.src_vocab_size} and {self.tgt_vocab_size}); set share_embeddings=false"
            )
        for name in ("d_model", "n_heads", "d_ff", "src_vocab_size", "tgt_vocab_size", "max_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("n_encoder_layers", "n_decoder_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.pad_id < min(self.src_vocab_size, self.tgt_vocab_size):
            raise ConfigError(f"pad_id {self.pad_id} is outside the vocabulary")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
        check_int64(self, "model")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


LengthNormalization = Literal["gnmt", "average", "none"]


@dataclass(frozen=True, kw_only=True)
class DecodeConfig:
    """How to turn a trained model into output tokens: greedy, beam search or sampling.

    beam_size=1 without sampling is greedy search. The maximum output length is
    max_len_a * source_length + max_len_b tokens (eos excluded). See docs/decoding.md for the exact
    length-penalty formulas.
    """

    beam_size: int = 4
    nbest: int = 1
    max_len_a: float = 1.2
    max_len_b: int = 10
    min_len: int = 0
    length_penalty: float = 0.6
    length_normalization: LengthNormalization = "gnmt"
    no_repeat_ngram_size: int = 0
    banned_ids: tuple[int, ...] = ()  # tokens never produced (Hugging Face's single-token bad_words_ids)
    # at a sentence's last step (its maximum length) eos is forced with log-probability 0, so every
    # hypothesis ends with eos and the eos counts in its length (Hugging Face's forced_eos_token_id)
    forced_eos: bool = False
    # beam search: a sentence is done as soon as it holds beam_size finished hypotheses (Hugging Face's
    # early_stopping=True); by default it goes on while its best running beam could still win
    early_stopping: bool = False
    coverage_penalty: float = 0.0
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    static_step: bool = False  # fixed-shape step, replayed as a CUDA graph on GPU (docs/decoding.md)
    compile_step: bool = False  # with static_step: torch.compile the step before it is recorded (docs/decoding.md)

    def __post_init__(self) -> None:
        check_finite(self, "decode")
        check_choices(self, "decode")
        if self.beam_size < 1:
            raise ConfigError(f"beam_size must be at least 1, got {self.beam_size}")
        if self.nbest < 1:
            raise ConfigError(f"nbest must be at least 1, got {self.nbest}")
        if self.nbest > self.beam_size and not self.sampling:  # sampling draws nbest paths, whatever the beam
            raise ConfigError(f"nbest must be between 1 and beam_size ({self.beam_size}), got {self.nbest}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_len_a", "max_len_b", "min_len", "no_repeat_ngram_size", "coverage_penalty", "top_k"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be at least 0, got {getattr(self, name)}")
        if self.compile_step and not self.static_step:
            raise ConfigError("compile_step compiles the static step: set static_step = true as well")
        if not 0 <= self.seed < 2**63:  # torch.Generator takes a signed 64-bit seed
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        banned = self.banned_ids
        if not isinstance(banned, list | tuple) or not all(isinstance(i, int) and i >= 0 for i in banned):
            raise ConfigError(f"banned_ids must be a list of token ids (integers >= 0), got {banned!r}")
        object.__setattr__(self, "banned_ids", tuple(banned))  # from TOML/JSON it arrives as a list
        check_int64(self, "decode")


# The paper's Table 3 shapes (base, big) and two smaller ones. Vocabulary sizes are set from the
# tokenizer when a model is built for data; the preset only fixes the architecture.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0),
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, dropout=0.1),
    "base": dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's ModelConfig, with any field overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return config_from_dict(ModelConfig, {**PRESETS[name], **overrides})


ConfigT = TypeVar("ConfigT")


def field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def config_from_dict(
    cls: type[ConfigT], values: dict[str, Any], *, section: str = "", also_valid: Sequence[str] = ()
) -> ConfigT:
    """Build a config dataclass, refusing unknown keys and values of the wrong type.

    `also_valid` names keys the caller has already taken out of `values` (such as [model] preset), so
    that the list of valid keys in the error is every key a user may write."""
    valid = [*also_valid, *field_names(cls)]
    where = f" in [{section}]" if section else ""
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)}{where}; valid keys: {', '.join(valid)}")
    hints = typing.get_type_hints(cls)
    checked = {key: _check_type(key, value, hints[key], where) for key, value in values.items()}
    return cls(**checked)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning syntax errors into one-line ConfigErrors. A path that does not exist
    but names one of the recipes shipped with tformer (`multi30k_en_de`, `configs/tiny_copy.toml`) reads
    that recipe."""
    path = Path(path)
    if not path.exists():
        path = recipe_path(path) or path
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        recipes = ", ".join(recipe_names())
        raise ConfigError(
            f"config file not found: {path}; or give one of tformer's own recipes by name: {recipes}"
            f" (files in {RECIPES_DIR})"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory; give a TOML file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: invalid UTF-8 at byte {error.start + 1}; re-encode the file as UTF-8") from None
    try:  # a byte-order mark (as Windows editors write) is an encoding artefact, dropped as corpus.py drops it
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `--set section.key=value` into (["section", "key"], value); the value is TOML."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    dotted_key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word such as relu or pre is taken as a string
    return dotted_key.strip().split("."), value


def _check_type(key: str, value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}{where} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [option for option in options if option is not type(None)]
        return _check_type(key, value, inner[0], where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}{where} must be true or false; got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}{where} must be an integer; got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}{where} must be a number; got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}{where} must be a string; got {value!r}")
        return value
    return value


# ---------------------------------------------------------------------------- experiments (training runs)
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
        check_choices(self, "data")
        if (self.valid_src is None) != (self.valid_tgt is None):
            raise ConfigError("give both data.valid_src and data.valid_tgt, or neither")
        if self.vocab_size < 8:
            raise ConfigError(f"data.vocab_size must be at least 8, got {self.vocab_size}")
        if self.tokenizer_max_pairs < 0:
            raise ConfigError(f"data.tokenizer_max_pairs must be 0 (all pairs) or more, got {self.tokenizer_max_pairs}")
        if not 0.98 <= self.character_coverage <= 1.0:  # sentencepiece's own bounds
            raise ConfigError(f"data.character_coverage must be between 0.98 and 1.0, got {self.character_coverage}")
        if self.byte_fallback and self.vocab_size < 4 + 256 + 1:
            raise ConfigError(
                f"data.vocab_size must be at least 261 with data.byte_fallback = true (4 special pieces, 256 byte "
                f"pieces and 1 more), got {self.vocab_size}"
            )
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
        raise ConfigError(f"unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(EXPERIMENT_SECTIONS)}")
    sections: dict[str, Any] = {}
    for name, cls in EXPERIMENT_SECTIONS.items():
        table = values.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table of key = value pairs, got {table!r}")
        also_valid: tuple[str, ...] = ()
        if name == "model":
            table, also_valid = expand_preset(table), ("preset",)
        sections[name] = config_from_dict(cls, table, section=name, also_valid=also_valid)
    return ExperimentConfig(**sections)


def expand_preset(model_table: dict[str, Any]) -> dict[str, Any]:
    """A [model] table with its `preset` key replaced by that preset's values (the table's own keys win)."""
    if "preset" not in model_table:
        return model_table
    table = dict(model_table)
    base = table.pop("preset")
    if base not in PRESETS:
        raise ConfigError(f"unknown preset {base!r} in [model]; choose one of: {', '.join(PRESETS)}")
    return {**PRESETS[base], **table}


def apply_overrides(values: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of nested `values` with each `section.key=value` set (e.g. `train.max_steps=100`)."""
    result = {name: dict(table) if isinstance(table, dict) else table for name, table in values.items()}
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) != 2 or not all(keys):
            raise ConfigError(
                f"--set expects section.key=value (sections: {', '.join(EXPERIMENT_SECTIONS)}); got {text!r}"
            )
        section, key = keys
        if section not in EXPERIMENT_SECTIONS:
            raise ConfigError(
                f"unknown section {section!r} in --set {text}; valid sections: {', '.join(EXPERIMENT_SECTIONS)}"
            )
        result.setdefault(section, {})[key] = value
    return result


def load_experiment(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """An ExperimentConfig from a TOML file (or defaults when `path` is None) and `--set` overrides."""
    values = load_toml(path) if path is not None else {}
    return experiment_from_dict(apply_overrides(values, list(overrides)))


def experiment_to_dict(experiment: ExperimentConfig) -> dict[str, Any]:
    return {name: config_to_dict(getattr(experiment, name)) for name in EXPERIMENT_SECTIONS}
