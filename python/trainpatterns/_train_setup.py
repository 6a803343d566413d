"""How the Trainer joins a torchrun job, splits its batch over the ranks, and checks its arguments.

A script run by torchrun must train as one job without calling ``init_from_env()`` itself, or the
ranks train alone and collide on the checkpoint directory; :func:`join_torchrun` joins when
``WORLD_SIZE > 1`` and leaves the group at the process's end. :func:`split_batch` turns the batch
arguments into the rows each rank reads per micro-step and the examples one optimizer step covers
over all ranks (the unit a :class:`~trainpatterns.checkpoint.VirtualEpochs` plan counts in), so two
ranks pass over the data as often as one. The ``check_*`` functions turn bad arguments into clear
errors before anything is built; :class:`Stateful` lets the Trainer checkpoint its own bookkeeping.
"""
from __future__ import annotations

import atexit
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from ._train_data import is_array_data, num_rows
from .checkpoint import VirtualEpochs
from .distributed import init_from_env, shutdown

__all__ = ["first_line", "one_line", "Stateful", "check_data", "check_metrics", "check_monitor", "default_plan", "join_torchrun", "split_batch"]

_failed = False  # an exception reached the top level: leave the job without a barrier


def _leave_at_exit() -> None:
    """The end of a process that joined the job: a barrier then destroy (see ``shutdown``) after a
    normal end; after an uncaught exception the other ranks may be gone, so no barrier."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if _failed:
        torch.distributed.destroy_process_group()
    else:
        shutdown()


def _note_failure(hook):
    def excepthook(kind, value, tb):
        global _failed
        _failed = True
        hook(kind, value, tb)
    return excepthook


def join_torchrun(device: torch.device) -> Optional[str]:
    """Join the job torchrun started when ``WORLD_SIZE > 1`` and nothing is initialised yet: NCCL
    for a model on a GPU, gloo otherwise. Returns a line saying so, or None when it did nothing. The
    group is left when the process ends."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    info = init_from_env("nccl" if device.type == "cuda" else "gloo")
    sys.excepthook = _note_failure(sys.excepthook)
    atexit.register(_leave_at_exit)
    return (f"joined the torchrun job as rank {info.rank} of {info.world_size} ({info.backend}); "
            f"the model trains with SyncDataParallel")


def split_batch(batch_size: Optional[int], global_batch_size: Optional[int], plan_batch: Optional[int],
                world: int, accumulate: int) -> tuple[int, int]:
    """``(rows per rank per micro-step, examples per optimizer step over all ranks)``.

    ``batch_size`` is per rank and micro-step; ``global_batch_size`` is per optimizer step over all
    ranks (``batch_size * world * accumulate``), as is a plan's ``batch_size``. Give one of them (or
    neither: the plan's, else 32 rows per rank); several must agree.
    """
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be an int >= 1 (micro-batches per optimizer step), got {accumulate!r}")
    for name, v in (("batch_size", batch_size), ("global_batch_size", global_batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    per_step = world * accumulate
    if global_batch_size is None:
        global_batch_size = plan_batch if batch_size is None else None
    if global_batch_size is not None:
        if global_batch_size % per_step:
            raise ValueError(f"global_batch_size {global_batch_size} does not split evenly over {world} rank(s) x "
                             f"accumulate={accumulate}: use a multiple of {per_step}")
        if batch_size is not None and batch_size * per_step != global_batch_size:
            raise ValueError(f"batch_size {batch_size} per rank x {world} rank(s) x accumulate={accumulate} is not "
                             f"global_batch_size {global_batch_size}")
        batch_size = global_batch_size // per_step
    if batch_size is None:
        batch_size = 32
    total = batch_size * per_step
    if plan_batch is not None and plan_batch != total:
        raise ValueError(f"the plan's batch_size {plan_batch} (examples per optimizer step over all ranks) differs "
                         f"from {batch_size} rows per rank x {world} rank(s) x accumulate={accumulate} = {total}")
    return batch_size, total


def check_metrics(metrics: Optional[Mapping[str, Callable]], reserved: Sequence[str]) -> dict:
    """``metrics`` as a dict of name -> fn(outputs, targets); names must not shadow ``reserved``."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of name -> fn(outputs, targets), got {type(metrics).__name__}")
    for name, fn in metrics.items():
        if not isinstance(name, str) or not name or name in reserved:
            raise ValueError(f"metric name {name!r} must be a non-empty string other than {list(reserved)}")
        if not callable(fn):
            raise TypeError(f"metric {name!r} must be a function fn(outputs, targets) -> float")
    return dict(metrics)


def check_data(train_data: Any, val_data: Any) -> bool:
    """Whether ``train_data`` is array data (else an iterable of batches); TypeError/ValueError for
    anything else, or for array data without rows."""
    array = is_array_data(train_data)
    if array and num_rows(train_data) == 0:
        raise ValueError("train_data has no rows")
    if not array and not isinstance(train_data, Iterable):
        raise TypeError(f"train_data must be array data or an iterable of batches, got {type(train_data).__name__}")
    if val_data is not None and not is_array_data(val_data) and not isinstance(val_data, Iterable):
        raise TypeError(f"val_data must be array data or an iterable of batches, got {type(val_data).__name__}")
    return array


def default_plan(train_data: Any, array: bool, global_batch_size: int) -> VirtualEpochs:
    """10 passes over array data in 10 virtual epochs; an iterable has no length to plan from."""
    if not array:
        raise ValueError("an iterable train_data needs plan=VirtualEpochs(num_examples, global_batch_size, ...)")
    n = num_rows(train_data)
    if n < global_batch_size:
        raise ValueError(f"train_data has {n} rows, fewer than one global batch of {global_batch_size}")
    return VirtualEpochs(n, global_batch_size, stop_point=10, num_checkpoints=10)


def check_monitor(monitor: Optional[str], mode: str, has_val: bool, metrics: Mapping, interpolation: bool
                  ) -> tuple[str, str]:
    """``(monitor, mode)``: a record key this run writes (default ``val_loss``, ``train_loss``
    without validation data) and ``"min"`` or ``"max"``."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    known = ["train_loss"] + (["val_loss", *metrics] if has_val else []) + (["max_error"] if interpolation else [])
    monitor = monitor or ("val_loss" if has_val else "train_loss")
    if monitor not in known:
        raise ValueError(f"monitor {monitor!r} is not a recorded metric; this run records {known}")
    return monitor, mode


class Stateful:
    """Adapts a getter/setter pair to the state_dict protocol the CheckpointManager saves."""

    def __init__(self, get: Callable[[], dict], put: Callable[[dict], None]) -> None:
        self._get, self._put = get, put

    def state_dict(self) -> dict:
        return self._get()

    def load_state_dict(self, state: dict) -> None:
        self._put(state)


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type name when the message is empty): what the
    one-line error reports of the Trainer and the command line show."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def one_line(e: BaseException) -> str:
    """``e``'s whole message on one line (torch's state-dict errors list the keys on later lines)."""
    return " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip()) or type(e).__name__
