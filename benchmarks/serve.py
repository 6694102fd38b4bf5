"""Load test of `tformer serve`: throughput and latency under concurrent requests, every answer checked.

The server runs in a child process on 127.0.0.1; this process sends a fixed number of requests (1-4
number-word sentences each, e.g. "three hundred and twelve") with at most --concurrency in flight, then
checks that every response equals the offline translation (`Translator`, same decode settings) and
reports requests/s, sentences/s and p50/p99 latency. Without --run it serves a random-weight model of
--preset with a tokenizer trained on number words (speed does not depend on the weights being trained,
except through output lengths: fixed here with --max-length and an eos-free random model).

    python benchmarks/serve.py [--run RUN_DIR] [--requests 200] [--concurrency 16] [--record auto]
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import common_arguments, emit, environment, record_path, write_record

from tformer.config import DecodeConfig, ExperimentConfig, preset
from tformer.data.numbers import english
from tformer.data.tokenizer import Tokenizer
from tformer.decoding.pipeline import Translator
from tformer.model import Transformer
from tformer.serving.load import send_all, server_process
from tformer.training.checkpoint import step_name
from tformer.training.checkpoint_load import load_run
from tformer.training.checkpoint_save import save_checkpoint, write_pointer


def parse_args():
    parser = common_arguments(__doc__.splitlines()[0])
    parser.add_argument("--run", default=None, help="serve this run (default: a random-weight model)")
    parser.add_argument("--requests", type=int, default=200, help="requests to send (default: 200)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight at once (default: 16)")
    parser.add_argument("--beam", type=int, default=1, help="beam size of every request (default: 1, greedy)")
    parser.add_argument("--max-length", type=int, default=24, help="output tokens per sentence (default: 24)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="the server's --max-wait-ms (default: 5)")
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error("the load test serves on the CPU (the server runs in a child process); leave out --device")
    if args.repeats != parser.get_default("repeats"):
        parser.error("the load test runs once (its latencies are per request); leave out --repeats")
    return args


def random_run(directory: Path, preset_name: str) -> Path:
    numbers = [english(n) for n in range(1, 2000, 7)]
    tokenizer = Tokenizer.train(numbers, numbers, vocab_size=500)
    config = preset(
        preset_name, src_vocab_size=tokenizer.src_vocab_size, tgt_vocab_size=tokenizer.tgt_vocab_size, dropout=0.0
    )
    model = Transformer(config, seed=0).eval()
    name = step_name(0)
    save_checkpoint(
        directory, name, experiment=ExperimentConfig(model=config, decode=DecodeConfig()), tokenizer=tokenizer,
        model=model, step=0, trainer_state=None,
    )  # fmt: skip
    write_pointer(directory, "latest", name)
    return directory


def main() -> None:
    args = parse_args()
    rng = random.Random(0)
    bodies = [
        {
            "sentences": [english(rng.randrange(1, 1_000_000)) for _ in range(rng.randint(1, 4))],
            "beam": args.beam,
            "max_length": args.max_length,
        }
        for _ in range(args.requests // 10 if args.quick else args.requests)
    ]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the server child's torch threads (--threads)
    with tempfile.TemporaryDirectory() as scratch:
        run = Path(args.run) if args.run else random_run(Path(scratch) / "run", args.preset)
        loaded = load_run(run)
        options = ["--max-wait-ms", str(args.max_wait_ms), "--max-sentences", "4"]
        with server_process(run, options=options) as (url, _):
            send_all(url, bodies[: args.concurrency], concurrency=args.concurrency)  # warm-up, not counted
            report = send_all(url, bodies, concurrency=args.concurrency)
    config = dataclasses.replace(
        loaded.experiment.decode, beam_size=args.beam, nbest=1, max_len_a=0.0, max_len_b=args.max_length
    )
    translator = Translator(loaded.model, loaded.tokenizer, config)
    wrong = sum(
        reply.status != 200
        or [t["text"] for t in reply.response["translations"]] != translator.translate_texts(reply.body["sentences"])
        for reply in report.replies
    )
    common = dict(bench="serve", preset=args.preset if not args.run else "run", device="cpu", system="tformer")
    common |= dict(threads=args.threads, beam=args.beam)
    common |= dict(requests=len(bodies), concurrency=args.concurrency, max_wait_ms=args.max_wait_ms)
    lines = [
        emit(**common, metric="requests_per_s", value=round(report.requests_per_s, 2)),
        emit(**common, metric="sentences_per_s", value=round(report.sentences_per_s, 2)),
        emit(**common, metric="latency_p50_ms", value=round(report.latency_percentile(50) * 1000, 1)),
        emit(**common, metric="latency_p99_ms", value=round(report.latency_percentile(99) * 1000, 1)),
        emit(**common, metric="errors", value=report.errors),
        emit(**common, metric="wrong_or_failed", value=wrong),
    ]
    path = record_path("serve", "cpu", args.record)
    if path is not None:
        notes = (
            f"Server: `tformer serve` in a child process on 127.0.0.1 (uvicorn, one decoding worker, "
            f"--max-wait-ms {args.max_wait_ms}, --max-batch-tokens 4096). Client: this process, httpx "
            f"AsyncClient, {args.concurrency} requests in flight, {len(bodies)} requests of 1-4 random "
            f"number-word sentences, beam {args.beam}, max_length {args.max_length}. One untimed warm-up "
            "round. Latency: from sending to the full response, per request. `wrong_or_failed` counts "
            "responses that differ from offline `Translator` output with the same settings. Both processes "
            "share the machine's cores."
        )
        write_record(
            path, title=f"Serving load test, cpu, {common['preset']}", env=environment("cpu"), lines=lines, notes=notes
        )


if __name__ == "__main__":
    main()
