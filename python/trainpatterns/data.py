"""Prefetching data loaders: ``PrefetchLoader`` and ``device_prefetch``.

``PrefetchLoader`` serves shuffled batches of in-memory or memory-mapped arrays. Native threads
(csrc/loader) gather the rows of upcoming batches into pooled buffers while the model computes, so
the training loop only picks up finished batches (the tf.data ``prefetch`` pattern); there is no
per-sample Python and no worker process. On a GPU each batch is copied from pinned host buffers to
the device on a side stream, and the consumer's stream waits on that copy's event.

``PrefetchLoader.from_store`` serves an array store, the one-time copy of a map-style dataset that
``write_array_store`` (``data_store``, re-exported here) makes.

``device_prefetch`` gives any iterable of tensors (a torch DataLoader, say) the same overlapped
host-to-device copies; it lives in ``_device_copy`` beside the side-stream stage both share and is
re-exported here.

Invariants the tests hold us to:

* The order is a function of ``(seed, epoch)`` only: epoch ``e`` visits
  ``np.random.Generator(np.random.PCG64([seed, e])).permutation(n)`` (``arange(n)`` unshuffled),
  batch ``b`` being rows ``b * batch_size`` up to ``(b + 1) * batch_size`` of it, never dependent
  on thread count or timing.
* With ``rank``/``world_size``, rank ``r`` visits ``order[r::world_size]`` of that epoch order after
  it is wrapped around to (``drop_last`` off) or cut to (on) a multiple of ``world_size``: the
  ranks' rows are DistributedSampler's, and every rank has as many batches.
* The position (``state_dict()``) counts batches *handed to the user*, never prefetched ones.
* A batch buffer is reused only after every tensor sharing its storage has been freed (and, on a
  GPU, after its copy has completed): a batch the user holds never changes.
"""
from __future__ import annotations

import os
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import _kernels
from ._device_copy import DeviceStage, device_prefetch
from ._loader_args import check_int, resolve_device
from .data_store import open_array_store, write_array_store

__all__ = ["PrefetchLoader", "device_prefetch", "open_array_store", "write_array_store"]

Sources = Union[Mapping[str, Any], Sequence[Any], np.ndarray, torch.Tensor]


