"""Training speed of tformer against Hugging Face MarianMTModel and torch.nn.Transformer.

Same work for everyone (../../shared/BENCHMARKS.md rule 1): the same architecture (tformer's random
weights copied into Marian with `to_marian`; nn.Transformer with tied embeddings and output projection),
the same batch of random token ids of fixed lengths (no padding), the same dtype. One training step is
forward, loss, backward and an AdamW step for every system; tformer's step is `train_step` itself
(label-smoothed loss, gradient clipping at 1.0, AdamW), Marian's is `model(labels=...)` + AdamW,
nn.Transformer's is cross-entropy with label smoothing + AdamW. fp32 on CPU with the same number of
threads; bf16 autocast (fp32 weights) on GPU, and on CPU with `--precision bf16`; fused AdamW for every
system on both devices.

    python benchmarks/train.py --device cpu --preset small [--batch 64x32x32] [--quick] [--compile [model]]

`--compile` compiles every encoder and decoder layer in place (tformer: `tformer.runtime.compile_layers`;
Marian: the same per-layer `nn.Module.compile`); `--compile model` compiles the whole model and loss, on a
GPU with mode "reduce-overhead" (CUDA graphs): tformer's `runtime.compile_objective`, Marian's whole
`torch.compile(model, mode=...)`; `--rivals-compile none|layers|model` compiles the rivals otherwise than
tformer. Compile time is reported apart. `--graph` runs tformer's step as
`training.graphed_step.GraphedTrainStep` (the kernels of forward, loss, backward, clipping and AdamW
recorded once as one CUDA graph); with `--compile` (per layer) tformer's compiled layers are what the graph
records (fused element-wise kernels, no launches), with `--compile model` its whole objective compiled
without CUDA graphs of its own (`compile_objective(..., inside_cuda_graph=True)`), recorded into the step's.
per figure: tokens_per_s (source + target), target_tokens_per_s, mfu (GPU), peak_memory_mb (GPU),
first_call_s (on a GPU, or where a system compiles), then ratio_vs_hf and ratio_vs_torch for tformer (on tokens/s).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    common_arguments,
    emit,
    environment,
    hf_rival,
    interleaved_medians,
    median,
    print_profiles,
    record_path,
    write_record,
)

from tformer.config import TrainConfig, preset
from tformer.data.batching import Batch
from tformer.model import Transformer, model_flops_per_pair
from tformer.runtime import compile_layers, compile_objective, configure_backends, peak_flops
from tformer.training.graphed_step import GraphedTrainStep
from tformer.training.optimizer import build_optimizer
from tformer.training.step import TrainingObjective, train_step

PAD, BOS, EOS = 0, 1, 2
SMOOTHING, CLIP = 0.1, 1.0


def parse_args():
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--batch", default=None, help="SENTENCESxSRC_LENxTGT_LEN (default: 64x32x32 CPU, 128x64x64 GPU)"
    )
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--steps", type=int, default=None, help="training steps per timed run (default: 2 CPU, 20 GPU)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="layers",
        default=None,
        choices=["layers", "model"],
        help="torch.compile for tformer and Marian: each layer (layers, default) or the whole model (CUDA graphs)",
    )
    parser.add_argument(
        "--rivals-compile",
        choices=["same", "none", "layers", "model"],
        default="same",
        help="how Marian and nn.Transformer are compiled: as --compile says (same, default), or not at all "
        "(none: tformer's best step against the rivals as most run them), per layer, or whole",
    )
    parser.add_argument(
        "--graph",
        action="store_true",
        help="tformer: the whole step recorded as one CUDA graph (training.graphed_step); with --compile "
        "the compiled layers, or with --compile model the compiled objective, are what it records",
    )
    parser.add_argument(
        "--loss-chunk", type=int, default=0, help="tformer: chunked cross-entropy (target positions; not with --graph)"
    )
    parser.add_argument("--systems", default="tformer,hf,torch", help="comma-separated systems to run")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default=None,
        help="every system: fp32, or bf16 autocast with fp32 weights (default: bf16 on GPU, fp32 on CPU)",
    )
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.precision = args.precision or ("bf16" if gpu else "fp32")
    args.batch = args.batch or ("16x16x16" if args.quick else "128x64x64" if gpu else "64x32x32")
    try:
        args.sentences, args.src_len, args.tgt_len = (int(part) for part in args.batch.lower().split("x"))
    except ValueError:
        parser.error(f"--batch must look like 64x32x32, got {args.batch!r}")
    if args.graph and args.loss_chunk:
        parser.error("--graph records the whole loss (GraphedTrainStep has no chunked loss): drop --loss-chunk")
    args.steps = args.steps or (1 if args.quick else 20 if gpu else 2)
    args.rivals_compile = args.compile if args.rivals_compile == "same" else args.rivals_compile
    args.rivals_compile = None if args.rivals_compile == "none" else args.rivals_compile
    if args.quick:
        args.repeats = 1
    return args


def random_batch(args, generator: torch.Generator) -> Batch:
    B, S, T = args.sentences, args.src_len, args.tgt_len
    src = torch.randint(4, args.vocab_size, (B, S), generator=generator)
    tgt = torch.randint(4, args.vocab_size, (B, T + 1), generator=generator)
    src[:, -1] = EOS
    tgt[:, 0], tgt[:, -1] = BOS, EOS
    return Batch(src, tgt[:, :-1].contiguous(), tgt[:, 1:].contiguous(), torch.arange(B), B * S, B * T)


def tformer_system(model: Transformer, batch: Batch, args) -> Any:
    device = torch.device(args.device)
    optimizer = build_optimizer(model, TrainConfig(), device=device)
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    on_device = batch.to(device)
    compiled = args.compile == "model"
    if args.graph:
        objective = compile_objective(TrainingObjective(model), device, inside_cuda_graph=True) if compiled else None
        graphed = GraphedTrainStep(
            model, optimizer, batch_shape=(args.sentences, args.src_len, args.tgt_len), smoothing=SMOOTHING,
            special_ids=(PAD, BOS, EOS), clip_norm=CLIP, device=device, autocast_dtype=autocast, objective=objective,
        )  # fmt: skip

        def run_graphed() -> None:
            for _ in range(args.steps):
                graphed(on_device, lr=1e-4)

        return run_graphed
    objective = compile_objective(TrainingObjective(model), device) if compiled else None

    def run() -> None:
        for _ in range(args.steps):
            train_step(
                model, optimizer, [on_device], lr=1e-4, smoothing=SMOOTHING, pad_id=PAD, clip_norm=CLIP,
                device=device, autocast_dtype=autocast, loss_chunk=args.loss_chunk, objective=objective,
            )  # fmt: skip

    return run


def adamw(model: nn.Module, device: str) -> torch.optim.AdamW:
    """Fused AdamW, as tformer uses and as Hugging Face's Trainer defaults to (optim="adamw_torch_fused")."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)


