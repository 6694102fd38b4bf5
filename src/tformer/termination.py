"""SIGTERM (what `kill`, `timeout` and schedulers send; torchrun passes it on to its processes) taken like
Ctrl-C while a long command works: the command then says what it kept, as its `KeyboardInterrupt`
handling does, and exits with status 130, instead of ending at once without a word.

And interrupts held back while torch is imported: torch's C extension imports numpy as it loads and
drops a KeyboardInterrupt raised inside that import, leaving numpy half-imported; the command then
went on and failed later with a traceback (`module 'numpy' has no attribute 'matrix'`), or aborted."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Within the block, Ctrl-C (SIGINT) and SIGTERM wait: the first to come is sent again when the block
    ends, to the handler that was there before it (Ctrl-C's raises KeyboardInterrupt; SIGTERM's default
    ends the process). For work that must not be cut in the middle, such as importing torch. Only the
    main thread may set a handler: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: held.append(number)) for number in HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if held:
        signal.raise_signal(held[0])


def import_torch() -> None:
    """Import torch whole (see `interrupts_held`); a command that needs it calls this before anything else."""
    with interrupts_held():
        import torch  # noqa: F401
