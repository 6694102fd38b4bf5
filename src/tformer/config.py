"""Typed, frozen configuration for the model, with the paper's presets and strict loading.

Every field has one meaning and one place. Loading from a dict or TOML rejects unknown keys with a
message that lists the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

Activation = Literal["relu", "gelu", "silu", "swish"]
NormPosition = Literal["post", "pre"]
PositionalEncoding = Literal["sinusoidal", "learned"]
SinusoidalLayout = Literal["interleaved", "concatenated"]


class ConfigError(ValueError):
    """A configuration the user wrote is invalid; the message says how to fix it."""


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
    coverage_penalty: float = 0.0
    sampling: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ConfigError(f"beam_size must be at least 1, got {self.beam_size}")
        if not 1 <= self.nbest <= self.beam_size:
            raise ConfigError(f"nbest must be between 1 and beam_size ({self.beam_size}), got {self.nbest}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


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


def config_from_dict(cls: type[ConfigT], values: dict[str, Any], *, section: str = "") -> ConfigT:
    """Build a config dataclass, refusing unknown keys and values of the wrong type."""
    valid = field_names(cls)
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
    """Read a TOML file, turning syntax errors into one-line ConfigErrors."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
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
