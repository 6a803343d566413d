"""One iteration of a ``PrefetchLoader`` (``data``): the native gather threads it owns, the batches
it hands them, and the hand-off of gathered batches to the consumer (on a GPU, through the
side-stream copy stage of ``_device_copy``).

The threads get the batches to gather a chunk at a time, from the consumer's thread: a chunk's row
indices are a small copy made between batches, so an epoch's first batch never waits for its whole
order to be copied, and no helper thread is needed. Orders come from the loader's ``EpochOrders``
(``_loader_order``), which draws the next epoch's while this one runs. The position the loader
reports counts batches handed out, never prefetched ones.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Any, Optional

import numpy as np

from . import _kernels
from ._device_copy import DeviceStage

# Native prefetchers a forked child inherited: destroying one would join threads that exist only in
# the parent process.
INHERITED_THROUGH_FORK: list = []


class LoaderIterator:
    """One iteration of ``loader`` (a PrefetchLoader): owns the native threads until exhausted or
    closed, then hands them back to the loader when the iteration ran to its end."""

    def __init__(self, loader: Any):
        self._loader = loader
        self._pid = os.getpid()  # threads do not survive fork(): see __next__
        self._n = len(loader)
        self._closed = False
        self._native = None
        self._stage: Optional[DeviceStage] = None
        self._copies: deque = deque()  # CUDA: (device tensors, event) copied ahead, not yet handed
        # Batches this iteration still hands out, and still pushes to the threads (None: endless).
        if self._n == 0:
            self._remaining: Optional[int] = 0
        elif loader.epochs is None:
            self._remaining = None
        else:
            self._remaining = (self._n - loader._batch) + (loader.epochs - 1) * self._n
        self._unpushed = self._remaining
        self._to_take = 0  # batches pushed to the threads but not taken from them yet
        # Where the next push starts, and that epoch's order (None until it is drawn).
        self._push_epoch, self._push_batch = loader._epoch, loader._batch
        self._order: Optional[np.ndarray] = None
        self._draw_next: Optional[int] = None  # an epoch to draw ahead once a batch is out
        self._handed = False  # a batch was handed out
        # Pushes of `chunk` batches (and at least 8192 rows: a few microseconds' copy each) keep the
        # threads at least `prefetch` batches ahead.
        self._chunk = max(16, -(-8192 // loader.batch_size))
        self._ahead = loader.prefetch + self._chunk
        if self._remaining == 0:
            self._closed = True
            return
        external = ()
        if loader.device.type == "cuda":
            self._stage = DeviceStage(loader.device)
            external = loader._pinned_pool()
        for s in loader._sources:  # kept threads read the same memory: it must still be there
            s.check_memory()
        self._native = loader._take_idle()
        if self._native is None:
            self._native = _kernels.make_prefetcher(loader._sources, batch_size=loader.batch_size,
                                                    prefetch=loader.prefetch, num_threads=loader.num_threads,
                                                    external=external)
        self._feed(block=False)

    def _feed(self, block: bool) -> None:
        """Push chunks of batches while the threads have fewer than ``_ahead`` queued. An order not
        drawn yet is waited for, and a failed draw raised, only when ``block`` and the threads have
        nothing queued (the consumer needs that epoch now); otherwise the next call tries again."""
        ld = self._loader
        while self._to_take < self._ahead and self._unpushed != 0:
            if self._order is None:
                needed = block and self._to_take == 0
                if not needed and not ld._orders.ready(ld.seed, self._push_epoch):
                    ld._orders.prefetch(ld.seed, self._push_epoch, self._push_batch)
                    return
                try:
                    self._order = ld._orders.get(ld.seed, self._push_epoch)
                except Exception:
                    if needed:
                        raise
                    return  # drawn again (and raised) when this epoch's first batch is needed
                self._draw_next = self._push_epoch + 1
            stop = min(self._n, self._push_batch + self._chunk)
            if self._unpushed is not None:
                stop = min(stop, self._push_batch + self._unpushed)
                self._unpushed -= stop - self._push_batch
            size = ld.batch_size
            self._native.push_epoch(self._order[self._push_batch * size:stop * size], ld.drop_last, 0)
            self._to_take += stop - self._push_batch
            self._push_batch = stop
            if stop == self._n:
                self._push_epoch, self._push_batch, self._order = self._push_epoch + 1, 0, None

    def __iter__(self) -> "LoaderIterator":
        return self

    def _on_wait(self) -> None:
        if self._stage is not None:
            self._stage.reap(block=True)  # the threads may be short of pinned buffers

    def _take_host(self) -> list:
        _, tensors = _kernels.next_batch(self._native, on_wait=self._on_wait)
        self._to_take -= 1
        return tensors

    def __next__(self):
        if self._closed:
            raise StopIteration
        if os.getpid() != self._pid:
            # A forked child inherits this object but not its gather threads: waiting would hang.
            raise RuntimeError("this PrefetchLoader iterator was started in another process (the parent of a "
                               "fork); start a new iteration in this process (iter(loader))")
        if self._remaining == 0:
            self.close(keep_threads=True)
            raise StopIteration
        ld = self._loader
        if self._draw_next is not None and self._handed:
            # A whole epoch ahead of its first batch; not before this iteration's first batch is out,
            # as the draw would take a core (and briefly the GIL) from its gather and hand-off.
            ld._orders.prefetch(ld.seed, self._draw_next)
            self._draw_next = None
        try:
            if ld._batch == 0:  # before each epoch: the memory the threads read is still where it was
                for s in ld._sources:
                    s.check_memory()
            self._feed(block=not self._copies)  # a batch is needed now unless a copy is queued
            if self._stage is None:
                tensors = self._take_host()
            else:
                self._stage.reap()  # host buffers whose copy is done go back to the pool
                # Keep one copy queued behind the batch handed now, so it overlaps the user's work.
                while self._to_take > 0 and len(self._copies) < 2:
                    self._copies.append(self._stage.start(self._take_host()))
                tensors = self._stage.hand(*self._copies.popleft())
            batch = ld._structure.build(tensors)
            if ld.transform is not None:
                batch = ld.transform(batch)
        except BaseException:
            # A failed gather, a failing transform or Ctrl-C ends the iteration and stops the
            # threads now; the position still counts only batches handed out, so iterating again
            # resumes at the batch that was not delivered.
            self.close()
            raise
        if self._remaining is not None:
            self._remaining -= 1
        ld._advance(self._n)
        self._handed = True
        return batch

    def close(self, keep_threads: bool = False) -> None:
        """Stop the threads (``keep_threads``: hand them, idle, to the loader for its next iteration)
        and wait for in-flight copies; idempotent."""
        if self._native is not None and os.getpid() != self._pid:
            # Inherited through fork(): the threads live in the parent only, and joining them here
            # would hang, so the native object is kept (never destroyed) and forgotten.
            INHERITED_THROUGH_FORK.append(self._native)
            self._native, self._stage = None, None
            self._copies.clear()
        if self._native is not None:
            if keep_threads and self._to_take == 0:
                self._loader._keep_idle(self._native)
            else:
                self._native.close()
            self._native = None
        if self._stage is not None:
            self._copies.clear()
            self._stage.close()
            self._stage = None
        self._closed = True

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
