"""A stand-in for the torch.cuda stream and graph API, so that the CPU can run the code paths that record
CUDA graphs and check what they asked for: which GPU each stream and each capture belongs to, and the
capture mode. Kernels are not recorded: a "capture" runs the function eagerly on the CPU, and a replay
only counts.

Like torch, entering a stream makes its GPU the current one, and `torch.cuda.graph` without a `stream`
records on one default capture stream, made on whichever GPU was current when it was first needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch


@dataclass
class FakeStream:
    device: torch.device

    def wait_stream(self, other: FakeStream) -> None:
        pass


@dataclass
class FakeGraph:
    captured_on: torch.device | None = None  # the GPU of the capture stream
    capture_error_mode: str | None = None
    replays: int = 0

    def replay(self) -> None:
        if self.captured_on is None:
            raise RuntimeError("Called CUDAGraph::replay without a preceding successful capture.")
        self.replays += 1


@dataclass
class FakeCuda:
    current: int = 0  # the current GPU
    default_capture_stream: FakeStream | None = None
    graphs: list[FakeGraph] = field(default_factory=list)
    fail_captures: int = 0  # how many of the next captures raise, as a capture that CUDA refuses does

    def _device(self, device: torch.device | str | int | None) -> torch.device:
        if device is None:
            return torch.device("cuda", self.current)
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        return torch.device("cuda", self.current if device.index is None else device.index)

    def stream_class(self, device=None, priority: int = 0) -> FakeStream:
        return FakeStream(self._device(device))

    def current_stream(self, device=None) -> FakeStream:
        return FakeStream(self._device(device))

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        before, self.current = self.current, stream.device.index
        try:
            yield
        finally:
            self.current = before

    def graph_class(self) -> FakeGraph:
        graph = FakeGraph()
        self.graphs.append(graph)
        return graph

    @contextlib.contextmanager
    def graph(self, graph: FakeGraph, pool=None, stream=None, capture_error_mode: str = "global") -> Iterator[None]:
        if stream is None:
            if self.default_capture_stream is None:
                self.default_capture_stream = FakeStream(self._device(None))
            stream = self.default_capture_stream
        if self.fail_captures > 0:
            self.fail_captures -= 1
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        with self.stream(stream):
            yield
        graph.captured_on, graph.capture_error_mode = stream.device, capture_error_mode


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "Stream", fake.stream_class)
    monkeypatch.setattr(torch.cuda, "current_stream", fake.current_stream)
    monkeypatch.setattr(torch.cuda, "stream", fake.stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", fake.graph_class)
    monkeypatch.setattr(torch.cuda, "graph", fake.graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: ("pool",))
    return fake
