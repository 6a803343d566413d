"""The rows a ``PrefetchLoader`` visits each epoch, in order, and their drawing ahead of time.

Epoch ``e`` visits ``np.random.Generator(np.random.PCG64([seed, e])).permutation(n)`` (``arange(n)``
unshuffled). With ``world_size`` ranks that order is wrapped around to (``drop_last`` off) or cut to
(on) a multiple of ``world_size``, and rank ``r`` takes every ``world_size``-th row from position
``r``: DistributedSampler's split.

Drawing a permutation of a million rows takes 10-25 ms, and even an epoch's first batch needs all of
it: numpy's Fisher-Yates shuffle settles position 0 last. So ``EpochOrders`` draws orders before they
are needed, on short-lived helper threads (numpy releases the GIL while it shuffles): the loader asks
for an epoch as soon as it knows where it stands (construction, ``set_epoch``, ``load_state_dict``)
and for the next one whenever an epoch is handed to the gather threads, so a new epoch's first batch
waits only for its own gather.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Sequence

import numpy as np

# Below this many rows an order is drawn in well under a millisecond when it is needed, cheaper
# than starting a thread for it.
BACKGROUND_ROWS = 1 << 16


def epoch_order(num_rows: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The rows epoch ``epoch`` visits, in order (int64): a permutation drawn from (seed, epoch)."""
    if not shuffle:
        return np.arange(num_rows, dtype=np.int64)
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(num_rows).astype(np.int64, copy=False)


def shard_order(order: np.ndarray, rank: int, world_size: int, drop_last: bool) -> np.ndarray:
    """Rank ``rank``'s share of an epoch's order, as DistributedSampler splits it: the order is wrapped
    around to the next multiple of ``world_size`` (``drop_last``: cut to the one below), then rank
    ``r`` takes every ``world_size``-th row from position ``r``."""
    if world_size == 1:
        return order
    total = rank_rows(len(order), world_size, drop_last) * world_size
    return np.ascontiguousarray(np.resize(order, total)[rank::world_size])


def rank_rows(num_rows: int, world_size: int, drop_last: bool) -> int:
    """Rows each rank visits per epoch."""
    return num_rows // world_size if drop_last else -(-num_rows // world_size)


class EpochOrders:
    """This rank's order of each epoch, keyed by ``(seed, epoch)`` and drawn ahead of time.

    ``prefetch`` queues an order for drawing on a helper thread (for ``BACKGROUND_ROWS`` rows or
    more; smaller ones are drawn when asked for). One draw runs at a time, in the order asked, so
    drawing ahead never takes more than one core from the gather threads and the model. After a
    draw the helper calls ``touch(rows)`` of every one of ``warm`` (the loader's memory-mapped
    sources) with the rows of the batch the loader will start at, so that their pages are mapped
    before the gather needs them. ``get`` returns an order, waiting for its draw or drawing it
    itself. The ``keep`` most recently used orders are kept, so iterating an epoch again (after a
    ``break``, say) does not draw it again. Safe to use from several threads; a process forked from
    the one that drew them starts afresh.
    """

    def __init__(self, num_rows: int, shuffle: bool, rank: int, world_size: int, drop_last: bool,
                 batch_size: int, warm: Sequence = (), keep: int = 2):
        self._layout = (num_rows, shuffle, rank, world_size, drop_last)
        self._batch_size = batch_size
        self._warm = tuple(warm)
        self._keep = keep
        self._pid = -1  # set, with the lock and the tables below, by the first _locked()
        self._locked()

    def draw(self, seed: int, epoch: int) -> np.ndarray:
        """Draw one order now, on the calling thread."""
        num_rows, shuffle, rank, world_size, drop_last = self._layout
        return shard_order(epoch_order(num_rows, seed, epoch, shuffle), rank, world_size, drop_last)

    def prefetch(self, seed: int, epoch: int, batch: int = 0) -> None:
        """Queue the order of ``(seed, epoch)`` for drawing in the background unless it is drawn or
        queued (or small enough to draw when needed); ``batch``: where the loader will start."""
        if self._layout[0] < BACKGROUND_ROWS:
            return
        with self._locked():
            if self._lookup((seed, epoch)) is not None:
                return
            future: Future = Future()
            self._store((seed, epoch), future)
            self._queue.append((future, seed, epoch, batch))
            if self._drawing:
                return  # the running helper takes it next
            self._drawing = True
        try:
            threading.Thread(target=self._draw_queued, daemon=True, name="trainpatterns-order").start()
        except RuntimeError:  # no thread to be had: draw here rather than leave the order pending
            self._draw_queued()

    def ready(self, seed: int, epoch: int) -> bool:
        """Whether ``get(seed, epoch)`` would return at once (or, for an order too small to draw in
        the background, within a millisecond)."""
        if self._layout[0] < BACKGROUND_ROWS:
            return True
        with self._locked():
            future = self._lookup((seed, epoch))
        return future is not None and future.done()

    def get(self, seed: int, epoch: int) -> np.ndarray:
        """The order of ``(seed, epoch)``: waits for its draw, or draws it here if none was queued.
        Raises what the draw raised (and forgets that draw, so that the next call draws again)."""
        key = (seed, epoch)
        with self._locked():
            future = self._lookup(key)
        if future is not None:
            try:
                return future.result()
            except BaseException:
                with self._locked():
                    if self._orders.get(key) is future:
                        del self._orders[key]
                raise
        order = self.draw(seed, epoch)
        future = Future()
        future.set_result(order)
        with self._locked():
            self._store(key, future)
        return order

    def _draw_queued(self) -> None:
        """The helper thread: draws the queued orders one after the other, then ends."""
        while True:
            with self._locked():
                if not self._queue:
                    self._drawing = False
                    return
                future, seed, epoch, batch = self._queue.popleft()
            try:
                order = self.draw(seed, epoch)
            except BaseException as e:  # handed to whoever waits for this order
                future.set_exception(e)
                continue
            future.set_result(order)
            rows = order[batch * self._batch_size:(batch + 1) * self._batch_size]
            for source in self._warm:
                try:
                    source.touch(rows)
                except Exception:  # a head start only: the gather reads these rows and reports errors
                    pass

    def _locked(self) -> threading.Lock:
        """The lock, after starting afresh in a forked child: the parent's draws never finish there,
        and a lock (the futures' own included) held by a parent thread at the fork stays held."""
        if os.getpid() != self._pid:
            self._lock = threading.Lock()
            self._orders: OrderedDict = OrderedDict()  # (seed, epoch) -> Future of the order
            self._queue: deque = deque()  # (future, seed, epoch, batch) not drawn yet, oldest first
            self._drawing = False  # a helper thread is running
            self._pid = os.getpid()
        return self._lock

    def _lookup(self, key: tuple):
        """The future of ``key`` (marked most recently used) or None; call with the lock held."""
        future = self._orders.get(key)
        if future is not None:
            self._orders.move_to_end(key)
        return future

    def _store(self, key: tuple, future: Future) -> None:
        """Keep ``future`` under ``key``, forgetting the least recently used beyond ``keep``; call
        with the lock held."""
        self._orders[key] = future
        self._orders.move_to_end(key)
        while len(self._orders) > self._keep:
            self._orders.popitem(last=False)
