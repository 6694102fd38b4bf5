"""Serve a run over HTTP: POST /translate, GET /health, GET /ready, OpenAPI docs at /docs (FastAPI on uvicorn).

Binds to 127.0.0.1 unless --host says otherwise, before loading the model, and prints one line on stderr
once it accepts connections. Concurrent requests are decoded together in windows of at most
--max-batch-tokens source tokens, collected for at most --max-wait-ms. Ctrl-C or SIGTERM stops taking new
connections, finishes the requests in flight, then exits. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import functools
import sys

from tformer.cli.argument_types import path_text
from tformer.cli.decode_options import (
    add_decode_settings_argument,
    add_dtype_argument,
    apply_decode_settings,
    decode_settings,
    warn_unused_sampling_settings,
)
from tformer.cli.extras import require
from tformer.config import DecodeConfig

HELP = "serve a run over HTTP (POST /translate, GET /health, GET /ready)"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=path_text, metavar="RUN_DIR", help="a training run (or checkpoint) directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument(
        "--port", type=int, default=8000, help="port (default: 8000; 0: any free port, printed at startup)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    add_dtype_argument(parser)
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="source tokens per window (default: 4096)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a window (default: 5)")
    parser.add_argument("--max-sentences", type=int, default=64, help="sentences per request (default: 64)")
    parser.add_argument("--max-chars", type=int, default=1000, help="characters per sentence (default: 1000)")
    parser.add_argument("--max-beam", type=int, default=8, help="largest beam a request may ask (default: 8)")
    parser.add_argument(
        "--max-decode-tokens",
        type=int,
        default=65536,
        help="worst case per request, sentences x beam x max output length; more get 413 (default: 65536)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting; more get 503 + Retry-After (default: 256)"
    )
    parser.add_argument(
        "--graceful-timeout", type=float, default=30.0, help="seconds to finish requests on exit (default: 30)"
    )
    add_decode_settings_argument(parser, then="a request's beam, nbest and max_length apply after it")


def run(args: argparse.Namespace) -> int:
    require(["fastapi", "uvicorn"], command="serve", extra="serve")  # before importing tformer.serving
    from tformer.runtime import resolve_decode_dtype, resolve_device
    from tformer.serving import ServeConfig, create_app
    from tformer.serving.app import SHUT_DOWN
    from tformer.serving.server import bind, host_port, plain_host, serve
    from tformer.training.checkpoint_load import load_run

    config = ServeConfig(
        max_sentences=args.max_sentences,
        max_chars=args.max_chars,
        max_beam=args.max_beam,
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_decode_tokens=args.max_decode_tokens,
    )
    _check_listen_options(args)
    host = plain_host(args.host)  # [::1] as ::1, for the loopback check and the lines below too
    settings = decode_settings(args.decode_settings)
    device = resolve_device(args.device, setting="--device")  # before loading: a bad device is one line
    dtype = resolve_decode_dtype(args.dtype, device)
    with bind(host, args.port) as listener:  # before loading too: a busy port fails at once
        if host not in LOOPBACK:
            print(f"warning: serving on {host}, reachable from other machines", file=sys.stderr)
        loaded = load_run(args.run_dir, device=device, dtype=dtype)
        name = loaded.run_dir.name if loaded.run_dir is not None else loaded.checkpoint_dir.name
        decode = apply_decode_settings(loaded.experiment.decode, settings)  # what a request does not choose
        warn_unused_sampling_settings(decode, settings)
        capped = _capped_beam_line(decode, max_beam=config.max_beam, beam_from_set="beam_size" in settings)
        if capped:
            print(capped, file=sys.stderr)
        app = create_app(loaded.model, loaded.tokenizer, decode, config=config, device=device, name=name)
        address = host_port(host, listener.getsockname()[1])  # the real port, also for --port 0
        endpoints = "POST /translate, GET /health, GET /ready, /docs"
        ready = f"serving {args.run_dir} on http://{address} ({endpoints}; Ctrl-C to stop)"
        drop_waiting = functools.partial(app.state.batcher.drop_waiting, SHUT_DOWN)  # on a second Ctrl-C
        serve(app, listener, graceful_timeout=args.graceful_timeout, ready_line=ready, on_force_exit=drop_waiting)
    return 0


def _capped_beam_line(decode: DecodeConfig, *, max_beam: int, beam_from_set: bool) -> str | None:
    """The startup line saying that a request without a beam gets --max-beam, not the beam asked for (a
    sampling server has none to cap: it draws nbest samples whatever beam_size)."""
    if decode.sampling or decode.beam_size <= max_beam:
        return None
    whose = "--set decode.beam_size" if beam_from_set else "the run's decode.beam_size"
    nbest = f" and nbest {max_beam}" if decode.nbest > max_beam else ""
    return (
        f"warning: {whose}={decode.beam_size} is over --max-beam {max_beam}: "
        f"a request that sends no beam is decoded with beam {max_beam}{nbest}"
    )


def _check_listen_options(args: argparse.Namespace) -> None:
    """Refuse a port or a shutdown delay that uvicorn would take without complaint and misuse."""
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if not args.graceful_timeout >= 0:  # also refuses nan
        raise ValueError(f"--graceful-timeout must be at least 0 seconds, got {args.graceful_timeout}")
