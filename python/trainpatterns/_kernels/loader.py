"""The prefetch loader's side of the boundary (csrc/loader): checked descriptions of the source
arrays, the native prefetcher's start, and zero-copy tensor views of the batches it gathers.

Native threads read the sources without the GIL while Python runs, so whatever could free or
shrink that memory meanwhile is ruled out here: torch storages are held and made non-resizable,
numpy arrays are held (numpy refuses to resize a referenced array), and a memory-mapped file's
size is checked by the threads before every chunk they read.
"""
from __future__ import annotations

import mmap
import os
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

    Invariants: rows are contiguous, ``row_bytes`` apart, starting at ``addr``; ``owner`` holds
    everything that keeps that memory alive (the array or tensor and, for torch memory, its
    storage, made non-resizable so that ``resize_`` cannot free it) and is kept alive by the
    prefetcher. ``storages`` records (storage, address, bytes) of that torch memory, checked by
    :meth:`check_memory`; ``file`` is (path, device, inode, file position past the last row) of a
    memory-mapped file, whose size the gather threads check before every chunk they read."""

    name: str
    dtype: torch.dtype
    trailing: tuple  # shape of one row
    num_rows: int
    row_bytes: int
    addr: int
    owner: tuple
    storages: tuple = ()
    file: Optional[tuple] = None

    def check_memory(self) -> None:
        """Raise RuntimeError if torch memory this source reads has moved or shrunk since it was
        described. A held, non-resizable storage only moves through ``share_memory_()`` (sending the
        tensor to another process does it), which frees the memory it leaves."""
        for storage, addr, nbytes in self.storages:
            if storage.data_ptr() != addr or storage.nbytes() < nbytes:
                raise RuntimeError(f"source {self.name}: the tensor's memory moved while the loader used it "
                                   f"(share_memory_(), or sending it to another process?); make a new "
                                   f"PrefetchLoader over the tensor as it is now")

    def touch(self, rows: np.ndarray) -> None:
        """Read one element of each of ``rows`` of a memory-mapped file, so that the pages holding
        them are mapped (and read from disk) before the gather threads need them. Does nothing for
        other sources, or when the file no longer holds every row: reading past a file's end would
        end the process (SIGBUS), and the gather reports that as an error instead."""
        if self.file is None or self.row_bytes == 0 or len(rows) == 0:
            return
        path, dev, ino, end = self.file
        try:
            st = os.stat(path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == (dev, ino) and st.st_size >= end:
            a = self.owner[0]
            a.reshape(a.shape[0], -1)[rows, 0]


def slot_rows(batch_size: int, num_rows: int) -> int:
    """Rows one batch buffer needs: a batch never holds more rows than the sources have."""
    return min(batch_size, num_rows)


def _hold_torch_memory(t: torch.Tensor) -> Optional[tuple]:
    """(storage, address, bytes) of a CPU tensor's storage, after making it non-resizable:
    ``resize_`` frees a storage's memory whoever holds the storage, so the gather threads could read
    freed memory. ``Tensor.numpy()`` marks the storage non-resizable (numpy must never see its
    memory go); a byte view exports it for any dtype, without copying. None when this torch leaves
    the storage resizable."""
    storage = t.untyped_storage()
    if storage.resizable():
        try:
            t.detach().reshape(-1).view(torch.uint8).numpy()
        except (RuntimeError, TypeError):  # a tensor numpy cannot see (a subclass, say)
            return None
    if storage.resizable():
        return None
    return storage, storage.data_ptr(), storage.nbytes()


def _base_chain(a: np.ndarray) -> list:
    """``a`` and what owns its memory: the chain of ``.base`` objects down to the owner."""
    chain = [a]
    while isinstance(chain[-1], np.ndarray) and chain[-1].base is not None and len(chain) < 256:
        chain.append(chain[-1].base)
    return chain


def _mapped_file(a: np.ndarray, chain: list) -> Optional[tuple]:
    """(path, device, inode, file position past the array's last byte) when ``a`` lives in an
    ``np.memmap``'s file; None otherwise, or when the file has no name."""
    for m in chain:
        if isinstance(m, np.memmap) and isinstance(m.base, mmap.mmap) and m.filename is not None:
            # m is the memmap numpy mapped: its first byte is at file position m.offset.
            first = m.__array_interface__["data"][0]
            end = m.offset + (a.__array_interface__["data"][0] + a.nbytes - first)
            path = os.fspath(m.filename)
            try:
                st = os.stat(path)
            except OSError:  # deleted after mapping: nobody can truncate it any more
                return None
            return path, st.st_dev, st.st_ino, end
    return None


def loader_source(name: str, a) -> LoaderSource:
    """Check one source (numpy array, np.memmap or CPU torch tensor) and describe it."""
    who = f"source {name}"
    storages, file = (), None
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"{who}: tensor is on {a.device}; sources must be CPU tensors or numpy "
                             f"arrays (the loader copies batches to `device` itself)")
        check_dense(a, name, _CONTIGUOUS_ROWS, role="source", what="array")
        if a.dtype not in SUPPORTED_LOADER_DTYPES:
            raise unsupported_dtype(who, a.dtype, SUPPORTED_LOADER_DTYPES)
        held = _hold_torch_memory(a)
        if held is None:  # a torch that cannot pin the storage's size: read a private copy instead
            a = a.detach().clone()
        else:
            storages = (held,)
        dtype, shape, elem = a.dtype, tuple(a.shape), a.element_size()
        addr = a.data_ptr()
    elif isinstance(a, np.ndarray):
        if a.dtype not in _LOADER_NUMPY_DTYPES:
            raise unsupported_dtype(who, a.dtype, _LOADER_NUMPY_DTYPES, note="; bfloat16 as a torch tensor")
        if not a.flags.c_contiguous:
            raise ValueError(f"{who}: array is not contiguous (shape {a.shape}); {_CONTIGUOUS_ROWS}")
        chain = _base_chain(a)
        held = [_hold_torch_memory(t) for t in chain if isinstance(t, torch.Tensor)]
        if None in held:  # a view of torch memory that could still be freed: read a private copy
            a, chain, held = a.copy(), [], []
        storages, file = tuple(held), _mapped_file(a, chain)
        dtype, shape, elem = _LOADER_NUMPY_DTYPES[a.dtype], a.shape, a.itemsize
        addr = a.__array_interface__["data"][0]
    else:
        raise TypeError(f"{who}: expected a numpy array, np.memmap or CPU torch tensor, "
                        f"got {type(a).__name__}")
    if len(shape) == 0:
        raise ValueError(f"{who}: a 0-d array has no rows; sources need a first (row) dimension")
    trailing = tuple(int(s) for s in shape[1:])
    row_bytes = int(np.prod(trailing, dtype=np.int64)) * elem
    return LoaderSource(name, dtype, trailing, int(shape[0]), row_bytes, addr,
                        (a, *(s for s, _, _ in storages)), storages, file)


