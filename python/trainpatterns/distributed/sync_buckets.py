"""The gradient buckets of SyncDataParallel: which parameters share one, and each one's buffer layout.

Every rank must all-reduce the same buckets in the same order, so the split depends only on the
model (parameter order, dtypes, sizes) and the caps: reverse registration order (the order backward
produces gradients), a new bucket at each dtype change or once the current one reaches its cap (the
first cap smaller, as in DDP, so communication starts early in backward).

A bucket's flat buffer holds one slot per parameter, then one "has a gradient" flag per parameter,
all in the parameter dtype, so the flags are scaled and summed with the gradients in the same
all-reduce. The pointer tables of the native pack/unpack kernels are built here once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import _kernels

# ``compress`` argument -> the dtype on the wire (None: the gradient dtype).
WIRE_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 1024 * 1024
# Slots start on multiples of this many elements (64 bytes of float32), so the kernels' vector loads
# line up; the gaps stay zero and cost nothing in the sum.
_SLOT_ALIGN = 16


def _align(n: int) -> int:
    return (n + _SLOT_ALIGN - 1) // _SLOT_ALIGN * _SLOT_ALIGN


@dataclass
class GradBucket:
    """One all-reduce unit: parameters of one dtype, their slots in a flat buffer, a flag per
    parameter after the slots. ``wire`` is what is all-reduced: ``flat`` itself, or a 16-bit copy.
    The fields from ``ready`` on are the state of the current backward."""

    index: int
    params: list
    names: list
    flat: torch.Tensor  # parameter dtype: [slots | flags]; grads are views into the slots
    wire: torch.Tensor  # flat, or a bfloat16/float16 buffer of the same length
    views: list  # per parameter, its slot viewed with the parameter's shape
    flags: torch.Tensor  # view of flat's tail: 1 where this rank had a gradient (scaled with the rest)
    pack_table: _kernels.BucketTable  # params' gradients (or absent) + the flags -> wire
    unpack_table: Optional[_kernels.BucketTable]  # wire -> flat (compression only)
    ready: list = field(default_factory=list)
    n_ready: int = 0
    had_grad: list = field(default_factory=list)  # per parameter, for this round
    work: Optional[object] = None


def make_buckets(trainable: list, first_cap_bytes: int, cap_bytes: int,
                 wire_dtype: Optional[torch.dtype]) -> list:
    """The buckets of ``trainable`` ((name, parameter) pairs in registration order), in all-reduce
    order: the same on every rank that wraps the same model. ``wire_dtype``: None, or the 16-bit
    dtype that buckets of other dtypes are cast to for the wire."""
    groups: list = []
    size, full = 0, False
    for name, p in reversed(trainable):
        # As DDP: a bucket closes once it reaches its cap (the parameter that crosses it stays in).
        if not groups or full or groups[-1][0][1].dtype != p.dtype:
            groups.append([])
            size, full = 0, False
        groups[-1].append((name, p))
        size += p.numel() * p.element_size()
        full = size >= (first_cap_bytes if len(groups) == 1 else cap_bytes)
    return [_make_bucket(i, g, wire_dtype) for i, g in enumerate(groups)]


def _make_bucket(index: int, members: list, wire_dtype: Optional[torch.dtype]) -> GradBucket:
    names = [n for n, _ in members]
    params = [p for _, p in members]
    offsets, off = [], 0
    for p in params:
        offsets.append(off)
        off = _align(off + p.numel())
    flag_off = off
    n = len(params)
    dtype, device = params[0].dtype, params[0].device
    flat = torch.zeros(flag_off + n, dtype=dtype, device=device)
    on_wire = wire_dtype or dtype
    wire = flat if on_wire == dtype else torch.zeros(flat.numel(), dtype=on_wire, device=device)
    views = [flat[o:o + p.numel()].view(p.shape) for o, p in zip(offsets, params)]
    flags = flat[flag_off:]
    numels = [p.numel() for p in params] + [n]
    pack_table = _kernels.make_bucket_table(numels, offsets + [flag_off], dtype, device)
    unpack_table = None
    if wire is not flat:
        unpack_table = _kernels.make_bucket_table([flat.numel()], [0], dtype, device, [flat])
    return GradBucket(index, params, names, flat, wire, views, flags, pack_table, unpack_table,
                      [False] * n, 0, [False] * n)
