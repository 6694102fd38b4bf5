"""Import a Hugging Face MarianMT directory (as published for OPUS-MT) into a tformer run directory.

    hf download Helsinki-NLP/opus-mt-en-de --local-dir opus-mt-en-de
    tformer import-hf opus-mt-en-de --out runs/opus-en-de
    echo "Hello world" | tformer translate runs/opus-en-de

Read: config.json, the weights (model.safetensors, or pytorch_model.bin loaded with
`torch.load(weights_only=True)`, so nothing is unpickled; or their shards, as an index.json names them),
generation_config.json when present, and the
tokenizer files (see `VocabTokenizer`). A model with `tie_word_embeddings=False` keeps its own lm_head
(tformer's untied output projection). Weights stored as float16 or bfloat16 become float32, exactly.
Written: a run directory with one checkpoint, `step-00000000`, that `load_run` and every tformer command
read like a trained one.

Decoding settings are the ones generate() uses (generation_config.json, else config.json's), mapped
and checked by `tformer.interop.hf_generation`: HF's `bad_words_ids` of single tokens (OPUS-MT bans its
pad token, which is also the decoder start token) become `decode.banned_ids`, banned after the softmax
as HF does, so greedy and beam search give HF's tokens and scores; settings tformer cannot reproduce
are refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tformer.config import ExperimentConfig, ModelConfig
from tformer.config.checks import ConfigError
from tformer.decoding.constraints import check_banned_ids
from tformer.input_paths import check_input_dir, readable_name
from tformer.interop.directories import fresh_directory, written_atomically
from tformer.interop.hf_generation import GENERATION_FILE, decode_config, decoder_start_id, generation_settings
from tformer.interop.marian import marian_to_tformer_state, model_config_from_marian, tformer_to_marian_state
from tformer.interop.marian_tokenizer import VocabTokenizer
from tformer.model import Transformer
from tformer.model.size import check_fits_in_memory
from tformer.training.checkpoint import CHECKPOINTS_DIR, step_name
from tformer.training.checkpoint_save import write_checkpoint, write_pointer

if TYPE_CHECKING:
    from transformers import MarianConfig


@dataclass(frozen=True)
class ImportedRun:
    """The run directory `import_hf` wrote, and the floating-point types its weights had in the Hugging
    Face directory (the run holds them as float32; float16 and bfloat16 values convert exactly)."""

    run_dir: Path
    stored_dtypes: tuple[str, ...]


def import_hf(hf_dir: str | Path, out: str | Path) -> ImportedRun:
    """Write a tformer run directory at `out` (new or empty) holding the Marian model of `hf_dir`.

    Weights stored as float16 or bfloat16 are imported as float32: the conversion is exact, and float32
    is what tformer decodes with on the CPU (half-precision matrix products there are slow or missing)."""
    hf_dir = check_input_dir(hf_dir, str(hf_dir), holding="Hugging Face model")
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    out = fresh_directory(out)
    raw, hf_config = _read_marian_config(hf_dir)
    try:
        config = model_config_from_marian(hf_config)
        # before anything is built per layer: 1e8 layers filled the memory until the process was killed
        check_fits_in_memory(config)
    except ConfigError as error:  # a value tformer's ModelConfig refuses (d_model not divisible by the heads)
        raise ValueError(f"{hf_dir / 'config.json'}: {error}") from None
    has_file = _has(hf_dir, GENERATION_FILE)
    generation = generation_settings(_read_json(hf_dir / GENERATION_FILE) if has_file else None, raw)
    weights = _read_weights(hf_dir)
    stored_dtypes = tuple(
        sorted({str(t.dtype).removeprefix("torch.") for t in weights.values() if t.is_floating_point()})
    )
    model = _marian_model(weights, config, hf_config, hf_dir)
    tokenizer = _marian_tokenizer(hf_dir, hf_config, config, bos_id=decoder_start_id(generation, hf_config))
    named = hf_dir / (GENERATION_FILE if has_file else "config.json")
    decode = decode_config(generation, max_positions=config.max_positions, eos_id=tokenizer.eos_id, source=str(named))
    try:  # refused now, naming the file, not by every translation of the imported run
        check_banned_ids(decode, config.tgt_vocab_size)
    except ValueError as error:
        raise ValueError(f"{named}: {error}") from None
    source = {
        "format": "hf-marian",
        "path": str(hf_dir.resolve()),
        "banned_token_ids": list(decode.banned_ids),
        "stored_dtypes": list(stored_dtypes),
    }
    _write_run(out, ExperimentConfig(model=config, decode=decode), tokenizer, model, imported_from=source)
    return ImportedRun(out, stored_dtypes)


def _read_marian_config(hf_dir: Path) -> tuple[dict[str, Any], MarianConfig]:
    """config.json as read (generation settings may come from it) and as transformers' MarianConfig."""
    from transformers import MarianConfig

    raw = _read_json(hf_dir / "config.json")
    if raw.get("model_type") != "marian":
        raise ValueError(f"{hf_dir / 'config.json'}: model_type is {raw.get('model_type')!r}, expected 'marian'")
    try:
        hf_config = MarianConfig.from_pretrained(hf_dir)
    except Exception as error:  # transformers checks the fields with errors of its own (and of huggingface_hub)
        reason = " ".join(str(error).split())  # a message over several lines, as one
        raise ValueError(f"{hf_dir / 'config.json'}: not a MarianMT configuration ({reason})") from None
    return raw, hf_config


