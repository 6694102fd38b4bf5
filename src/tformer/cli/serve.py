"""Serve a run over HTTP: POST /translate, GET /health, OpenAPI docs at /docs (FastAPI on uvicorn).

Binds to 127.0.0.1 unless --host says otherwise. Concurrent requests are decoded together in windows
of at most --max-batch-tokens source tokens, collected for at most --max-wait-ms. Ctrl-C or SIGTERM stops
taking new connections, finishes the requests in flight, then exits. See docs/serving.md.
"""

from __future__ import annotations

import argparse
import sys

HELP = "serve a run over HTTP (POST /translate, GET /health)"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run (or checkpoint) directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--max-batch-tokens", type=int, default=4096, help="source tokens per window (default: 4096)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait to fill a window (default: 5)")
    parser.add_argument("--max-sentences", type=int, default=64, help="sentences per request (default: 64)")
    parser.add_argument("--max-chars", type=int, default=1000, help="characters per sentence (default: 1000)")
    parser.add_argument("--max-beam", type=int, default=8, help="largest beam a request may ask (default: 8)")
    parser.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds to finish requests on exit")


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tformer.serving import ServeConfig, create_app
    from tformer.training.checkpoint import load_run

    config = ServeConfig(
        max_sentences=args.max_sentences,
        max_chars=args.max_chars,
        max_beam=args.max_beam,
        max_batch_tokens=args.max_batch_tokens,
        max_wait_ms=args.max_wait_ms,
    )
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    loaded = load_run(args.run_dir, device=args.device)
    name = loaded.run_dir.name if loaded.run_dir is not None else loaded.checkpoint_dir.name
    app = create_app(
        loaded.model, loaded.tokenizer, loaded.experiment.decode, config=config, device=args.device, name=name
    )
    if args.host not in LOOPBACK:
        print(f"warning: serving on {args.host}, reachable from other machines", file=sys.stderr)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=args.graceful_timeout
    )
    return 0
