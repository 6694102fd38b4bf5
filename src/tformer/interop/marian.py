"""Weight-for-weight conversion between tformer and Hugging Face's MarianMTModel.

Marian is the paper's Transformer with post-norm, sines-then-cosines positional encoding and
sqrt(d_model)-scaled embeddings, so a tformer model with `sinusoidal_layout="concatenated"` maps onto it
exactly: the fused Q|K|V (or K|V) projections are split into Marian's separate ones, the rest is renamed.

A model with the paper's interleaved sin/cos layout is exported too: the interleaved table is the
concatenated one with its D columns permuted, and permuting the model dimension everywhere it appears
(embedding columns, the inputs of projections that read the residual stream, the outputs of those that
write it, layer-norm parameters) leaves every logit unchanged (`permute_model_dim`).
`transformers` is imported lazily: it is needed only by whoever calls these functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from tformer.config import ModelConfig
from tformer.model import Transformer

if TYPE_CHECKING:
    from transformers import MarianConfig, MarianMTModel


@dataclass(frozen=True)
class SpecialIds:
    """The ids a decoder needs; Marian starts decoding with its pad id, tformer with bos."""

    bos_id: int
    eos_id: int
    pad_id: int


def _activation_to_marian(activation: str) -> str:
    return {"relu": "relu", "gelu": "gelu", "silu": "swish", "swish": "swish"}[activation]


# Marian's LayerNorms are `nn.LayerNorm(d_model)`: the epsilon is not in its config.
MARIAN_LAYER_NORM_EPS = 1e-5


def check_exportable(config: ModelConfig) -> None:
    """Marian has no pre-norm, learned positions or other layer-norm epsilon; refuse them with a reason."""
    problems = []
    if config.norm_position != "post":
        problems.append("norm_position must be post")
    if config.positional_encoding != "sinusoidal":
        problems.append("positional_encoding must be sinusoidal")
    if config.layer_norm_eps != MARIAN_LAYER_NORM_EPS:
        problems.append(f"layer_norm_eps must be {MARIAN_LAYER_NORM_EPS} (got {config.layer_norm_eps})")
    if problems:
        raise ValueError("cannot express this model as Hugging Face Marian: " + "; ".join(problems))


def marian_config(config: ModelConfig, ids: SpecialIds) -> MarianConfig:
    """The MarianConfig with the same architecture as `config`."""
    from transformers import MarianConfig

    check_exportable(config)
    return MarianConfig(
        vocab_size=config.src_vocab_size,
        decoder_vocab_size=config.tgt_vocab_size,
        share_encoder_decoder_embeddings=config.share_embeddings,
        tie_word_embeddings=config.tie_output,
        d_model=config.d_model,
        encoder_layers=config.n_encoder_layers,
        decoder_layers=config.n_decoder_layers,
        encoder_attention_heads=config.n_heads,
        decoder_attention_heads=config.n_heads,
        encoder_ffn_dim=config.d_ff,
        decoder_ffn_dim=config.d_ff,
        activation_function=_activation_to_marian(config.activation),
        dropout=config.dropout,
        attention_dropout=config.attention_dropout,
        activation_dropout=config.activation_dropout,
        max_position_embeddings=config.max_positions,
        scale_embedding=config.scale_embeddings,
        pad_token_id=ids.pad_id,
        eos_token_id=ids.eos_id,
        decoder_start_token_id=ids.bos_id,
        forced_eos_token_id=None,
    )


def model_config_from_marian(hf_config: MarianConfig) -> ModelConfig:
    """The tformer ModelConfig that reproduces a Marian checkpoint.

    With `tie_word_embeddings=False` Hugging Face ties nothing, not even the shared embeddings: the encoder,
    the decoder and `lm_head` each have their own matrix, so tformer gets separate source and target
    embeddings (of the one vocabulary's size) and an untied output projection."""
    shared_vocab = bool(hf_config.share_encoder_decoder_embeddings)
    tied = bool(hf_config.tie_word_embeddings)
    decoder_vocab = hf_config.vocab_size if shared_vocab else (hf_config.decoder_vocab_size or hf_config.vocab_size)
    for encoder, decoder in (
        ("encoder_attention_heads", "decoder_attention_heads"),
        ("encoder_ffn_dim", "decoder_ffn_dim"),
    ):
        if getattr(hf_config, encoder) != getattr(hf_config, decoder):
            raise ValueError(
                f"cannot import: {encoder}={getattr(hf_config, encoder)} but {decoder}={getattr(hf_config, decoder)}; "
                "tformer's encoder and decoder share one head count and one feed-forward size"
            )
    activations = {"relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu"}
    activation = activations.get(hf_config.activation_function)
    if activation is None:
        raise ValueError(
            f"cannot import: activation_function={hf_config.activation_function!r} has no tformer counterpart "
            f"(tformer has {', '.join(activations)})"
        )
    return ModelConfig(
        src_vocab_size=hf_config.vocab_size,
        tgt_vocab_size=decoder_vocab,
        d_model=hf_config.d_model,
        n_heads=hf_config.encoder_attention_heads,
        d_ff=hf_config.encoder_ffn_dim,
        n_encoder_layers=hf_config.encoder_layers,
        n_decoder_layers=hf_config.decoder_layers,
        dropout=hf_config.dropout,
        attention_dropout=hf_config.attention_dropout,
        activation_dropout=hf_config.activation_dropout,
        activation=activation,
        norm_position="post",
        positional_encoding="sinusoidal",
        sinusoidal_layout="concatenated",
        max_positions=hf_config.max_position_embeddings,
        share_embeddings=shared_vocab and tied,
        tie_output=tied,
        scale_embeddings=bool(hf_config.scale_embedding),
        final_logits_bias=True,
        layer_norm_eps=MARIAN_LAYER_NORM_EPS,
        pad_id=hf_config.pad_token_id,
    )


# tformer sub-layer name -> Marian sub-layer name, inside one layer
_ENCODER_NAMES = {
    "self_attention.out_proj": "self_attn.out_proj",
    "self_attention_residual.norm": "self_attn_layer_norm",
    "feed_forward.fc1": "fc1",
    "feed_forward.fc2": "fc2",
    "feed_forward_residual.norm": "final_layer_norm",
}
_DECODER_NAMES = {
    **_ENCODER_NAMES,
    "cross_attention.q_proj": "encoder_attn.q_proj",
    "cross_attention.out_proj": "encoder_attn.out_proj",
    "cross_attention_residual.norm": "encoder_attn_layer_norm",
}
# fused tformer projections -> the Marian projections they stack, in order
_FUSED = {
    "self_attention.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "cross_attention.kv_proj": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
}


def _layer_names(config: ModelConfig) -> list[tuple[str, str, dict[str, str]]]:
    encoder = [
        (f"encoder.layers.{i}.", f"model.encoder.layers.{i}.", _ENCODER_NAMES) for i in range(config.n_encoder_layers)
    ]
    decoder = [
        (f"decoder.layers.{i}.", f"model.decoder.layers.{i}.", _DECODER_NAMES) for i in range(config.n_decoder_layers)
    ]
    return encoder + decoder


# Parameters whose rows (axis 0) or columns (axis 1) run along the residual stream's D dimension.
_READS_RESIDUAL = ("qkv_proj.weight", "q_proj.weight", "kv_proj.weight", "fc1.weight")
_WRITES_RESIDUAL = ("out_proj.weight", "out_proj.bias", "fc2.weight", "fc2.bias", "norm.weight", "norm.bias")
_EMBEDDINGS = ("src_embedding.weight", "separate_tgt_embedding.weight", "output_projection.weight")


def interleaved_to_concatenated(d_model: int) -> Tensor:
    """perm with interleaved_table[:, perm] == concatenated_table: the sine columns, then the cosines."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def permute_model_dim(state: dict[str, Tensor], perm: Tensor) -> dict[str, Tensor]:
    """The same function with its residual stream's coordinates reordered by `perm` (h' = h[perm])."""
    out = {}
    for name, tensor in state.items():
        if name in _EMBEDDINGS or name.endswith(_READS_RESIDUAL):
            out[name] = tensor[:, perm]
        elif name.endswith(_WRITES_RESIDUAL):
            out[name] = tensor[perm]
        else:
            out[name] = tensor
    return out


def tformer_to_marian_state(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Rename and split a tformer state dict into Marian's layout (positions sines-then-cosines)."""
    if config.sinusoidal_layout == "interleaved":
        state = permute_model_dim(state, interleaved_to_concatenated(config.d_model))
    out: dict[str, Tensor] = {}
    for ours, theirs, names in _layer_names(config):
        for our_name, their_name in names.items():
            for param in ("weight", "bias"):
                out[f"{theirs}{their_name}.{param}"] = state[f"{ours}{our_name}.{param}"]
        for fused, parts in _FUSED.items():
            if f"{ours}{fused}.weight" not in state:
                continue
            for param in ("weight", "bias"):
                for part, piece in zip(parts, state[f"{ours}{fused}.{param}"].chunk(len(parts)), strict=True):
                    out[f"{theirs}{part}.{param}"] = piece
    source = state["src_embedding.weight"]
    target = state.get("separate_tgt_embedding.weight", source)
    if config.share_embeddings:
        out["model.shared.weight"] = source
    out["model.encoder.embed_tokens.weight"] = source
    out["model.decoder.embed_tokens.weight"] = target
    out["lm_head.weight"] = state.get("output_projection.weight", target)
    bias = state.get("final_logits_bias")
    out["final_logits_bias"] = (bias if bias is not None else torch.zeros(config.tgt_vocab_size))[None, :]
    return out


