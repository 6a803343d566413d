"""Host-to-device copies that overlap the consumer's work: the side-stream stage ``PrefetchLoader``
uses on a GPU, and ``device_prefetch``, which gives any iterable of batches (a torch DataLoader,
say) the same overlapped copies.

A batch is handed over by making the consumer's current stream wait on its copy's event, never by
synchronising the device; what a copy reads stays referenced until that copy has completed.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Iterator, Sequence, Union

import torch

from ._loader_args import check_int, resolve_device
from ._tree import is_tensor, map_leaves, to_device


class DeviceStage:
    """Host-to-device copies on a side stream, handed to whichever stream the consumer runs on.

    ``start`` enqueues the copies and records an event; ``hand`` makes the consumer's current
    stream wait on that event (no host synchronisation) and marks the tensors as used there, so the
    caching allocator does not recycle them while the consumer's work is queued. What a copy reads
    (its ``payload``: the host tensors, staging buffers) stays referenced until the copy's event has
    completed; ``reap`` returns the payloads that may be reused."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.inflight: deque = deque()  # (event, payload) whose copy may still be running

    def start(self, host: Sequence[torch.Tensor], payload: Any = None) -> tuple[list, Any]:
        with torch.cuda.stream(self.stream):
            dev = [h.to(self.device, non_blocking=True) for h in host]
            event = torch.cuda.Event()
            event.record(self.stream)
        self.inflight.append((event, (list(host), payload)))
        return dev, event

    def hand(self, dev: Sequence[torch.Tensor], event) -> list:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in dev:
            t.record_stream(current)
        return list(dev)

    def reap(self, block: bool = False) -> list:
        """Payloads of the copies that are done; with ``block``, wait for the oldest one first."""
        if block and self.inflight:
            self.inflight[0][0].synchronize()
        done = []
        while self.inflight and self.inflight[0][0].query():
            done.append(self.inflight.popleft()[1][1])
        return done

    def close(self) -> None:
        """Wait for every copy still running (their events only) and drop what they read."""
        for event, _ in self.inflight:
            event.synchronize()
        self.inflight.clear()


class _Slot(int):
    """A tensor's position in an item's flat list (a leaf type no user item contains)."""


class _PinnedPool:
    """Reusable pinned staging buffers, in power-of-two size classes from 4 KiB, for tensors that
    are not pinned already. A buffer comes back (``give_back``) only after its copy is done."""

    def __init__(self):
        self._free: dict = {}

    def stage(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a pinned copy of ``t``, the pool buffer holding it)."""
        nbytes = t.numel() * t.element_size()
        size = 1 << max(12, (max(nbytes, 1) - 1).bit_length())
        free = self._free.get(size)
        buf = free.pop() if free else torch.empty(size, dtype=torch.uint8, pin_memory=True)
        view = buf[:nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        return view, buf

    def give_back(self, buffers: Iterable[torch.Tensor]) -> None:
        for buf in buffers:
            self._free.setdefault(buf.numel(), []).append(buf)


def device_prefetch(iterable: Iterable, device: Union[str, torch.device], *, prefetch: int = 2) -> Iterator:
    """Yield the items of ``iterable`` with their tensors on ``device``, copying ahead.

    Items may be tensors or (nested) dicts / lists / tuples of them (what a DataLoader yields);
    other leaves pass through. On CUDA, up to ``prefetch`` items are copied ahead on a side stream
    (from the item's own memory when pinned, e.g. ``DataLoader(pin_memory=True)``, otherwise from
    pooled pinned staging buffers, reused once their copy is done); each item is handed over by
    making the consumer's current stream wait on its copy's event, never by synchronising the
    device. On the CPU the items are yielded as they come (tensors moved to the CPU if needed).
    """
    dev = resolve_device(device)
    prefetch = check_int("prefetch", prefetch, 1)
    return _device_prefetch(iterable, dev, prefetch)


def _device_prefetch(iterable: Iterable, dev: torch.device, prefetch: int) -> Iterator:
    if dev.type == "cpu":
        for item in iterable:
            yield to_device(item, dev)
        return
    stage = DeviceStage(dev)
    pool = _PinnedPool()
    queue: deque = deque()  # (item with _Slot leaves, device tensors, event), copied ahead

    def start(item) -> None:
        host: list = []
        buffers: list = []

        def collect(t: torch.Tensor) -> _Slot:
            if t.device.type == "cpu" and not t.is_pinned():
                t, buf = pool.stage(t)
                buffers.append(buf)
            host.append(t)
            return _Slot(len(host) - 1)

        skeleton = map_leaves(item, collect, is_tensor)
        dev_tensors, event = stage.start(host, payload=buffers)
        queue.append((skeleton, dev_tensors, event))

    it = iter(iterable)
    try:
        exhausted = False
        while True:
            while not exhausted and len(queue) < prefetch + 1:
                try:
                    item = next(it)
                except StopIteration:
                    exhausted = True
                    break
                start(item)
            if not queue:
                return
            skeleton, dev_tensors, event = queue.popleft()
            handed = stage.hand(dev_tensors, event)
            for buffers in stage.reap():
                pool.give_back(buffers)
            yield map_leaves(skeleton, lambda i: handed[i], lambda x: isinstance(x, _Slot))
    finally:
        queue.clear()
        stage.close()
