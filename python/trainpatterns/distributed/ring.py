"""A ring all-reduce of 16-bit CPU buffers over point-to-point sends, on a background thread.

Why: with ``compress`` on CPU/gloo, gloo's own all-reduce of a bfloat16/float16 tensor realises
little of the halved bytes. It sums 16-bit values one element at a time (``gloo::sum<BFloat16>``),
and its segmented ring makes many small transfers. The same bytes moved as one large
``isend``/``irecv`` per step and summed by torch's vectorised add take about 0.8x of gloo's 16-bit
time at 30-50M elements (bench/RESULTS.md, "the ring for 16-bit wires").

Algorithm (the classic ring of Patarasuk and Yuan; every rank runs the same steps):
* The buffer is cut into ``world`` chunks.
* **Reduce-scatter**, steps s = 0 .. world-2: send chunk (r - s) to the next rank, receive chunk
  (r - s - 1) from the previous one into scratch, and add it into the local chunk. After the last
  step, rank r holds chunk (r + 1) summed over all ranks.
* **All-gather**, steps s = 0 .. world-2: send chunk (r + 1 - s) on, and receive chunk (r - s)
  straight into place.

Each chunk's sum is computed by one rank and copied to the others, so every rank ends with the same
bits. The rounding is one 16-bit rounding per addition, as in gloo's ring: on 2 ranks each element
is ``round(a + b)`` either way.

The transport is still torch.distributed: gloo's point-to-point ops on the group, with their
timeout. One thread per ring processes the submitted buffers in order, which is the same order on
every rank. After the first failure the ring is broken, since the ranks' streams no longer match:
every later wait raises.
"""
from __future__ import annotations

import queue
import threading
import weakref
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["RingAllReduce", "ring_for"]

# Tag of the ring's messages, apart from a user's own point-to-point traffic on the same group.
_TAG = 0x7E16


class _Handle:
    """What ``submit`` returns: ``wait()`` blocks until the buffer holds the sum, or raises."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._error: Optional[BaseException] = None

    def _finish(self, error: Optional[BaseException]) -> None:
        self._error = error
        self._done.set()

    def wait(self) -> bool:
        self._done.wait()
        if self._error is not None:
            raise RuntimeError(f"ring all-reduce failed: {type(self._error).__name__}: {self._error}") from self._error
        return True


class RingAllReduce:
    """Sums CPU tensors in place across the ranks of ``group``, asynchronously and in FIFO order.

    Invariants: every rank submits the same sequence of tensors, with equal numels and dtypes. A
    tensor must not be touched between ``submit`` and its handle's ``wait``.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        # Weak references only: a group kept alive here past destroy_process_group would be torn
        # down during interpreter exit, where gloo's threads abort the process ("terminate called
        # without an active exception").
        self._group = None if group is None else weakref.ref(group)
        self.pg = weakref.ref(group if group is not None else dist.group.WORLD)  # for ring_for
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._next = dist.get_global_rank(group, (self.rank + 1) % self.world) if group else (self.rank + 1) % self.world
        self._prev = dist.get_global_rank(group, (self.rank - 1) % self.world) if group else (self.rank - 1) % self.world
        self._jobs: queue.Queue = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        self._broken: Optional[BaseException] = None
        self._scratch: dict = {}  # dtype -> receive buffer, as long as the largest chunk so far

    def submit(self, tensor: torch.Tensor) -> _Handle:
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError("RingAllReduce sums contiguous CPU tensors")
        handle = _Handle()
        if self.world == 1:
            handle._finish(None)
            return handle
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="trainpatterns-ring", daemon=True)
            self._thread.start()
        self._jobs.put((tensor, handle))
        return handle

    def _serve(self) -> None:
        while True:
            tensor, handle = self._jobs.get()
            if self._broken is not None:
                handle._finish(self._broken)
                continue
            try:
                self._all_reduce(tensor.view(-1))
                handle._finish(None)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                self._broken = e
                handle._finish(e)

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        if self._group is None:
            return None
        group = self._group()
        if group is None:
            raise RuntimeError("RingAllReduce: its process group no longer exists")
        return group

    def _exchange(self, send: torch.Tensor, recv: torch.Tensor) -> None:
        """Send to the next rank and receive from the previous one at once (no rank waits first)."""
        works, group = [], self.group
        if send.numel():
            works.append(dist.isend(send, self._next, group=group, tag=_TAG))
        if recv.numel():
            works.append(dist.irecv(recv, self._prev, group=group, tag=_TAG))
        for w in works:
            w.wait()

    def _all_reduce(self, flat: torch.Tensor) -> None:
        # Not pipelined in pieces: summing a piece while the next ones arrive is no faster on loopback.
        w, r = self.world, self.rank
        chunks = flat.tensor_split(w)
        longest = chunks[0].numel()
        scratch = self._scratch.get(flat.dtype)
        if scratch is None or scratch.numel() < longest:
            scratch = self._scratch[flat.dtype] = torch.empty(longest, dtype=flat.dtype)
        for s in range(w - 1):  # reduce-scatter
            into = chunks[(r - s - 1) % w]
            got = scratch[:into.numel()]
            self._exchange(chunks[(r - s) % w], got)
            into.add_(got)
        for s in range(w - 1):  # all-gather
            self._exchange(chunks[(r + 1 - s) % w], chunks[(r - s) % w])


_RINGS: dict = {}


def ring_for(group: Optional[dist.ProcessGroup] = None) -> RingAllReduce:
    """The process's one ring for ``group``. Every wrapper on the group shares it, so all of the
    process's ring traffic on the group goes through one FIFO. That keeps the order the same on
    every rank: two rings, each with its own thread, could interleave differently on each rank.
    A new group (also a default group made again after ``destroy_process_group``) gets a new ring;
    a broken one is never handed out for it."""
    pg = group if group is not None else dist.group.WORLD
    ring = _RINGS.get(id(pg))
    if ring is None or ring.pg() is not pg:
        ring = _RINGS[id(pg)] = RingAllReduce(group)
    return ring
