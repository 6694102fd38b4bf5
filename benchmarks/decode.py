"""Decoding speed of tformer against Hugging Face MarianMTModel.generate and CTranslate2.

Same work for everyone (../../shared/BENCHMARKS.md rule 1): one random-weight model (tformer's, copied
into Marian with `to_marian`, then converted to CTranslate2), the same random sources, batch size, beam
size, and a fixed output length (minimum = maximum new tokens), so every system does the same number
of decoder steps. fp32 on CPU with the same thread count for all; bf16 on GPU (`--dtype` chooses another:
bfloat16 on the CPU too, for tformer and Hugging Face; CTranslate2 has no bfloat16 on the CPU).

    python benchmarks/decode.py --device cpu --preset small [--quick] [--record auto]

Prints one JSON line per figure: target_tokens_per_s, sentences_per_s and first_call_s (the untimed
warm-up run, compilation included; ../../shared/BENCHMARKS.md rule 2) per system and search, then
ratio_vs_hf and ratio_vs_ctranslate2 for tformer (on target tokens/s).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

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
    synchronize,
    write_record,
)

from tformer.config import DecodeConfig, preset
from tformer.decoding import generate
from tformer.model import Transformer
from tformer.model.packed import packed_weights

PAD, BOS, EOS, UNK = 0, 1, 2, 3


def parse_args():
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--sentences", type=int, default=None, help="default: 64 on CPU, 512 on GPU")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--src-len", type=int, default=None, help="default: 32 on CPU, 64 on GPU")
    parser.add_argument("--tgt-len", type=int, default=None, help="new tokens, fixed (default: as --src-len)")
    parser.add_argument("--beams", default="1,4", help="comma-separated beam sizes (1 = greedy)")
    parser.add_argument("--systems", default="tformer,hf,ctranslate2", help="comma-separated systems to run")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="every system's (default: float32 on the CPU, bfloat16 on the GPU)",
    )
    parser.add_argument(
        "--static-step", action="store_true", help="tformer: the fixed-shape step, a CUDA graph on GPU (static_step)"
    )
    parser.add_argument(
        "--compile-step", action="store_true", help="tformer: the static step compiled before it is recorded"
    )
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.sentences = args.sentences or (args.batch if args.quick else 512 if gpu else 64)
    args.src_len = args.src_len or (16 if args.quick else 64 if gpu else 32)
    args.tgt_len = args.tgt_len or args.src_len
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    if args.dtype == "bfloat16" and not gpu and "ctranslate2" in args.systems.split(","):
        parser.error("CTranslate2 has no bfloat16 on the CPU: leave it out with --systems tformer,hf")
    if args.quick:
        args.repeats = 1
    return args


def build_model(args) -> Transformer:
    config = preset(
        args.preset,
        src_vocab_size=args.vocab_size,
        tgt_vocab_size=args.vocab_size,
        sinusoidal_layout="concatenated",
        max_positions=max(512, args.tgt_len + 1),
    )
    return Transformer(config, seed=0).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


def tformer_system(model, batches, args, beam: int):
    config = DecodeConfig(
        beam_size=beam, nbest=1, max_len_a=0.0, max_len_b=args.tgt_len, min_len=args.tgt_len, length_penalty=1.0,
        length_normalization="average", static_step=args.static_step or args.compile_step,
        compile_step=args.compile_step,
    )  # fmt: skip

    def run() -> list[int]:
        lengths = []
        with packed_weights(model):  # once per run, as a Translator packs once per chunk of lines (timed)
            for src in batches:
                for hyps in generate(model, src, src_pad_mask=None, bos_id=BOS, eos_id=EOS, config=config):
                    lengths.append(len(hyps[0].tokens))
        return lengths

    return run


def hf_system(hf_model, batches, args, beam: int):
    def run() -> list[int]:
        lengths = []
        with torch.inference_mode():
            for src in batches:
                out = hf_model.generate(
                    input_ids=src, attention_mask=torch.ones_like(src), num_beams=beam, do_sample=False,
                    max_new_tokens=args.tgt_len, min_new_tokens=args.tgt_len, length_penalty=1.0, early_stopping=False,
                )  # fmt: skip
                lengths += [out.shape[1] - 1] * out.shape[0]  # minus the decoder start token
        return lengths

    return run


class _VocabularyOnly:
    """The least a CTranslate2 converter needs from a tokenizer: the vocabulary and two special tokens."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.eos_token, self.unk_token = tokens[EOS], tokens[UNK]

    def get_vocab(self) -> dict[str, int]:
        return {token: index for index, token in enumerate(self.tokens)}