def autocast_context(args):
    return torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def smoothed_loss_step(model: nn.Module, optimizer: torch.optim.Optimizer, logits: Tensor, targets: Tensor) -> None:
    """The rivals' loss and update, the same work as tformer's train_step: label-smoothed cross-entropy
    (padding ignored), backward, gradient clipping at CLIP, AdamW."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), label_smoothing=SMOOTHING, ignore_index=PAD)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()


def hf_system(hf_model: nn.Module, batch: Batch, args) -> Any:
    optimizer = adamw(hf_model, args.device)
    src, tgt_in, labels = (tensor.to(args.device) for tensor in (batch.src_ids, batch.tgt_in, batch.tgt_out))
    mask = torch.ones_like(src)

    def run() -> None:
        for _ in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(args):
                logits = hf_model(input_ids=src, attention_mask=mask, decoder_input_ids=tgt_in).logits
            smoothed_loss_step(hf_model, optimizer, logits, labels)

    return run


class TorchTransformer(nn.Module):
    """torch.nn.Transformer with scaled, tied embeddings, sinusoidal positions and a tied output projection."""

    def __init__(self, config, vocab_size: int) -> None:
        super().__init__()
        d = config.d_model
        self.embedding = nn.Embedding(vocab_size, d, padding_idx=PAD)
        self.core = nn.Transformer(
            d_model=d, nhead=config.n_heads, num_encoder_layers=config.n_encoder_layers,
            num_decoder_layers=config.n_decoder_layers, dim_feedforward=config.d_ff, dropout=config.dropout,
            batch_first=True,
        )  # fmt: skip
        # the same work as tformer and Marian: dropout on residuals only (nn.Transformer's one dropout also
        # drops attention weights and the feed-forward activation), and no final LayerNorms (post-norm)
        for layer in [*self.core.encoder.layers, *self.core.decoder.layers]:
            layer.dropout.p = config.activation_dropout
            for attention in (layer.self_attn, getattr(layer, "multihead_attn", None)):
                if attention is not None:
                    attention.dropout = config.attention_dropout
        self.core.encoder.norm = None
        self.core.decoder.norm = None
        positions = torch.arange(config.max_positions)[:, None] * torch.exp(
            torch.arange(0, d, 2) * (-math.log(10000.0) / d)
        )
        table = torch.cat([positions.sin(), positions.cos()], dim=1)
        self.register_buffer("positions", table, persistent=False)
        self.scale = math.sqrt(d)
        self.dropout = nn.Dropout(config.dropout)  # on the embedded sum, as tformer and Marian do

    def embed(self, ids):
        return self.dropout(self.embedding(ids) * self.scale + self.positions[: ids.shape[1]])

    def forward(self, src, tgt_in):
        causal = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], device=tgt_in.device)
        hidden = self.core(self.embed(src), self.embed(tgt_in), tgt_mask=causal, tgt_is_causal=True)
        return F.linear(hidden, self.embedding.weight)


def torch_system(model: TorchTransformer, batch: Batch, args) -> Any:
    optimizer = adamw(model, args.device)
    src, tgt_in, tgt_out = (tensor.to(args.device) for tensor in (batch.src_ids, batch.tgt_in, batch.tgt_out))

    def run() -> None:
        for _ in range(args.steps):
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(args):
                logits = model(src, tgt_in)
            smoothed_loss_step(model, optimizer, logits, tgt_out)

    return run


def compile_rival_layers(layers: list[nn.Module]) -> None:
    """Per-layer compilation in place, as tformer's runtime.compile_layers does (dynamic shapes)."""
    for layer in layers:
        layer.compile(dynamic=True)


