"""Translate one sentence and draw the attention maps of every layer and head: encoder self-attention,
decoder (masked) self-attention and cross-attention, with the subword tokens on the axes.

The output format follows the file name: .png draws one grid (a row per kind and layer, a column per
head); .html writes one self-contained page (every head its own embedded PNG, no external files).
The file is drawn in memory, written beside its name and renamed into place; an existing file is kept
unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import dataclasses

from tformer.cli.argument_types import path_argument, positive_integer
from tformer.cli.decode_options import decode_flags_named
from tformer.cli.output_paths import check_replaced_output
from tformer.viz.attention_kinds import KINDS

HELP = "draw every layer and head of attention for one translated sentence (PNG or HTML)"
FORMATS = (".png", ".html")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dir", type=path_argument, metavar="RUN_DIR", help="a run directory or one checkpoint directory"
    )
    parser.add_argument("sentence", help="the source sentence to translate")
    parser.add_argument("--out", type=path_argument, required=True, help="FILE.png or FILE.html")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--target", help="draw attention for this translation instead of decoding one")
    parser.add_argument("--layer", type=int, help="only this layer (0-based; negative counts from the end)")
    parser.add_argument("--head", type=int, help="only this head (0-based; negative counts from the end)")
    parser.add_argument("--kind", choices=KINDS, action="append", help="only these kinds of attention (repeatable)")
    parser.add_argument("--beam", type=positive_integer, help="beam size (default: the run's decode.beam_size)")
    parser.add_argument(
        "--which", choices=["best", "last"], default="best", help="checkpoint of a run directory (default: best)"
    )
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda or cuda:N (default: cpu)")


def run(args: argparse.Namespace) -> int:
    from tformer.runtime import resolve_device
    from tformer.training.checkpoint_load import load_run
    from tformer.viz.attention_maps import AttentionPlotError, save_attention_png, sentence_attention
    from tformer.viz.html import save_attention_html

    suffix = args.out.suffix.lower()
    if suffix not in FORMATS:
        raise AttentionPlotError(f"--out must end in .png or .html, got {args.out.name!r}")
    check_replaced_output(args.out, overwrite=args.overwrite, flag="--out")  # before loading the model
    for name, text in (("the sentence", args.sentence), ("--target", args.target)):
        if text is not None:
            _check_utf8(name, text)
    if not args.sentence.strip():  # no token to attend from: the maps would be of eos alone
        raise AttentionPlotError("the sentence is empty; give the source sentence to translate and draw")
    loaded = load_run(args.run_dir, which=args.which, device=resolve_device(args.device, setting="--device"))
    decode = loaded.experiment.decode
    if args.beam is not None:
        with decode_flags_named(args):  # --beam 10**22: an error names --beam, not decode.beam_size
            decode = dataclasses.replace(decode, beam_size=args.beam, nbest=1)
    attention = sentence_attention(
        loaded.model, loaded.tokenizer, args.sentence, target_text=args.target, decode_config=decode
    )
    kinds = tuple(args.kind) if args.kind else KINDS
    save = save_attention_html if suffix == ".html" else save_attention_png
    path = save(attention, args.out, kinds=kinds, layer=args.layer, head=args.head)
    print(f"translation: {attention.translation}")
    print(path)
    return 0


def _check_utf8(name: str, text: str) -> None:
    """An argument in another encoding reaches Python with its bytes as lone surrogates (PEP 383), which
    the tokenizer cannot take (a RuntimeError from sentencepiece's binding)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name} is not valid UTF-8 (character {error.start + 1}); give it in UTF-8") from None
