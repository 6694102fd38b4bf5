"""Batch concurrent translation requests together: an asyncio queue, one worker that owns the model.

Each request becomes a job (its sentences, its decode settings, a future) on an asyncio queue. The
scheduler task takes the first waiting job, then keeps collecting for at most `max_wait_ms`, or until
the jobs collected hold `max_batch_tokens` source tokens, and hands the whole window to a single worker
thread, the only one that touches the model. There, jobs with the same decode settings share a
`Translator` call (sorted by length, cut into batches of at most `max_batch_tokens` padded tokens) while
it holds at most `max_batch_tokens` source tokens; the calls run cheapest first, and each job's future
gets its translations, in input order, as soon as its call ends, so that a small request does not wait
for a large one that shares its window. While the worker decodes, new jobs wait in the queue and form
the next window. A job cancelled before its call starts (its client went away) is not decoded.

Batching never changes a result: beam search, greedy decoding and sampling are independent of the batch
a sentence shares (the decoding module's guarantee, checked by tests/test_serve.py against offline
translation), up to near-ties within float rounding (docs/serving.md).

On CPU in fp32 the model's weights are packed for oneDNN once, at `start()`, and kept until `stop()`
(tformer.model.packed; a server's weights never change), instead of once per window.

At most `max_queue` jobs wait in the queue (the window being decoded not counted); one more is refused
with `BatcherBusyError`, so that under overload a client is told at once to come back, instead of waiting
behind a queue that only grows. A cancelled job (its client went away) stops counting at once.

`stop()` lets every job already queued finish, then ends the scheduler and the worker; jobs submitted
after it are refused with `BatcherClosedError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from tformer.config import DecodeConfig
from tformer.decoding.memory import rows_per_sentence
from tformer.decoding.pipeline import TokenizerLike, Translation, Translator
from tformer.model.packed import packed_weights


class BatcherClosedError(RuntimeError):
    """The server is shutting down and accepts no new work."""


class BatcherBusyError(RuntimeError):
    """The queue holds `max_queue` jobs already."""


@dataclass
class _Job:
    sentences: list[str]
    config: DecodeConfig
    n_tokens: int
    future: asyncio.Future


@dataclass
class _Call:
    """Jobs (indices into a window) decoded by one Translator call, and their source tokens."""

    config: DecodeConfig
    members: list[int] = field(default_factory=list)
    tokens: int = 0


_STOP = None  # the sentinel that ends the scheduler, queued behind every earlier job

log = logging.getLogger(__name__)
BATCHER_FAILED = "the server's batcher stopped after an internal error; restart the server"


class Batcher:
    """The model's only user while serving: requests in from the event loop, translations out."""

    def __init__(
        self,
        model: Any,
        tokenizer: TokenizerLike,
        *,
        device: str | torch.device = "cpu",
        max_batch_tokens: int = 4096,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
    ) -> None:
        if max_batch_tokens < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError(
                "max_batch_tokens and max_queue must be positive and max_wait_ms >= 0; "
                f"got {max_batch_tokens}, {max_queue}, {max_wait_ms}"
            )
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._queue: asyncio.Queue[_Job | None] | None = None
        self._waiting: set[asyncio.Future] = set()  # futures of the queued jobs not yet cancelled
        self._scheduler: asyncio.Task | None = None
        self._window: list[_Job] = []  # the jobs being decoded
        self._worker: ThreadPoolExecutor | None = None
        self._closing = False
        self._packing = ExitStack()  # holds the packed weights from start() to stop()
        self.windows = 0  # decoding windows run so far (for /health and tests)

    @property
    def pending(self) -> int:
        """Jobs waiting for a window; a job whose client left no longer counts, though still queued."""
        return len(self._waiting)

    @property
    def accepting(self) -> bool:
        """Started, not stopping, and its scheduler alive: a job submitted now will be decoded."""
        return self._scheduler is not None and not self._scheduler.done() and not self._closing

    async def start(self) -> None:
        """Create the queue, the worker and the scheduler task in the running event loop."""
        self._packing.enter_context(packed_weights(self.model))
        self._queue = asyncio.Queue()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tformer-decode")
        self._scheduler = asyncio.create_task(self._schedule(), name="tformer-batcher")
        self._scheduler.add_done_callback(self._fail_waiting_jobs)

    @property
    def failed(self) -> bool:
        """The scheduler ended on an error, not on `stop()`: no job would ever be decoded."""
        return self._scheduler is not None and self._scheduler.done() and not self._closing

    def _fail_waiting_jobs(self, scheduler: asyncio.Task) -> None:
        """If the scheduler ends other than by `stop()`, log why and answer every job it left, queued or in
        its window, instead of leaving their requests waiting forever."""
        if self._closing:
            return
        if not scheduler.cancelled() and scheduler.exception() is not None:
            log.error("the batcher stopped on an error; restart the server", exc_info=scheduler.exception())
        for future in [*self._waiting, *(job.future for job in self._window)]:
            if not future.done():
                future.set_exception(BatcherClosedError(BATCHER_FAILED))

    async def stop(self) -> None:
        """Finish every queued job, then end the scheduler and the worker."""
        if self._scheduler is None or self._closing:
            return
        failed = self.failed
        self._closing = True
        if not failed:  # a failed scheduler has answered its jobs already
            await self._queue.put(_STOP)
            await self._scheduler
        self._worker.shutdown(wait=True)
        self._packing.close()

    def drop_waiting(self, reason: str) -> None:
        """Answer every job still waiting for a window with BatcherClosedError(reason) instead of decoding it
        (a forced shutdown: `stop()` then waits for the window under way alone)."""
        for future in list(self._waiting):
            if not future.done():
                future.set_exception(BatcherClosedError(reason))

    async def translate(self, sentences: list[str], config: DecodeConfig, *, n_tokens: int) -> list[list[Translation]]:
        """The n-best list of every sentence, decoded in a window with whatever else is waiting."""
        if self._closing or self._queue is None:
            raise BatcherClosedError("the server is shutting down")
        if self.failed:  # nothing would decode the job: refuse it instead of letting it wait forever
            raise BatcherClosedError(BATCHER_FAILED)
        if self.pending >= self.max_queue:
            raise BatcherBusyError(f"the server is busy ({self.pending} requests waiting); retry shortly")
        future = asyncio.get_running_loop().create_future()
        self._waiting.add(future)
        future.add_done_callback(self._waiting.discard)
        await self._queue.put(_Job(sentences, config, n_tokens, future))
        return await future

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            first = await self._queue.get()
            if first is _STOP:
                return
            jobs, stop = await self._collect(first)
            self._waiting.difference_update(job.future for job in jobs)
            jobs = [job for job in jobs if not job.future.done()]  # cancelled while waiting: the client left
            if not jobs:
                continue
            self._window = jobs
            try:
                outcomes = await loop.run_in_executor(self._worker, self._decode, jobs)
            except Exception as error:  # a failure around the decoding itself: this window's jobs get it
                outcomes = [error] * len(jobs)
            self.windows += 1
            for job, outcome in zip(jobs, outcomes, strict=True):
                _answer(job, outcome)  # each was answered as its call ended, unless the window failed around it
            self._window = []

    async def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """The jobs of one window, and whether the stop sentinel was met."""
        loop = asyncio.get_running_loop()
        jobs, tokens = [first], first.n_tokens
        deadline = loop.time() + self.max_wait_s
        while tokens < self.max_batch_tokens:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
            tokens += job.n_tokens
        return jobs, False

    def _decode(self, jobs: list[_Job]) -> list[list[list[Translation]] | BaseException]:
        """Runs on the worker thread: the window's jobs in Translator calls (`_calls`), the cheapest first,
        each job answered as soon as its call is decoded (not once the whole window is: a one-sentence
        request beside a large one would wait for the large one). Returns every job's outcome, as answered
        (None for a job whose client left before its call)."""
        outcomes: list[Any] = [None] * len(jobs)
        for call in self._calls(jobs):
            # a job whose client left since the window started (its future cancelled) is not decoded
            call.members = [index for index in call.members if not jobs[index].future.done()]
            if not call.members:
                continue
            for index, outcome in zip(call.members, self._decode_call(jobs, call), strict=True):
                outcomes[index] = outcome
                self._answer_soon(jobs[index], outcome)
        return outcomes

    def _decode_call(self, jobs: list[_Job], call: _Call) -> list[list[list[Translation]] | BaseException]:
        """The n-best lists of each job of `call`, from one Translator call; its error for each, if it fails."""
        lines = [sentence for index in call.members for sentence in jobs[index].sentences]
        try:
            translator = Translator(
                self.model,
                self.tokenizer,
                call.config,
                device=self.device,
                max_batch_tokens=self.max_batch_tokens,
                chunk_lines=max(1, len(lines)),
            )
            results = list(translator.translate(lines))
        except Exception as error:  # reported to these requests only; the server keeps serving
            return [error] * len(call.members)
        outcomes: list[list[list[Translation]] | BaseException] = []
        start = 0
        for index in call.members:
            count = len(jobs[index].sentences)
            outcomes.append(results[start : start + count])
            start += count
        return outcomes

    def _calls(self, jobs: list[_Job]) -> list[_Call]:
        """The window's jobs (indices) grouped into Translator calls, cheapest first. Jobs with the same
        decode settings share a call while it holds at most `max_batch_tokens` source tokens (a larger job
        has one of its own), taken from the cheapest (source tokens x rows per sentence) up, so that a small
        job is not decoded, nor answered, after a large one. Grouping changes no result: beam search, greedy
        decoding and sampling (whose draws hash the sentence, not its row) are independent of the batch a
        sentence shares."""
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i].n_tokens * rows_per_sentence(jobs[i].config), i))
        calls: list[_Call] = []
        open_calls: dict[DecodeConfig, _Call] = {}  # the last call of each setting, which may take more jobs
        for index in order:
            job = jobs[index]
            call = open_calls.get(job.config)
            if call is None or call.tokens + job.n_tokens > self.max_batch_tokens:
                call = open_calls[job.config] = _Call(job.config)
                calls.append(call)
            call.members.append(index)
            call.tokens += job.n_tokens
        return calls

    def _answer_soon(self, job: _Job, outcome: list[list[Translation]] | BaseException) -> None:
        """From the worker thread: give `job` its outcome on the event loop (unless its client has gone)."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the process is ending, nobody waits
            job.future.get_loop().call_soon_threadsafe(_answer, job, outcome)


def _answer(job: _Job, outcome: list[list[Translation]] | BaseException | None) -> None:
    """Settle the job's future with `outcome`, unless it is settled already (answered, or cancelled because
    its client left)."""
    if job.future.done() or outcome is None:
        return
    if isinstance(outcome, BaseException):
        job.future.set_exception(outcome)
    else:
        job.future.set_result(outcome)
