"""Weights prepacked for oneDNN: the same linear layers, a faster matrix product for fp32 inference on CPU.

On CPU, `nn.Linear` multiplies with MKL's sgemm. oneDNN, given each weight once reordered into its own
blocked layout (`torch.ops.mkldnn._reorder_linear_weight`, what torch.compile's CPU backend does when it
freezes a model's weights), computes the same products faster on this project's CPUs (AMD EPYC with
AVX-512): the `small` output projection at 128 rows takes 2.4 ms instead of 3.7 ms, and beam search
ran 15% faster end to end in a development A/B (recorded ratios against the rivals: docs/performance.md).
Its result for a row does not depend on how many rows the batch has, bit for bit; MKL's does (1 or 5 rows
give other last bits than 4), so decoding with packed weights is also exactly batch-invariant in its
arithmetic.

Packed copies are only valid while the weights do not change and carry no gradient, so they exist only
inside `with packed_weights(model):`, and are used only with autograd off (`torch.no_grad` or
`torch.inference_mode`) and no autocast, for fp32 inputs on the CPU. Outside the block the layers are plain `nn.Linear`.

A step compiled by torch.compile cannot hold oneDNN's opaque copies, so on the CPU its products are one
operator of tformer's own, `tformer::packed_linear(x, weight, bias, relu)`, which the compiler leaves as a
call: at run time it looks up the packed copy of `weight` (registered while a `packed_weights` block holds
it) and multiplies with it, or computes `F.linear` when there is none. Without it, a compiled decoding step
on the CPU multiplied with MKL's unpacked sgemm and ran slower than the eager step.

Shape legend: I input features (any leading dims), O output features, M rows (the leading dims flattened).
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROWS_HINT = 128  # the rows a packed layout is tuned for (batch 32 x beam 4); any row count works


def can_pack(weight: Tensor) -> bool:
    """oneDNN packing applies: an fp32 weight on the CPU, and a torch built with oneDNN."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def pack(weight_OI: Tensor) -> Tensor:
    """The weight in oneDNN's blocked layout (an opaque tensor only `linear` below can use)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight_OI.detach(), ROWS_HINT)


# The packed copies that `packed_weights` blocks hold, by their weight (`_weight_key`), each with an alias of its
# weight's numbers: held here, they cannot be freed and their address given to another tensor while the entry
# lives, even if the parameter is given other numbers (`.data =`, as `model.to(dtype)` does). An entry also counts
# the blocks that hold the weight (two models sharing it, packed in two threads): it lives until the last exits.
_PACKED_COPIES: dict[tuple, tuple[Tensor, Tensor, int]] = {}
_PACKED_COPIES_LOCK = threading.Lock()


def _weight_key(weight_OI: Tensor) -> tuple:
    """Where a weight's numbers are (address, shape, strides, dtype): the same for the parameter and for any
    tensor a compiled graph hands over that reads the same numbers."""
    return (weight_OI.data_ptr(), tuple(weight_OI.shape), weight_OI.stride(), weight_OI.dtype)


def _product(x_I: Tensor, weight_OI: Tensor, bias_O: Tensor | None, packed: Tensor | None, relu: bool) -> Tensor:
    """x W^T + b (then ReLU): with the packed copy when given, else `F.linear`."""
    if packed is None:
        y_O = F.linear(x_I, weight_OI, bias_O)
        return F.relu(y_O) if relu else y_O
    post_op = "relu" if relu else "none"
    rows = math.prod(x_I.shape[:-1])
    padded_rows = rows_kept(rows)
    if padded_rows == rows:  # no reshaping on the way: a few microseconds a product, ~5% of a one-sentence step
        return torch.ops.mkldnn._linear_pointwise(x_I, packed, bias_O, post_op, [], "")
    # zero rows: a row's result does not depend on the others (module docstring)
    x_MI = torch.cat([x_I.reshape(rows, -1), x_I.new_zeros(padded_rows - rows, x_I.shape[-1])])
    y_MO = torch.ops.mkldnn._linear_pointwise(x_MI, packed, bias_O, post_op, [], "")
    return y_MO[:rows].view(*x_I.shape[:-1], y_MO.shape[-1])


def rows_kept(rows: int) -> int:
    """The row count a packed product computes for `rows` rows: `rows` rounded up to one of 8 steps per power
    of two (at most 1/8 more rows; exact up to 16). oneDNN makes (JIT-compiles) a kernel for every row count it
    meets and keeps it in two caches of 1,024 entries each (its primitive cache, ONEDNN_PRIMITIVE_CACHE_CAPACITY,
    and ideep's, LRU_CACHE_CAPACITY), ~0.2-0.3 MB an entry; decoding meets almost every row count up to its largest
    batch for each weight shape, so a long translate or serve job grew by ~450 MB as the caches filled. Rounded,
    rows 1 to 4,096 are 80 counts, met early and then reused."""
    if rows <= 16:
        return rows
    step = 1 << (rows.bit_length() - 4)
    return -(-rows // step) * step


def _registered_product(x_I: Tensor, weight_OI: Tensor, bias_O: Tensor | None, relu: bool) -> Tensor:
    """`tformer::packed_linear`: the product with `weight`'s registered packed copy, if it has one. Only
    `linear` calls it, with autograd off (the operator has no backward)."""
    entry = _PACKED_COPIES.get(_weight_key(weight_OI))
    usable = entry is not None and x_I.dtype == torch.float32
    return _product(x_I, weight_OI, bias_O, entry[1] if usable else None, relu)


def _registered_product_shape(x_I: Tensor, weight_OI: Tensor, bias_O: Tensor | None, relu: bool) -> Tensor:
    """What the compiler needs to know of the operator's result: its shape, dtype and device."""
    return x_I.new_empty((*x_I.shape[:-1], weight_OI.shape[0]))


# Defined with torch.library.Library rather than torch.library.custom_op: a call then costs ~4 us more than the
# function itself instead of ~17 us (19 calls a `small` decoding step; ~10% of a beam-4 step of one sentence).
_LIBRARY = torch.library.Library("tformer", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? bias, bool relu) -> Tensor")
_LIBRARY.impl("packed_linear", _registered_product, "CPU")
torch.library.register_fake("tformer::packed_linear", _registered_product_shape, lib=_LIBRARY)
packed_linear = torch.ops.tformer.packed_linear


def linear(
    x_I: Tensor, weight_OI: Tensor, bias_O: Tensor | None, packed: Tensor | None, *, relu: bool = False
) -> Tensor:
    """x W^T + b (then ReLU, with `relu`): with the packed weight when there is one and it applies, else
    `F.linear`. With the packed weight oneDNN applies the ReLU to each block of the result as it writes it
    (a "post-op"), instead of a second pass over the whole output; the values are the same.

    While torch.compile traces, `packed` is not looked at: on the CPU in fp32 without autograd or autocast the
    traced product is `tformer::packed_linear`, which finds the packed copy at run time (module docstring)."""
    # autocast (bf16 validation of a compiled model) casts F.linear's inputs; it does not know our products
    cpu_fp32 = x_I.device.type == "cpu" and x_I.dtype == torch.float32 and not torch.is_grad_enabled()
    cpu_fp32 = cpu_fp32 and not torch.is_autocast_enabled("cpu")
    if torch.compiler.is_compiling():
        if cpu_fp32:
            return packed_linear(x_I, weight_OI, bias_O, relu)
        return _product(x_I, weight_OI, bias_O, None, relu)
    return _product(x_I, weight_OI, bias_O, packed if cpu_fp32 else None, relu)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state-dict keys) that multiplies with `packed` when it is set."""

    packed: Tensor | None = None
    blocks: int = 1  # a fused projection (Q|K|V: 3, K|V: 2) of `blocks` stacked matrices, initialised one by one

    def packable_weight(self) -> Tensor | None:
        return self.weight

    def forward(self, x_I: Tensor) -> Tensor:
        return linear(x_I, self.weight, self.bias, self.packed)

    def forward_relu(self, x_I: Tensor) -> Tensor:
        """relu(self(x)), the ReLU fused into the product when the packed weight is used."""
        return linear(x_I, self.weight, self.bias, self.packed, relu=True)


@contextmanager
def packed_weights(model: object) -> Iterator[bool]:
    """Inside the block, every module of `model` with a `packable_weight()` (the `Linear` layers and the
    Transformer's output projection) computes with a packed copy of it; the copies are dropped on exit.
    Yields whether anything was packed: nothing is on a GPU, for other dtypes, or without oneDNN.
    Modules already packed by an enclosing block are left to it; anything but an `nn.Module` is left alone."""
    modules = []
    for module in model.modules() if isinstance(model, nn.Module) else []:
        weight = module.packable_weight() if hasattr(module, "packable_weight") else None
        if weight is not None and module.packed is None and can_pack(weight):
            modules.append((module, weight))
    registered: list[tuple] = []
    try:
        try:
            for module, weight in modules:
                module.packed = pack(weight)
        except RuntimeError as error:  # a oneDNN build that cannot pack here: compute as nn.Linear does
            warnings.warn(f"oneDNN weight packing failed, decoding without it: {error}", stacklevel=3)
            for module, _ in modules:
                module.packed = None
            modules = []
        registered = _register(modules)
        yield bool(modules)
    finally:
        _unregister(registered)
        for module, _ in modules:
            module.packed = None


def _register(modules: list[tuple[nn.Module, Tensor]]) -> list[tuple]:
    """Make the modules' packed copies findable by `tformer::packed_linear` (for compiled steps); the keys to
    `_unregister`. A weight another block (or module: tied by hand) registered keeps its first copy."""
    keys = []
    with _PACKED_COPIES_LOCK:
        for module, weight in modules:
            key = _weight_key(weight)
            numbers, packed, blocks = _PACKED_COPIES.get(key, (weight.detach(), module.packed, 0))
            _PACKED_COPIES[key] = (numbers, packed, blocks + 1)
            keys.append(key)
    return keys


def _unregister(keys: list[tuple]) -> None:
    """Undo `_register`: an entry goes when the last block holding its weight lets it go."""
    with _PACKED_COPIES_LOCK:
        for key in keys:
            numbers, packed, blocks = _PACKED_COPIES[key]
            if blocks == 1:
                del _PACKED_COPIES[key]
            else:
                _PACKED_COPIES[key] = (numbers, packed, blocks - 1)