def _default_threads() -> int:
    # Half the cores (at most 4): the rest stay with the model's own threads.
    return max(1, min(4, (os.cpu_count() or 1) // 2))


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


class _Structure:
    """How the user's sources were given (dict, tuple, list or one array): batches come back alike."""

    def __init__(self, sources: Sources):
        if isinstance(sources, Mapping):
            self.kind, self.keys = "dict", list(sources.keys())
            arrays = [sources[k] for k in self.keys]
            names = [repr(k) for k in self.keys]
        elif isinstance(sources, (np.ndarray, torch.Tensor)):
            self.kind, self.keys, arrays, names = "single", None, [sources], ["0"]
        elif isinstance(sources, (tuple, list)):
            self.kind = "tuple" if isinstance(sources, tuple) else "list"
            self.keys, arrays = None, list(sources)
            names = [str(i) for i in range(len(arrays))]
        else:
            raise TypeError(f"sources must be a dict, tuple or list of arrays (or one array), "
                            f"got {type(sources).__name__}")
        if not arrays:
            raise ValueError("sources is empty: give at least one array")
        self.arrays, self.names = arrays, names

    def build(self, tensors: list):
        if self.kind == "dict":
            return dict(zip(self.keys, tensors))
        if self.kind == "single":
            return tensors[0]
        return tuple(tensors) if self.kind == "tuple" else list(tensors)


class PrefetchLoader:
    """Shuffled batches of arrays, gathered ahead of time by native threads.

    Args:
        sources: a dict, tuple or list of numpy arrays, ``np.memmap``s or CPU torch tensors (or one
            of them), all with the same first dimension (rows) and contiguous. Dtypes: float32/64/16,
            bfloat16 (torch tensors), int64/32/16/8, uint8, bool; any trailing shape. Batches come
            back in the same structure, as torch tensors on ``device``.
        batch_size: rows per batch (>= 1).
        shuffle: visit rows in a fresh permutation each epoch, drawn from ``(seed, epoch)``.
        seed: the permutation seed (>= 0).
        drop_last: drop an epoch's last, short batch.
        prefetch: batches gathered ahead of the consumer (>= 1).
        num_threads: gather threads (default: half the cores, at most 4). The result never
            depends on it.
        device: ``None``/``"cpu"``, or a CUDA device: batches are then copied from pinned host
            buffers on a side stream, overlapping the consumer's work.
        transform: called with each batch (on the consumer side, after the device copy); what it
            returns is what the loop receives.
        epochs: epoch boundaries one iteration crosses: ``1`` (default) runs the rest of the
            current epoch, like one pass of a DataLoader; ``None`` runs forever, drawing a fresh
            permutation every epoch (for training by steps or virtual epochs).
        rank, world_size: this process's share when ``world_size`` processes read the same
            sources: each epoch's order is split as DistributedSampler splits it (rank ``r`` takes
            rows ``r, r + world_size, ...``; ``drop_last`` off wraps the order around so every rank
            has ``ceil(rows / world_size)`` rows, a few of them seen twice; on, it cuts the order to
            ``rows // world_size`` per rank and then drops each rank's short last batch). Every
            rank gets as many batches, and the order still depends only on ``(seed, epoch)``.

    Iterating continues from the current position (``epoch``, ``batch``): after an uninterrupted
    ``for`` loop the loader stands at the start of the next epoch, so ``for epoch in range(E): for
    batch in loader: ...`` sees E different permutations. Only one iteration runs at a time: a new
    ``iter()`` closes the previous one. ``len()`` is batches per epoch (also in endless mode).
    ``close()``, leaving a ``for`` loop early, or dropping the iterator stop the threads; batches
    already handed out stay valid.
    """

    def __init__(self, sources: Sources, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, prefetch: int = 2, num_threads: Optional[int] = None,
                 device: Union[None, str, torch.device] = None,
                 transform: Optional[Callable[[Any], Any]] = None, epochs: Optional[int] = 1,
                 rank: int = 0, world_size: int = 1):
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.prefetch = check_int("prefetch", prefetch, 1)
        self.num_threads = _default_threads() if num_threads is None else check_int("num_threads", num_threads, 1)
        self.seed = check_int("seed", seed, 0)
        self.epochs = None if epochs is None else check_int("epochs", epochs, 1)
        self.world_size = check_int("world_size", world_size, 1)
        self.rank = check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank must be < world_size, got rank={rank} with world_size={world_size}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        self.shuffle, self.drop_last, self.transform = bool(shuffle), bool(drop_last), transform
        self.device = resolve_device(device)
        self._structure = _Structure(sources)
        self._sources = [_kernels.loader_source(n, a) for n, a in zip(self._structure.names, self._structure.arrays)]
        rows = {s.num_rows for s in self._sources}
        if len(rows) != 1:
            lengths = ", ".join(f"{s.name}: {s.num_rows}" for s in self._sources)
            raise ValueError(f"sources have different lengths (first dimensions): {lengths}")
        self.num_rows = rows.pop()
        self._epoch = 0
        self._batch = 0  # batches of the current epoch handed to the user
        self._pinned: Optional[list] = None  # CUDA: the pinned host pool, allocated once
        self._active: Optional[weakref.ref] = None

    @classmethod
    def from_store(cls, path: Union[str, os.PathLike], batch_size: int, **kwargs: Any) -> "PrefetchLoader":
        """A loader over the array store at ``path`` (see ``write_array_store``), its files mapped
        read-only; batches have the structure of the dataset's items. ``kwargs`` are the loader's."""
        return cls(open_array_store(path), batch_size, **kwargs)

    # ---- position ----
    def __len__(self) -> int:
        """Batches per epoch (of this rank)."""
        rows = rank_rows(self.num_rows, self.world_size, self.drop_last)
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    @property
    def epoch(self) -> int:
        """The epoch the next batch comes from."""
        return self._epoch

    @property
    def batch(self) -> int:
        """Batches of the current epoch already handed to the user."""
        return self._batch

    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at the first batch of ``epoch`` (closes a running iteration)."""
        epoch = check_int("epoch", epoch, 0)
        self._stop_active()
        self._epoch, self._batch = epoch, 0

    def state_dict(self) -> dict:
        """The position after the last batch handed to the user (prefetched ones do not count)."""
        return dict(seed=self.seed, epoch=self._epoch, batch=self._batch, num_rows=self.num_rows,
                    batch_size=self.batch_size, drop_last=self.drop_last, shuffle=self.shuffle,
                    world_size=self.world_size)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at a saved position: the next batches are exactly those the saved loader would
        have yielded. The data layout (rows, batch size, drop_last, shuffle, world_size) must match;
        the position is the same on every rank, so any rank's state resumes them all."""
        missing = {"seed", "epoch", "batch"} - set(state)
        if missing:
            raise KeyError(f"loader state is missing {sorted(missing)}")
        layout = {k: state[k] for k in ("num_rows", "batch_size", "drop_last", "shuffle") if k in state}
        layout["world_size"] = state.get("world_size", 1)  # a state without it is a single process's
        for key, saved in layout.items():
            if saved != getattr(self, key):
                raise ValueError(f"loader state has {key}={saved!r} but this loader has "
                                 f"{getattr(self, key)!r}: resuming would not reproduce the batches")
        seed, epoch, batch = (check_int(k, state[k], 0) for k in ("seed", "epoch", "batch"))
        if batch > len(self):
            raise ValueError(f"loader state batch={batch} exceeds the {len(self)} batches of an epoch")
        self._stop_active()
        self.seed, self._epoch, self._batch = seed, epoch, batch
        if self._batch == len(self) and len(self) > 0:
            self._epoch, self._batch = self._epoch + 1, 0

    # ---- iteration ----
    def __iter__(self) -> "_LoaderIterator":
        self._stop_active()
        it = _LoaderIterator(self)
        self._active = weakref.ref(it)
        return it

    def close(self) -> None:
        """Stop the running iteration's threads (the loader itself can be iterated again)."""
        self._stop_active()

    def __enter__(self) -> "PrefetchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop_active()
        except Exception:  # interpreter shutdown: nothing left to stop
            pass

    def _stop_active(self) -> None:
        it = self._active() if self._active is not None else None
        if it is not None:
            it.close()
        self._active = None

    def _pinned_pool(self) -> list:
        """Pinned host buffers for the CUDA path: per slot, one per source; allocated once."""
        if self._pinned is None:
            slots = self.prefetch + 3  # in flight + the one being copied + the one handed + spare
            rows = _kernels.slot_rows(self.batch_size, self.num_rows)
            self._pinned = [[torch.empty(max(1, rows * s.row_bytes), dtype=torch.uint8, pin_memory=True)
                             for s in self._sources] for _ in range(slots)]
        return self._pinned

    def _advance(self, n_batches: int) -> bool:
        """One batch was handed to the user: move the position. True when a new epoch began."""
        self._batch += 1
        if self._batch == n_batches:
            self._epoch, self._batch = self._epoch + 1, 0
            return True
        return False


# Native prefetchers a forked child inherited: destroying one would join threads that exist only in
# the parent process.
_INHERITED_THROUGH_FORK: list = []


class _LoaderIterator:
    """One iteration of a PrefetchLoader: owns the native threads until exhausted or closed."""

    def __init__(self, loader: PrefetchLoader):
        self._loader = loader
        self._pid = os.getpid()  # threads do not survive fork(): see __next__
        self._n = len(loader)
        self._closed = False
        self._native = None
        self._stage: Optional[DeviceStage] = None
        self._copies: deque = deque()  # CUDA: (device tensors, event) copied ahead, not yet handed
        # Batches this iteration still hands out (None: endless); epochs pushed to the threads.
        if self._n == 0:
            self._remaining: Optional[int] = 0
        elif loader.epochs is None:
            self._remaining = None
        else:
            self._remaining = (self._n - loader._batch) + (loader.epochs - 1) * self._n
        self._next_push = loader._epoch  # next epoch whose batches go to the threads
        self._to_take = 0  # batches scheduled for the threads but not taken from them yet
        if self._remaining == 0:
            self._closed = True
            return
        external = ()
        if loader.device.type == "cuda":
            self._stage = DeviceStage(loader.device)
            external = loader._pinned_pool()
        self._native = _kernels.make_prefetcher(loader._sources, batch_size=loader.batch_size,
                                                prefetch=loader.prefetch, num_threads=loader.num_threads,
                                                external=external)
        # Drawing a permutation of a million rows takes tens of milliseconds: a helper thread draws
        # and pushes each epoch's order (numpy releases the GIL while shuffling), one epoch ahead,
        # so the consumer never waits at an epoch boundary. One worker: epochs arrive in order.
        self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainpatterns-order")
        self._pushes: deque = deque()  # futures of scheduled pushes, oldest first
        self._schedule_epoch(first_batch=loader._batch)
        self._schedule_epoch(first_batch=0)  # the following epoch too, so no stall at the boundary

    def _schedule_epoch(self, first_batch: int) -> None:
        ld = self._loader
        count = self._n - first_batch
        if self._remaining is not None:
            count = min(count, self._remaining - self._to_take - len(self._copies))
            if count <= 0:
                return  # everything this iteration hands out is already scheduled
        self._pushes.append(self._pusher.submit(_push_epoch, self._native, ld, self._next_push, first_batch))
        self._to_take += count
        self._next_push += 1

    def _check_pushes(self) -> None:
        """Raise what a finished push raised (runs while waiting for a batch)."""
        while self._pushes and self._pushes[0].done():
            self._pushes.popleft().result()

    def __iter__(self) -> "_LoaderIterator":
        return self

    def _on_wait(self) -> None:
        self._check_pushes()
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
            self.close()
            raise StopIteration
        ld = self._loader
        try:
            if ld._batch == 0:  # before each epoch: the memory the threads read is still where it was
                for s in ld._sources:
                    s.check_memory()
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
        if ld._advance(self._n):
            self._schedule_epoch(first_batch=0)
        return batch

    def close(self) -> None:
        """Stop the threads and wait for in-flight copies; idempotent."""
        if self._native is not None and os.getpid() != self._pid:
            # Inherited through fork(): the threads live in the parent only, and joining them here
            # would hang, so the native object is kept (never destroyed) and forgotten.
            _INHERITED_THROUGH_FORK.append(self._native)
            self._native, self._stage = None, None
            self._copies.clear()
        if self._native is not None:
            self._native.close()  # a push still queued now fails quietly (see _push_epoch)
            self._pusher.shutdown(wait=True, cancel_futures=True)
            self._pushes.clear()
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


def _push_epoch(native, ld: PrefetchLoader, epoch: int, first_batch: int) -> None:
    """Draw one epoch's order (this rank's share) and hand it to the native threads (runs on the
    helper thread; it holds no reference to the iterator, so dropping the iterator is never delayed
    by it)."""
    order = shard_order(epoch_order(ld.num_rows, ld.seed, epoch, ld.shuffle), ld.rank, ld.world_size, ld.drop_last)
    if native.closed:
        return
    try:
        native.push_epoch(order, ld.drop_last, first_batch)
    except RuntimeError:
        if not native.closed:  # closed in the meantime: nobody waits for this epoch any more
            raise

