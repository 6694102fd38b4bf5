"""Training batches from a BatchStream, collated and pinned ahead of time on GPU runs.

On a GPU, collating the next batch (Python) and copying it to pinned memory should happen while the
device still works on the current step; a small background thread does that, `depth` batches ahead.
On the CPU the same cores would do both, so batches are collated in the loop, in order, with nothing
running in the background: the CPU path stays simple and deterministic.

The stream runs ahead of training when prefetching, so its own position is not the training
position. `position` is: the stream state right after the last batch *handed out*, which is what a
checkpoint must record for a resumed run to continue with the next batch.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

from tformer.data.batching import Batch, BatchStream


class BatchSource:
    def __init__(self, stream: BatchStream, *, background: bool, pin_memory: bool, depth: int = 2) -> None:
        self.stream = stream
        self.position = stream.state_dict()
        self._pin = pin_memory
        self._iterator: Iterator[tuple[int, int, Batch]] = iter(stream)
        self._queue: queue.Queue | None = queue.Queue(maxsize=depth) if background else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __iter__(self) -> BatchSource:
        return self

    def __next__(self) -> Batch:
        if self._queue is None:
            epoch, index, batch = next(self._iterator)
        else:
            if self._thread is None:
                self._thread = threading.Thread(target=self._fill, name="tformer-prefetch", daemon=True)
                self._thread.start()
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            epoch, index, batch = item
        self.position = {"epoch": epoch, "index": index + 1}
        return batch

    def close(self) -> None:
        """Stop the background thread (the batches it prepared are dropped; `position` stays valid)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):  # unblock a pending put
                    self._queue.get_nowait()  # type: ignore[union-attr]
                self._thread.join(timeout=0.05)
            self._thread = None

    def _fill(self) -> None:
        assert self._queue is not None
        try:
            for epoch, index, batch in self._iterator:
                item = (epoch, index, batch.pin_memory() if self._pin else batch)
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as error:  # handed to the training loop, which raises it
            self._queue.put(error)
