"""How many numbers a Transformer holds, counted from its config before it is built, so that a model
that cannot fit in memory is refused in one line instead of being built layer by layer until the
machine runs out (`--set model.n_encoder_layers=100000000000` used up every byte of a 23 GiB machine
before anything failed). Also the count of a built model's trainable parameters, and the training FLOPs
of one sentence pair that MFU is measured against."""

from __future__ import annotations

import os

from torch import nn

from tformer.config import ConfigError, ModelConfig

FLOAT32_BYTES = 4  # a model is built in float32 on the CPU, whatever it is trained in


def model_elements(config: ModelConfig) -> dict[str, int]:
    """The numbers each part of `Transformer(config)` holds: its parameters (a shared matrix once) and the
    sinusoidal tables, which are buffers. Named by the settings that size them, for the error."""
    d, f = config.d_model, config.d_ff
    feed_forward = 2 * d * f + f + d
    encoder_layer = (4 * d * d + 4 * d) + feed_forward + 2 * (2 * d)  # self-attention, 2 LayerNorms
    decoder_layer = 2 * (4 * d * d + 4 * d) + feed_forward + 3 * (2 * d)  # self- and cross-attention, 3 LayerNorms
    final_norms = 2 * (2 * d) if config.norm_position == "pre" else 0
    vocabulary = config.src_vocab_size * d
    vocabulary += 0 if config.share_embeddings else config.tgt_vocab_size * d
    vocabulary += 0 if config.tie_output else config.tgt_vocab_size * d
    vocabulary += config.tgt_vocab_size if config.final_logits_bias else 0
    return {
        "model.n_encoder_layers": config.n_encoder_layers * encoder_layer,
        "model.n_decoder_layers": config.n_decoder_layers * decoder_layer + final_norms,
        "model.max_positions": 2 * config.max_positions * d,  # the encoder's and the decoder's tables
        "the vocabulary sizes": vocabulary,
    }


def check_fits_in_memory(config: ModelConfig) -> None:
    """Refuse a model whose float32 numbers alone exceed the memory here (it could be neither built nor
    trained), naming the setting that makes it so large. Where the memory size is unknown, nothing is
    checked. The memory is `memory_here`'s: a container's limit below the machine's let a model too large
    for it be built until the kernel killed the process, without a word."""
    parts = model_elements(config)
    needed = FLOAT32_BYTES * sum(parts.values())
    available = memory_here()
    if available is None or needed <= available:
        return
    largest = max(parts, key=lambda name: parts[name])
    raise ConfigError(
        f"this model holds {sum(parts.values()):,} numbers ({needed / 2**30:,.1f} GiB in float32), more than the "
        f"{available / 2**30:,.1f} GiB of memory here, most of them for {largest} "
        f"({config.d_model=}, {config.n_encoder_layers=}, {config.n_decoder_layers=}, {config.d_ff=}, "
        f"{config.max_positions=})".replace("config.", "")
    )


def memory_here() -> int | None:
    """The bytes this process may hold on the CPU: the least of this machine's physical memory, the process's
    address-space limit (`ulimit -v`) and its cgroup's limit (a container's); None where none is known."""
    known = [limit for limit in (physical_memory(), address_space_limit(), cgroup_limit()) if limit is not None]
    return min(known) if known else None


def physical_memory() -> int | None:
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def address_space_limit() -> int | None:
    try:
        import resource  # not on Windows
    except ImportError:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


def cgroup_limit() -> int | None:
    try:
        with open("/sys/fs/cgroup/memory.max") as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_flops_per_pair(config: ModelConfig, source_length: int, target_length: int) -> float:
    """Training FLOPs for one sentence pair (forward + backward), as in ../shared/BENCHMARKS.md."""
    d, f = config.d_model, config.d_ff
    n_e = config.n_encoder_layers * (4 * d * d + 2 * d * f)
    n_d = config.n_decoder_layers * (8 * d * d + 2 * d * f)
    n_o = d * config.tgt_vocab_size
    S, T = source_length, target_length
    return (
        6 * (n_e * S + (n_d + n_o) * T)
        + 12 * config.n_encoder_layers * d * S * S
        + 6 * config.n_decoder_layers * d * T * T
        + 12 * config.n_decoder_layers * d * S * T
    )
