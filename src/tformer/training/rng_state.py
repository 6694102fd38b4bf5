"""The global random generators' states, as a checkpoint keeps them and a resumed run restores them.

Python's, numpy's, torch's and every GPU's generator are saved with each checkpoint, after everything
that draws from them at that step, so a resumed run draws what the uninterrupted one would have
(dropout masks, batch shuffling of later epochs, sampling). The states are stored as lists, numbers and
tensors only, which `torch.load(weights_only=True)` reads: python's tuple as a list, numpy's key array as
an int64 tensor.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def rng_state() -> dict[str, Any]:
    """{"python", "numpy", "torch", "cuda"}: the generators' states now ("cuda": one per GPU, [] without)."""
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def load_rng_state(state: dict[str, Any]) -> None:
    """Give every generator the state `rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    restore_cuda_rng(state["cuda"])


def restore_cuda_rng(states: list[Tensor]) -> None:
    """Give each GPU of this machine the generator state saved for the GPU of the same index.

    A checkpoint holds one state per GPU of the machine that wrote it (none from a machine without CUDA).
    Resumed where there are fewer GPUs, the states of GPUs this machine lacks are left out:
    `torch.cuda.set_rng_state_all` would index past the last GPU and fail."""
    if states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states[: torch.cuda.device_count()])