def _marian_model(
    weights: dict[str, Tensor], config: ModelConfig, hf_config: MarianConfig, hf_dir: Path
) -> Transformer:
    """A tformer Transformer holding Marian's weights, renamed; missing, unused or misshapen ones are refused."""
    try:
        shared_vocab = bool(hf_config.share_encoder_decoder_embeddings)
        state = marian_to_tformer_state(_with_tied_embeddings(weights, config, shared_vocab=shared_vocab), config)
    except KeyError as error:
        raise ValueError(f"{hf_dir}: the weights lack {error.args[0]}; is this a MarianMT checkpoint?") from None
    model = Transformer(config)
    _check_unused(weights, set(tformer_to_marian_state(model.state_dict(), config)), hf_dir)
    _check_shapes(state, model.state_dict(), hf_dir)
    model.load_state_dict(state, strict=True)
    return model


def _marian_tokenizer(hf_dir: Path, hf_config: MarianConfig, config: ModelConfig, *, bos_id: int) -> VocabTokenizer:
    """The directory's tokenizer, checked against config.json's special ids and the model's vocabularies."""
    tokenizer = VocabTokenizer.from_marian_dir(hf_dir, bos_id=bos_id)
    if tokenizer.eos_id != hf_config.eos_token_id or tokenizer.pad_id != hf_config.pad_token_id:
        raise ValueError(
            f"{hf_dir}: the tokenizer's eos/pad ids ({tokenizer.eos_id}, {tokenizer.pad_id}) differ from "
            f"config.json's ({hf_config.eos_token_id}, {hf_config.pad_token_id})"
        )
    if tokenizer.src_vocab_size > config.src_vocab_size or tokenizer.tgt_vocab_size > config.tgt_vocab_size:
        raise ValueError(f"{hf_dir}: the vocabulary files hold more ids than the model's embeddings")
    return tokenizer


def _write_run(
    out: Path, experiment: ExperimentConfig, tokenizer: VocabTokenizer, model: Transformer, *, imported_from: dict
) -> None:
    """The run directory: one checkpoint, step 0, which "latest" points to; written whole or not at all."""
    with written_atomically(out) as temporary:
        name = step_name(0)
        (temporary / CHECKPOINTS_DIR).mkdir()
        write_checkpoint(
            temporary / CHECKPOINTS_DIR / name,
            experiment=experiment,
            tokenizer=tokenizer,
            model=model.eval(),
            step=0,
            trainer_state=None,
            extra={"imported_from": imported_from},
        )
        write_pointer(temporary, "latest", name)


def _read_weights(hf_dir: Path) -> dict[str, Tensor]:
    """One weights file, or the shards an index.json names (save_pretrained's max_shard_size); safetensors
    first, as transformers prefers it."""
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if _has(hf_dir, single):
            return _read_weight_file(hf_dir / single)
        if _has(hf_dir, index):
            return _read_shards(hf_dir, index)
    raise ValueError(
        f"{hf_dir} holds no weights (model.safetensors or pytorch_model.bin, or shards with their index.json)"
    )