def _open_file(file: Optional[tuple]) -> int:
    """A read-only descriptor of a source's file for the gather threads' size checks, or -1 (no
    file, Windows, or the path now names another file than the one mapped)."""
    if file is None or os.name == "nt":
        return -1
    path, dev, ino, _ = file
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return -1
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (dev, ino):
        os.close(fd)
        return -1
    return fd


def make_prefetcher(sources: Sequence[LoaderSource], *, batch_size: int, prefetch: int, num_threads: int,
                    external: Sequence[Sequence[torch.Tensor]] = ()):
    """Start the native gather threads. ``external``: per slot, one buffer per source (pinned host
    tensors of at least ``slot_rows(batch_size, rows) * row_bytes`` bytes); empty: the pool
    allocates its own."""
    num_rows = sources[0].num_rows if sources else 0
    rows = slot_rows(batch_size, num_rows)
    for slot in external:
        for s, buf in zip(sources, slot):
            if not buf.is_contiguous() or buf.numel() * buf.element_size() < rows * s.row_bytes:
                raise ValueError(f"internal: external buffer too small for source {s.name}")
    for s in sources:
        s.check_memory()
    owners = (tuple(s.owner for s in sources), tuple(tuple(slot) for slot in external))
    fds = [_open_file(s.file) for s in sources]
    try:  # the native side keeps duplicates of the descriptors
        return _C.Prefetcher(
            sources=[(s.addr, s.row_bytes, *_LOADER_DLPACK[s.dtype], list(s.trailing), s.name, fd,
                      s.file[3] if s.file is not None else 0) for s, fd in zip(sources, fds)],
            num_rows=num_rows, batch_size=batch_size, prefetch=prefetch, num_threads=num_threads,
            external=[[b.data_ptr() for b in slot] for slot in external], owners=owners,
        )
    finally:
        for fd in fds:
            if fd >= 0:
                os.close(fd)


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
