"""The model's shape and wiring (`ModelConfig`), and the paper's presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tformer.config.checks import ConfigError, check_choices, check_finite, check_int64, check_types
from tformer.config.loading import config_from_dict

Activation = Literal["relu", "gelu", "silu", "swish"]
NormPosition = Literal["post", "pre"]
PositionalEncoding = Literal["sinusoidal", "learned"]
SinusoidalLayout = Literal["interleaved", "concatenated"]


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
        check_types(self, "model")
        check_finite(self, "model")
        check_choices(self, "model")
        # sizes first: n_heads = 0 would make the divisibility check below a ZeroDivisionError
        for name in ("d_model", "n_heads", "d_ff", "src_vocab_size", "tgt_vocab_size", "max_positions"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads != 0:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.share_embeddings and self.src_vocab_size != self.tgt_vocab_size:
            raise ConfigError(
                "share_embeddings=true needs src_vocab_size == tgt_vocab_size "
                f"(got {self.src_vocab_size} and {self.tgt_vocab_size}); set share_embeddings=false"
            )
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


# The paper's Table 3 shapes (base, big) and two smaller ones. Vocabulary sizes are set from the
# tokenizer when a model is built for data; the preset only fixes the architecture.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2, dropout=0.0),
    "small": dict(d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3, dropout=0.1),
    "base": dict(d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6, dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, d_ff=4096, n_encoder_layers=6, n_decoder_layers=6, dropout=0.3),
}


def preset_of(config: ModelConfig) -> str | None:
    """The preset whose shape `config` has (its dropout and the keys no preset sets may differ), or None:
    what a message can call a model given as `--preset` or `[model] preset`, since a config stores the
    values alone."""
    for name, values in PRESETS.items():
        if all(getattr(config, key) == value for key, value in values.items() if key != "dropout"):
            return name
    return None


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset's ModelConfig, with any field overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return config_from_dict(ModelConfig, {**PRESETS[name], **overrides})
