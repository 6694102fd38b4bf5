"""`BatchSource`'s background thread (every GPU run collates and pins its batches there) run on the CPU:
the same batches in the same order as collating in the loop, a `position` that names the next batch to
train on however far the thread has run ahead, the stream's errors raised in the training loop, and a
`close` that returns while the thread waits on a full queue."""

from __future__ import annotations

import threading
from itertools import islice

import pytest
import torch

from tformer.data.batching import BatchStream
from tformer.training.prefetch import BatchSource

PAD, BOS, EOS = 0, 1, 2


def make_stream() -> BatchStream:
    pairs = [([4 + i % 7] * (1 + i % 9), [5 + i % 3] * (1 + i % 5)) for i in range(60)]
    return BatchStream(pairs, max_tokens=30, seed=3, pad_id=PAD, bos_id=BOS, eos_id=EOS)


def same_batch(a, b) -> bool:
    return all(torch.equal(getattr(a, name), getattr(b, name)) for name in ("src_ids", "tgt_in", "tgt_out", "indices"))


def wait_until_full(source: BatchSource) -> None:
    for _ in range(3000):
        if source._queue is not None and source._queue.full():
            return
        threading.Event().wait(0.01)
    raise AssertionError("the background thread did not fill its queue")


def next_within(source: BatchSource, *, seconds: float):
    """next(source), or a failure (not a hung test run) if it has not come within `seconds`."""
    outcome: list = []

    def take() -> None:
        try:
            outcome.append(("batch", next(source)))
        except BaseException as error:
            outcome.append(("error", error))

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(timeout=seconds)
    assert outcome, f"no batch and no error within {seconds} s"
    kind, value = outcome[0]
    if kind == "error":
        raise value
    return value


def test_the_background_thread_hands_out_the_loop_s_batches_and_positions_across_epochs() -> None:
    per_epoch = len(make_stream().plan(0))
    count = 2 * per_epoch + 3  # into the third epoch
    in_loop = BatchSource(make_stream(), background=False, pin_memory=False)
    background = BatchSource(make_stream(), background=True, pin_memory=False, depth=2)
    try:
        for _ in range(count):
            assert same_batch(next(background), next(in_loop))
            assert background.position == in_loop.position
    finally:
        background.close()
    assert in_loop.position == {"epoch": 2, "index": 3}


def test_a_stream_resumed_at_the_position_continues_with_the_next_batch_the_thread_had_prepared() -> None:
    """The thread runs `depth` batches (and one in hand) ahead of training: the stream's own state is
    past them, `position` is not. A checkpoint records `position`."""
    source = BatchSource(make_stream(), background=True, pin_memory=False, depth=3)
    for _ in range(5):
        next(source)
    wait_until_full(source)
    position = source.position
    following = next(source)
    source.close()
    assert position == {"epoch": 0, "index": 5}
    assert source.stream.state_dict()["index"] > 6  # the stream itself is past what was handed out
    resumed = make_stream()
    resumed.load_state_dict(position)
    assert same_batch(next(iter(resumed))[2], following)


def test_an_error_in_the_stream_is_raised_in_the_training_loop() -> None:
    class Broken:
        def state_dict(self) -> dict[str, int]:
            return {"epoch": 0, "index": 0}

        def __iter__(self):
            yield from islice(make_stream(), 2)
            raise ValueError("pair 7 cannot be collated")

    source = BatchSource(Broken(), background=True, pin_memory=False)  # type: ignore[arg-type]
    next(source), next(source)
    with pytest.raises(ValueError, match="pair 7 cannot be collated"):
        next_within(source, seconds=30)
    assert source.position == {"epoch": 0, "index": 2}  # the last batch handed out
    source.close()


def test_close_returns_while_the_thread_waits_on_a_full_queue_and_stops_it() -> None:
    source = BatchSource(make_stream(), background=True, pin_memory=False, depth=1)
    next(source)
    thread = source._thread
    assert thread is not None
    wait_until_full(source)  # then the thread waits to put the batch in its hand
    done = threading.Event()
    closer = threading.Thread(target=lambda: (source.close(), done.set()), daemon=True)
    closer.start()
    assert done.wait(timeout=30), "close() did not return"
    assert not thread.is_alive()