def marian_to_tformer_state(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The inverse of `tformer_to_marian_state`: fuse Q|K|V and rename."""
    out: dict[str, Tensor] = {}
    for ours, theirs, names in _layer_names(config):
        for our_name, their_name in names.items():
            for param in ("weight", "bias"):
                out[f"{ours}{our_name}.{param}"] = state[f"{theirs}{their_name}.{param}"]
        for fused, parts in _FUSED.items():
            if not ours.startswith("decoder") and fused.startswith("cross"):
                continue
            for param in ("weight", "bias"):
                out[f"{ours}{fused}.{param}"] = torch.cat([state[f"{theirs}{part}.{param}"] for part in parts])
    if config.share_embeddings:
        out["src_embedding.weight"] = state.get("model.shared.weight", state["model.encoder.embed_tokens.weight"])
    else:
        out["src_embedding.weight"] = state["model.encoder.embed_tokens.weight"]
        out["separate_tgt_embedding.weight"] = state["model.decoder.embed_tokens.weight"]
    if not config.tie_output:
        out["output_projection.weight"] = state["lm_head.weight"]
    out["final_logits_bias"] = state["final_logits_bias"].reshape(-1)
    return out


def to_marian(model: Transformer, ids: SpecialIds) -> MarianMTModel:
    """A MarianMTModel computing exactly what `model` computes (eval mode, same dtype)."""
    from transformers import MarianMTModel

    hf_model = MarianMTModel(marian_config(model.config, ids))
    state = tformer_to_marian_state(model.state_dict(), model.config)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    unexpected_real = [name for name in unexpected if "embed_positions" not in name]
    missing_real = [name for name in missing if "embed_positions" not in name]
    if missing_real or unexpected_real:
        raise RuntimeError(f"Marian conversion mismatch: missing {missing_real}, unexpected {unexpected_real}")
    return hf_model.to(model.tgt_embedding.weight.dtype).eval()


def from_marian(hf_model: MarianMTModel) -> tuple[Transformer, SpecialIds]:
    """A tformer Transformer with the Marian model's weights, and the ids its decoder needs."""
    config = model_config_from_marian(hf_model.config)
    model = Transformer(config)
    state = marian_to_tformer_state(hf_model.state_dict(), config)
    model.load_state_dict(state, strict=True)
    ids = SpecialIds(
        bos_id=hf_model.config.decoder_start_token_id,
        eos_id=hf_model.config.eos_token_id,
        pad_id=hf_model.config.pad_token_id,
    )
    return model.eval(), ids