def compiled_rival(model: nn.Module, layers: list[nn.Module], args) -> nn.Module:
    """Marian or nn.Transformer as --rivals-compile says: its `layers` compiled in place, or the whole model
    compiled (with CUDA graphs on a GPU), or as it is."""
    if args.rivals_compile == "layers":
        compile_rival_layers(layers)
    elif args.rivals_compile == "model":
        return torch.compile(model, mode="reduce-overhead" if args.device == "cuda" else None)
    return model


def first_call_reported(args) -> bool:
    """Whether first_call_s is recorded: on a GPU, or where any system compiles (tformer with --compile,
    the rivals with --rivals-compile): its compile time, reported apart (BENCHMARKS.md rule 2)."""
    return bool(args.compile or args.rivals_compile) or args.device == "cuda"


def tformer_notes(args) -> str:
    """The record's sentence on tformer's step: graphed or not, and how it is compiled (--compile)."""
    if args.graph:
        step = (
            "tformer: GraphedTrainStep, the same step as train_step (label smoothing 0.1, clip 1.0, AdamW, "
            "capturable) recorded once as a CUDA graph after 3 eager steps and replayed"
        )
        whole = ", its model and loss compiled whole (torch.compile, no CUDA graphs of its own)"
    else:
        step = "tformer: train_step (label smoothing 0.1, clip 1.0, AdamW)"
        whole = ", its model and loss compiled whole (runtime.compile_objective: mode reduce-overhead on a GPU)"
    compiled = {"layers": ", its layers compiled (torch.compile per layer)", "model": whole}.get(args.compile, "")
    return f"{step}{compiled}. "


