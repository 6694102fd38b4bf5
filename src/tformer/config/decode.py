"""How a trained model's output becomes tokens (`DecodeConfig`): greedy, beam search or sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tformer.config.checks import ConfigError, check_choices, check_finite, check_int64, check_types

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
        check_types(self, "decode")
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
        if not 0 <= self.seed < 2**63:  # a signed 64-bit seed, as torch.Generator takes (the sampler hashes it)
            raise ConfigError(f"seed must be in [0, 2**63), got {self.seed}")
        banned = self.banned_ids
        if not isinstance(banned, list | tuple) or not all(_is_token_id(i) for i in banned):
            raise ConfigError(f"banned_ids must be a list of token ids (integers >= 0), got {banned!r}")
        object.__setattr__(self, "banned_ids", tuple(banned))  # from TOML/JSON it arrives as a list
        check_int64(self, "decode")


def _is_token_id(value: object) -> bool:
    """An integer >= 0; not a bool, which Python counts as an integer (TOML's `true` is no token id)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
