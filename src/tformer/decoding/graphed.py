"""Record a function of fixed buffers once as a CUDA graph, then replay it with a single launch.

A CUDA graph holds the kernels a function launched while it was recorded, with the addresses they
read and wrote. Replaying it runs the same kernels on the same addresses: the function's Python never
runs again, so its inputs must be written into the buffers it read, and its outputs read from the
tensors it returned at capture time. The function must not synchronise with the host or copy from it.

Before recording, the function runs twice on a side stream (cuBLAS and attention kernels set up their
workspaces on a first call). Those runs change the buffers they write, so every tensor in `mutable`
is saved before and restored after them: a capture leaves the buffers as it found them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tformer.runtime import recording


class GraphedFunction:
    """`function` recorded on first `replay` and replayed from then on (CUDA only)."""

    def __init__(self, function: Callable[[], object], *, mutable: Sequence[Tensor], device: torch.device) -> None:
        """`device`: the GPU that `function` computes on (its streams and the graph must be that GPU's)."""
        self.function: Callable[[], object] | None = function
        self.mutable = list(mutable)
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: object = None  # what `function` returned while recorded; rewritten by each replay

    def replay(self) -> object:
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.outputs

    def _capture(self) -> None:
        assert self.function is not None
        saved = [tensor.clone() for tensor in self.mutable]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.function()
                for tensor, copy in zip(self.mutable, saved, strict=True):
                    tensor.copy_(copy)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with recording(graph, self.device):  # records the kernels without running them
            outputs = self.function()
        # kept only once recorded: after a failed capture (out of memory, say) the next replay records again,
        # instead of replaying an unrecorded graph for every later batch of this shape (a server's worker)
        self.graph, self.outputs = graph, outputs
        self.function = None  # the graph replays without it (and holds no reference to the model)
        self.mutable = []