class Ct2Process:
    """CTranslate2 decoding in a worker process of its own (benchmarks/ct2_worker.py explains why):
    each call asks it to translate every batch once and returns the lengths; `close` ends it."""

    def __init__(self, settings_path: Path) -> None:
        worker = Path(__file__).resolve().parent / "ct2_worker.py"
        self.process = subprocess.Popen(
            [sys.executable, str(worker), str(settings_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        if self.process.stdout.readline().strip() != "ready":
            raise SystemExit(f"the CTranslate2 worker did not start (exit code {self.process.wait()})")

    def __call__(self) -> list[int]:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def ct2_system(hf_model, batches, args, beam: int, workdir: Path, tokens: list[str]) -> Ct2Process:
    from ctranslate2.converters import TransformersConverter  # converting runs no OpenMP work here

    target = workdir / "ct2"
    if not target.exists():
        hf_dir = workdir / "hf"
        hf_model.save_pretrained(hf_dir)

        class Converter(TransformersConverter):
            def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
                return _VocabularyOnly(tokens)

        Converter(str(hf_dir)).convert(str(target), force=True)
    gpu = args.device == "cuda"
    settings = dict(
        model_dir=str(target), device=args.device, compute_type=args.dtype,
        intra_threads=0 if gpu else args.threads, beam=beam, batch=args.batch, length=args.tgt_len,
        batches=[[[tokens[i] for i in row] for row in src.tolist()] for src in batches],
    )  # fmt: skip
    settings_path = workdir / f"ct2_beam{beam}.json"
    settings_path.write_text(json.dumps(settings))
    return Ct2Process(settings_path)


def main() -> None:
    args = parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    systems = args.systems.split(",")
    model = build_model(args)
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(4, args.vocab_size - 1, (args.sentences, args.src_len), generator=generator)
    src[:, -1] = EOS
    batches = [chunk.to(args.device) for chunk in src.split(args.batch)]
    hf_model = (
        hf_rival(model, bos_id=BOS, eos_id=EOS, pad_id=PAD).to(args.device)
        if "hf" in systems or "ctranslate2" in systems
        else None
    )
    # CTranslate2's Marian loader drops the last vocabulary row (Hugging Face's appended <pad>): name it so,
    # and never use it in sources. CTranslate2 thus projects onto V - 1 tokens, 1/V less output work.
    tokens = ["<blank>", "<s>", "</s>", "<unk>"] + [f"t{i}" for i in range(4, args.vocab_size - 1)] + ["<pad>"]
    common: dict[str, Any] = dict(
        bench="decode", preset=args.preset, device=args.device, dtype=args.dtype, batch=args.batch
    )
    if args.static_step or args.compile_step:
        common["tformer_static_step"] = True
    if args.compile_step:
        common["tformer_compile_step"] = True
    lines = []
    with tempfile.TemporaryDirectory() as workdir:
        for beam in (int(b) for b in args.beams.split(",")):
            runs = {}
            if "tformer" in systems:
                runs["tformer"] = tformer_system(model, batches, args, beam)
            if "hf" in systems:
                runs["hf"] = hf_system(hf_model, batches, args, beam)
            if "ctranslate2" in systems:
                runs["ctranslate2"] = ct2_system(hf_model, batches, args, beam, Path(workdir), tokens)
            first_call_s = {}
            for name, run in runs.items():  # same work: every system must produce exactly tgt_len tokens
                start = time.perf_counter()  # the untimed warm-up: with --compile-step it compiles, timed apart
                lengths = set(run())
                synchronize(args.device)
                first_call_s[name] = time.perf_counter() - start
                if lengths != {args.tgt_len}:
                    raise SystemExit(f"{name} beam {beam} produced lengths {sorted(lengths)}, expected {args.tgt_len}")
            times = interleaved_medians(runs, repeats=args.repeats, warmup=0, device=args.device)
            if args.profile:
                print_profiles({name: run for name, run in runs.items() if name != "ctranslate2"}, args.device)
            if "ctranslate2" in runs:
                runs["ctranslate2"].close()
            rates = {}
            for name, seconds in times.items():
                rates[name] = args.sentences * args.tgt_len / median(seconds)
                shared = dict(common, system=name, beam=beam, sentences=args.sentences, src_len=args.src_len,
                              tgt_len=args.tgt_len)  # fmt: skip
                lines.append(emit(**shared, metric="target_tokens_per_s", value=round(rates[name], 1)))
                lines.append(emit(**shared, metric="sentences_per_s", value=round(args.sentences / median(seconds), 2)))
                lines.append(emit(**shared, metric="seconds_all_repeats", value=[round(s, 3) for s in seconds]))
                lines.append(emit(**shared, metric="first_call_s", value=round(first_call_s[name], 3)))
            if args.device == "cuda":  # peak memory of the torch systems, one more run each
                for name in ("tformer", "hf"):
                    if name in runs:
                        torch.cuda.reset_peak_memory_stats()
                        runs[name]()
                        peak = torch.cuda.max_memory_allocated() / 2**20
                        lines.append(
                            emit(**common, system=name, beam=beam, metric="peak_memory_mb", value=round(peak, 1))
                        )
            for rival in ("hf", "ctranslate2"):
                if "tformer" in rates and rival in rates:
                    lines.append(emit(**common, system="tformer", beam=beam, metric=f"ratio_vs_{rival}",
                                      value=round(rates["tformer"] / rates[rival], 3)))  # fmt: skip
    path = record_path("decode", args.device, args.record, preset=args.preset)
    if path is not None:
        notes = (
            f"Random-weight `{args.preset}` model, vocabulary {args.vocab_size}, {args.sentences} sentences of "
            f"{args.src_len} source tokens, batch {args.batch}, exactly {args.tgt_len} new tokens per sentence "
            f"(min = max), {args.dtype}{f', {args.threads} threads for every system' if args.device == 'cpu' else ''}. "
            f"Median of {args.repeats} interleaved repeats after one untimed warm-up run per system (the length "
            "check, its seconds reported as first_call_s: with --compile-step they include compilation); each "
            "timed run starts after 1 s idle, so threads a previous system left spinning are idle. "
            "HF: MarianMTModel.generate(num_beams, max_new_tokens=min_new_tokens, length_penalty=1.0); "
            f"attention implementation {getattr(hf_model.config, '_attn_implementation', '?') if hf_model else '-'}. "
            "CTranslate2: the same Marian weights converted with TransformersConverter (a vocabulary-only "
            "tokenizer), translate_batch with max_decoding_length = min_decoding_length, in a worker process of "
            "its own (benchmarks/ct2_worker.py: in torch's process its OpenMP calls bind to torch's libgomp and "
            "slow down the torch systems timed after it), timed from here like the others. CTranslate2's Marian "
            "decoder starts from a zero embedding instead of the bos embedding, which changes no amount of work; its "
            "Marian loader drops the last vocabulary row, so it projects onto V - 1 tokens. tformer's run packs "
            "its weights for oneDNN once (on the CPU in fp32; inside the timed run), as `Translator` does per "
            "chunk of lines."
        )
        if args.static_step or args.compile_step:
            notes += (
                " tformer ran with DecodeConfig.static_step: a fixed-shape step (static cache, no rows dropped); "
                "on GPU each shape's step (for beam search the whole search step) is recorded as a CUDA graph once "
                "and kept, so the recording happens in the untimed warm-up run and the timed runs replay it."
            )
        if args.compile_step:
            notes += " The step was compiled (torch.compile) before it was recorded (DecodeConfig.compile_step)."
        write_record(path, title=f"Decoding speed, {args.device}, {args.preset}", env=environment(args.device),
                     lines=lines, notes=notes)  # fmt: skip
        print(f"record written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
