"""SIGTERM (what `kill`, `timeout` and schedulers send; torchrun passes it on to its processes) taken like
Ctrl-C while a long command works: the command then says what it kept, as its `KeyboardInterrupt`
handling does, and exits with status 130, instead of ending at once without a word."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt; the previous handler comes back after it. Only
    the main thread may set a handler: elsewhere (a command run from a thread) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