def _read_shards(hf_dir: Path, index: str) -> dict[str, Tensor]:
    weight_map = _read_json(hf_dir / index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise ValueError(f"{hf_dir / index}: no weight_map from tensor names to file names")
    state: dict[str, Tensor] = {}
    for file in sorted(set(weight_map.values())):
        if Path(file).name != file or not _has(hf_dir, file):  # a shard outside the directory is not read
            raise ValueError(f"{hf_dir / index} names {file}, which is not in {hf_dir}")
        state.update(_read_weight_file(hf_dir / file))
    return state


def _read_weight_file(path: Path) -> dict[str, Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            with readable_name(path) as name:
                return load_file(name)
        except SafetensorError as error:  # a damaged file: its header or data does not add up
            raise ValueError(f"{path}: corrupt or truncated ({error})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a damaged or unsafe file
        raise ValueError(f"{path}: cannot be read safely ({type(error).__name__})") from None
    # weights_only reads any list or dict of plain values too
    if not isinstance(state, dict) or not all(isinstance(tensor, Tensor) for tensor in state.values()):
        raise ValueError(f"{path}: not a state dict (tensor names to tensors)")
    return state


# Names a Marian file may hold that the conversion does not read: the positions' sinusoidal tables (every
# model recomputes them) and the copies of an embedding that Marian ties to another one.
SPARE_NAMES = frozenset(
    {
        "model.encoder.embed_positions.weight",
        "model.decoder.embed_positions.weight",
        "model.shared.weight",
        "model.encoder.embed_tokens.weight",
        "model.decoder.embed_tokens.weight",
        "lm_head.weight",
    }
)


def _check_unused(weights: dict[str, Tensor], read: set[str], hf_dir: Path) -> None:
    """Weights config.json has no place for (layers beyond its count, another model's parameters) are
    refused by name: dropping them would import another function than the weights'."""
    unused = sorted(set(weights) - read - SPARE_NAMES)
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise ValueError(
            f"{hf_dir}: the weights hold {unused[0]}{more}, which config.json's MarianMT model has no place for; "
            "are config.json and the weights of the same model?"
        )


def _check_shapes(state: dict[str, Tensor], expected: dict[str, Tensor], hf_dir: Path) -> None:
    """Weights saved for another config.json (vocabulary or sizes edited) are refused by name."""
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{hf_dir}: the weights do not fit config.json: {name} has shape {tuple(tensor.shape)}, "
                f"config.json makes it {tuple(expected[name].shape)}"
            )


def _with_tied_embeddings(state: dict[str, Tensor], config: ModelConfig, *, shared_vocab: bool) -> dict[str, Tensor]:
    """Every embedding name Marian ties, filled from whichever one the file stored (files keep one copy).
    An untied `lm_head.weight` is a matrix of its own: it stands in for no embedding.

    With one vocabulary (`shared_vocab`, share_encoder_decoder_embeddings) and an untied output, transformers
    5 gives the encoder and the decoder embeddings of their own, but transformers 4 made both the one
    `model.shared` module and saved it once, as model.shared.weight: a missing decoder embedding is then that."""
    state = dict(state)
    if config.share_embeddings:  # shared and tied (see model_config_from_marian)
        names = ["model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"]
        names.append("lm_head.weight")
        stored = next((state[name] for name in names if name in state), None)
        if stored is not None:
            for name in names:
                state.setdefault(name, stored)
    else:
        fallbacks = [("encoder", "model.shared.weight")]
        if config.tie_output:
            fallbacks.append(("decoder", "lm_head.weight"))
        if shared_vocab:
            fallbacks.append(("decoder", "model.shared.weight"))
        for ours, fallback in fallbacks:
            if fallback in state:
                state.setdefault(f"model.{ours}.embed_tokens.weight", state[fallback])
    return state


def _has(directory: Path, name: str) -> bool:
    return (directory / name).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # RecursionError: nested deep
        raise ValueError(f"{path}: unreadable or corrupt ({type(error).__name__})") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return document
