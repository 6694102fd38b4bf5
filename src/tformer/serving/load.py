"""A load generator for the HTTP API, shared by benchmarks/serve.py and tests/test_serve.py.

It sends a fixed list of request bodies with at most `concurrency` in flight, from the calling process
(the server runs in another), and returns every response with its latency, so the caller can check
each one against offline translation and report throughput and latency percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Reply:
    body: dict[str, Any]  # what was sent
    status: int  # 0: no HTTP response (connection error or timeout)
    response: dict[str, Any] | None
    latency_s: float


@dataclass
class LoadReport:
    replies: list[Reply]
    wall_s: float

    @property
    def errors(self) -> int:
        return sum(reply.status != 200 for reply in self.replies)

    @property
    def requests_per_s(self) -> float:
        return len(self.replies) / self.wall_s

    @property
    def sentences_per_s(self) -> float:
        return sum(len(reply.body["sentences"]) for reply in self.replies) / self.wall_s

    def latency_percentile(self, q: float) -> float:
        """The q-th percentile (0-100) of request latency in seconds, nearest rank."""
        ordered = sorted(reply.latency_s for reply in self.replies)
        rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
        return ordered[rank]


async def _send_all(url: str, bodies: list[dict[str, Any]], concurrency: int, timeout_s: float) -> LoadReport:
    import httpx

    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:

        async def one(body: dict[str, Any]) -> Reply:
            async with limit:
                start = time.perf_counter()
                try:
                    response = await client.post("/translate", json=body)
                except httpx.HTTPError:
                    return Reply(body, 0, None, time.perf_counter() - start)
                latency = time.perf_counter() - start
                return Reply(body, response.status_code, response.json(), latency)

        start = time.perf_counter()
        replies = await asyncio.gather(*(one(body) for body in bodies))
        return LoadReport(list(replies), time.perf_counter() - start)


def send_all(url: str, bodies: list[dict[str, Any]], *, concurrency: int, timeout_s: float = 60.0) -> LoadReport:
    """POST every body to URL/translate, at most `concurrency` at a time; replies in `bodies` order."""
    return asyncio.run(_send_all(url, bodies, concurrency, timeout_s))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server_process(
    run_dir: str | Path, *, options: Sequence[str] = (), startup_s: float = 60.0
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`tformer serve RUN_DIR` on 127.0.0.1 in a child process, once /health answers; stopped with
    SIGTERM (then killed if it has not exited within 30 s) when the block ends."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "tformer.cli.main", "serve", str(run_dir), "--port", str(port), *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited with status {process.returncode}: {process.stdout.read()}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not answer /health within {startup_s} s")
            time.sleep(0.1)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()
