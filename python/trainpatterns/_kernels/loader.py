"""The prefetch loader's side of the boundary (csrc/loader): checked descriptions of the source
arrays, the native prefetcher's start, and zero-copy tensor views of the batches it gathers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import _C
from ._checks import check_dense, unsupported_dtype

# What the gather copies is bytes, so any fixed-size dtype would do; these are the ones torch and
# the loader's users need (numpy arrays of them map one to one; bfloat16 only exists in torch).
_LOADER_NUMPY_DTYPES = {
    np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16, np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16, np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}
# (DLPack type code, bits) the native views are exported with: kDLInt 0, kDLUInt 1, kDLFloat 2,
# kDLBfloat 4, kDLBool 6 (csrc/loader/dlpack.h).
_LOADER_DLPACK = {
    torch.float32: (2, 32), torch.float64: (2, 64), torch.float16: (2, 16), torch.bfloat16: (4, 16),
    torch.int64: (0, 64), torch.int32: (0, 32), torch.int16: (0, 16), torch.int8: (0, 8), torch.uint8: (1, 8),
    torch.bool: (6, 8),
}
SUPPORTED_LOADER_DTYPES = tuple(_LOADER_DLPACK)
_CONTIGUOUS_ROWS = ("the loader gathers whole rows from contiguous memory: pass np.ascontiguousarray(x) or "
                    "x.contiguous()")


@dataclass(frozen=True)
class LoaderSource:
    """One checked source array: where its rows are and what a batch of them looks like.

    Invariants: rows are contiguous, ``row_bytes`` apart, starting at ``addr``; ``owner`` is the
    array or tensor that owns that memory (kept alive by the prefetcher)."""

    name: str
    dtype: torch.dtype
    trailing: tuple  # shape of one row
    num_rows: int
    row_bytes: int
    addr: int
    owner: object


def loader_source(name: str, a) -> LoaderSource:
    """Check one source (numpy array, np.memmap or CPU torch tensor) and describe it."""
    who = f"source {name}"
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{who}: tensor is on {a.device}; sources must be CPU tensors or numpy "
                             f"arrays (the loader copies batches to `device` itself)")
        check_dense(a, name, _CONTIGUOUS_ROWS, role="source", what="array")
        if a.dtype not in SUPPORTED_LOADER_DTYPES:
            raise unsupported_dtype(who, a.dtype, SUPPORTED_LOADER_DTYPES)
        if a.is_neg() or a.is_conj():
            raise ValueError(f"{who}: tensor is a lazy negated/conjugated view; call .resolve_neg() first")
        dtype, shape, elem = a.dtype, tuple(a.shape), a.element_size()
        addr = a.data_ptr()
    elif isinstance(a, np.ndarray):
        if a.dtype not in _LOADER_NUMPY_DTYPES:
            raise unsupported_dtype(who, a.dtype, _LOADER_NUMPY_DTYPES, note="; bfloat16 as a torch tensor")
        if not a.flags.c_contiguous:
            raise ValueError(f"{who}: array is not contiguous (shape {a.shape}); {_CONTIGUOUS_ROWS}")
        dtype, shape, elem = _LOADER_NUMPY_DTYPES[a.dtype], a.shape, a.itemsize
        addr = a.__array_interface__["data"][0]
    else:
        raise TypeError(f"{who}: expected a numpy array, np.memmap or CPU torch tensor, "
                        f"got {type(a).__name__}")
    if len(shape) == 0:
        raise ValueError(f"{who}: a 0-d array has no rows; sources need a first (row) dimension")
    trailing = tuple(int(s) for s in shape[1:])
    row_bytes = int(np.prod(trailing, dtype=np.int64)) * elem
    return LoaderSource(name, dtype, trailing, int(shape[0]), row_bytes, addr, a)


def make_prefetcher(sources: Sequence[LoaderSource], *, batch_size: int, prefetch: int, num_threads: int,
                    external: Sequence[Sequence[torch.Tensor]] = ()):
    """Start the native gather threads. ``external``: per slot, one buffer per source (pinned host
    tensors of at least ``batch_size * row_bytes`` bytes); empty: the pool allocates its own."""
    for slot in external:
        for s, buf in zip(sources, slot):
            if not buf.is_contiguous() or buf.numel() * buf.element_size() < batch_size * s.row_bytes:
                raise ValueError(f"internal: external buffer too small for source {s.name}")
    owners = (tuple(s.owner for s in sources), tuple(tuple(slot) for slot in external))
    return _C.Prefetcher(
        sources=[(s.addr, s.row_bytes, *_LOADER_DLPACK[s.dtype], list(s.trailing)) for s in sources],
        num_rows=sources[0].num_rows if sources else 0,
        batch_size=batch_size, prefetch=prefetch, num_threads=num_threads,
        external=[[b.data_ptr() for b in slot] for slot in external], owners=owners,
    )


def next_batch(prefetcher, poll_s: float = 0.05,
               on_wait: Optional[Callable[[], object]] = None) -> tuple[int, list]:
    """Wait for the prefetcher's next batch and view it as tensors, one per source (zero-copy).

    Waits in slices of ``poll_s`` seconds with the GIL released, so Ctrl-C (KeyboardInterrupt)
    is raised within one slice; ``on_wait()`` runs after every empty slice. A failed gather in a
    worker thread raises RuntimeError here. Returns (sequence number, tensors)."""
    while True:
        got = prefetcher.next(poll_s)
        if got is not None:
            break
        if on_wait is not None:
            on_wait()
    seq, _, capsules = got
    # Each capsule is a [rows, *trailing] view of the batch buffer in the source's dtype; the
    # tensor's storage releases the buffer when its last user is freed.
    return seq, [torch.from_dlpack(cap) for cap in capsules]