def rivals_notes(args) -> str:
    """The record's sentence on how Marian and nn.Transformer are compiled (--rivals-compile)."""
    return "Marian and nn.Transformer " + {
        "layers": "compile each layer in place with dynamic shapes (as tformer's --compile layers). ",
        "model": "are compiled whole (torch.compile, mode reduce-overhead on a GPU). ",
    }.get(args.rivals_compile, "run eagerly (not compiled). ")


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    configure_backends(torch.device(args.device))
    torch.manual_seed(0)
    systems = args.systems.split(",")
    config = preset(
        args.preset,
        src_vocab_size=args.vocab_size,
        tgt_vocab_size=args.vocab_size,
        sinusoidal_layout="concatenated",
        max_positions=max(512, args.src_len + 1, args.tgt_len + 1),
    )
    model = Transformer(config, seed=0)
    batch = random_batch(args, torch.Generator().manual_seed(0))
    runs: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    hf_attention = "-"
    if "hf" in systems:
        hf_model = hf_rival(model, bos_id=BOS, eos_id=EOS, pad_id=PAD).to(args.device).train()
        hf_attention = getattr(hf_model.config, "_attn_implementation", "?")
        hf_model = compiled_rival(hf_model, [*hf_model.model.encoder.layers, *hf_model.model.decoder.layers], args)
        runs["hf"] = hf_system(hf_model, batch, args)
    if "tformer" in systems:
        model = model.to(args.device).train()
        if args.compile == "layers":  # with --graph too: the compiled layers' kernels are recorded in the graph
            compile_layers(model)
        runs["tformer"] = tformer_system(model, batch, args)
    if "torch" in systems:
        torch.manual_seed(0)
        torch_model = TorchTransformer(config, args.vocab_size).to(args.device).train()
        torch_model = compiled_rival(
            torch_model, [*torch_model.core.encoder.layers, *torch_model.core.decoder.layers], args
        )
        runs["torch"] = torch_system(torch_model, batch, args)
    for name, run in runs.items():  # the first call (compilation where a system compiles) is timed apart
        start = time.perf_counter()
        run()
        if args.device == "cuda":
            torch.cuda.synchronize()
        compile_s[name] = time.perf_counter() - start
    times = interleaved_medians(runs, repeats=args.repeats, warmup=1, device=args.device)
    if args.profile:
        print_profiles(runs, args.device)
    common: dict[str, Any] = dict(
        bench="train", preset=args.preset, device=args.device, batch=args.batch, compile=args.compile,
        rivals_compile=args.rivals_compile, tformer_loss_chunk=args.loss_chunk,
        tformer_graph=args.graph,
        dtype="bf16-autocast" if args.precision == "bf16" else "fp32",
    )  # fmt: skip
    lines, rates = [], {}
    peak = peak_flops(torch.device(args.device))
    flops_per_step = model_flops_per_pair(config, args.src_len, args.tgt_len) * args.sentences
    for name, seconds in times.items():
        step_s = median(seconds) / args.steps
        rates[name] = args.sentences * (args.src_len + args.tgt_len) / step_s
        lines.append(emit(**common, system=name, metric="tokens_per_s", value=round(rates[name], 1)))
        lines.append(
            emit(**common, system=name, metric="target_tokens_per_s", value=round(batch.n_tgt_tokens / step_s, 1))
        )
        lines.append(
            emit(**common, system=name, metric="step_s_all_repeats", value=[round(s / args.steps, 4) for s in seconds])
        )
        if first_call_reported(args):
            lines.append(emit(**common, system=name, metric="first_call_s", value=round(compile_s[name], 2)))
        if peak is not None:
            lines.append(emit(**common, system=name, metric="mfu", value=round(flops_per_step / step_s / peak, 4)))
    if args.device == "cuda":  # peak memory, one more run each
        for name, run in runs.items():
            torch.cuda.reset_peak_memory_stats()
            run()
            megabytes = torch.cuda.max_memory_allocated() / 2**20
            # a graph replay allocates nothing new: its activations live in the pool allocated at capture
            metric = "peak_memory_mb_graph_replay" if name == "tformer" and args.graph else "peak_memory_mb"
            lines.append(emit(**common, system=name, metric=metric, value=round(megabytes, 1)))
    for rival in ("hf", "torch"):
        if "tformer" in rates and rival in rates:
            value = round(rates["tformer"] / rates[rival], 3)
            lines.append(emit(**common, system="tformer", metric=f"ratio_vs_{rival}", value=value))
    path = record_path("train", args.device, args.record, preset=args.preset)
    if path is not None:
        precision = "bf16 autocast, fp32 weights" if args.precision == "bf16" else "fp32"
        notes = (
            f"Random-weight `{args.preset}` model, vocabulary {args.vocab_size}, one batch of {args.sentences} "
            f"sentences x {args.src_len} source x {args.tgt_len} target random token ids (no padding), {precision}, "
            f"{args.threads if args.device == 'cpu' else '-'} CPU threads. A timed run is {args.steps} full training "
            f"steps; median of {args.repeats} interleaved repeats after one untimed warm-up round (and the untimed "
            "first call, reported as first_call_s when a system compiles or on GPU); each timed run starts after 1 s "
            "idle. "
            + tformer_notes(args)
            + f"HF: MarianMTModel from tformer's weights (to_marian; attention implementation {hf_attention}), "
            "its logits into cross-entropy with label smoothing 0.1 (padding ignored), backward, clip 1.0, AdamW. "
            "torch: nn.Transformer with tied embeddings "
            "and output projection, the same loss, clip and AdamW, its attention and feed-forward-activation "
            "dropout set to the config's (0) and its final LayerNorms removed, so that it does tformer's work. "
            "Dropout 0.1 on the embeddings and residuals everywhere. "
            + rivals_notes(args)
            + "Every system uses torch.optim.AdamW(fused=True) (Hugging Face Trainer's default optimizer). "
            f"Peak for MFU: {peak if peak else 'n/a (CPU)'} FLOP/s."
        )
        write_record(path, title=f"Training speed, {args.device}, {args.preset}", env=environment(args.device),
                     lines=lines, notes=notes)  # fmt: skip
        print(f"record written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
