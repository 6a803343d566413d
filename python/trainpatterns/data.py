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

Orders are drawn ahead of time, in the background (``_loader_order``); an iteration
(``_loader_iter``) hands them to the threads a chunk of batches at a time.
"""
from __future__ import annotations

import os
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import _kernels
from ._device_copy import device_prefetch
from ._loader_args import check_int, resolve_device
from ._loader_iter import INHERITED_THROUGH_FORK, LoaderIterator
from ._loader_order import EpochOrders, epoch_order, rank_rows  # noqa: F401 (epoch_order: re-exported)
from .data_store import open_array_store, write_array_store

__all__ = ["PrefetchLoader", "device_prefetch", "open_array_store", "write_array_store"]

Sources = Union[Mapping[str, Any], Sequence[Any], np.ndarray, torch.Tensor]


def _default_threads() -> int:
    # Half the cores (at most 4): the rest stay with the model's own threads.
    return max(1, min(4, (os.cpu_count() or 1) // 2))


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
    already handed out stay valid. A loop that runs to its end leaves them waiting, idle, for the
    next iteration (until ``close()`` or the loader is dropped), and the next epoch's order is drawn
    in the background meanwhile: a new epoch's first batch waits only for its own gather.
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
        self._idle: Optional[tuple] = None  # (native prefetcher, pid) kept from an iteration that ended
        self._orders = EpochOrders(self.num_rows, self.shuffle, self.rank, self.world_size, self.drop_last,
                                   self.batch_size, warm=[s for s in self._sources if s.file is not None])
        self._orders.prefetch(self.seed, self._epoch)  # so that the first iteration need not wait for it

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
        self._orders.prefetch(self.seed, epoch)

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
        self._orders.prefetch(self.seed, self._epoch, self._batch)

    # ---- iteration ----
    def __iter__(self) -> LoaderIterator:
        self._stop_active()
        it = LoaderIterator(self)
        self._active = weakref.ref(it)
        return it

    def close(self) -> None:
        """Stop the running iteration's threads (the loader itself can be iterated again)."""
        self._stop_active()
        self._close_idle()

    def __enter__(self) -> "PrefetchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to stop
            pass

    def _stop_active(self) -> None:
        it = self._active() if self._active is not None else None
        if it is not None:
            it.close()
        self._active = None

    def _keep_idle(self, native) -> None:
        """Keep the threads of an iteration that ran to its end (nothing left queued) for the next
        one: the next epoch's first batch then needs no new threads, and its buffer is already in
        memory. They wait idle until then, or until close()."""
        self._close_idle()
        self._idle = (native, os.getpid())

    def _take_idle(self):
        """The kept threads, now the caller's; None when there are none, or when they were started
        by the parent of a fork (and so do not exist here)."""
        idle, self._idle = self._idle, None
        if idle is None:
            return None
        if idle[1] != os.getpid():
            INHERITED_THROUGH_FORK.append(idle[0])  # destroying it would join the parent's threads
            return None
        return idle[0]

    def _close_idle(self) -> None:
        native = self._take_idle()
        if native is not None:
            native.close()

    def _pinned_pool(self) -> list:
        """Pinned host buffers for the CUDA path: per slot, one per source; allocated once."""
        if self._pinned is None:
            slots = self.prefetch + 3  # in flight + the one being copied + the one handed + spare
            rows = _kernels.slot_rows(self.batch_size, self.num_rows)
            self._pinned = [[torch.empty(max(1, rows * s.row_bytes), dtype=torch.uint8, pin_memory=True)
                             for s in self._sources] for _ in range(slots)]
        return self._pinned

    def _advance(self, n_batches: int) -> None:
        """One batch was handed to the user: move the position."""
        self._batch += 1
        if self._batch == n_batches:
            self._epoch, self._batch = self._epoch + 1, 0
