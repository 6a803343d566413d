"""trainpatterns.distributed: distribution strategies over torch.distributed.

``init_from_env()`` joins the job torchrun (or any launcher setting its environment variables)
started; ``SyncDataParallel`` is the synchronous data-parallel strategy (sync.py),
``AsyncDataParallel`` the asynchronous one through parameter servers (async_dp.py), and
``PipelineParallel`` model parallelism by pipeline stages (pipeline.py). We never write our
own transport: NCCL on GPU, gloo on CPU, single or multi node, all through torch.distributed.
"""
from __future__ import annotations

import datetime
import sys
import types
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from ._store import env_int as _env_int
from ._store import incarnation_store as _incarnation_store
from .async_dp import AsyncDataParallel
from .pipeline import PipelineParallel, settle_groups
from .sync import SyncDataParallel

if dist.is_available():
    # torch.distributed.nn.functional binds its functions' default group when first imported
    # (``group=group.WORLD``); imported while a group exists (torch._dynamo imports it, and
    # torch.optim imports torch._dynamo), those defaults keep the group alive past
    # destroy_process_group(). Imported here, before any group, they stay None: the default group.
    import torch.distributed.nn.functional  # noqa: F401

__all__ = ["init_from_env", "shutdown", "DistInfo", "SyncDataParallel", "AsyncDataParallel", "PipelineParallel"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job. ``backend`` is None for a single process (nothing was
    initialised); ``device`` is where its model and batches belong (``cuda:LOCAL_RANK`` or cpu)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that logs and writes checkpoints)."""
        return self.rank == 0


def init_from_env(backend: Optional[str] = None, *,
                  timeout: Union[float, datetime.timedelta, None] = None) -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment and return this process's place.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and, through ``env://``, ``MASTER_ADDR`` and
    ``MASTER_PORT``). ``backend`` defaults to ``"nccl"`` when CUDA is available and ``"gloo"``
    otherwise; a mixed group such as ``"cpu:gloo,cuda:nccl"`` is passed through. With NCCL the
    process's device is set to ``cuda:LOCAL_RANK``. ``timeout`` (seconds or a timedelta) bounds
    every collective: when a rank dies, the others raise within it instead of hanging (default:
    torch's). A single process (``WORLD_SIZE`` unset or 1) initialises nothing. Calling it again
    once initialised returns the same information.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"init_from_env: RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if "nccl" in backend and not cuda:
        raise RuntimeError(f"init_from_env: backend {backend!r} needs CUDA, but no GPU is available; use 'gloo'")
    uses_cuda = "nccl" in backend
    if uses_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"init_from_env: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} "
                               f"GPUs are visible")
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if uses_cuda else torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    if world_size == 1:
        return DistInfo(0, 1, local_rank, device, None)
    kwargs = {}
    if timeout is not None:
        if not isinstance(timeout, datetime.timedelta):
            if not timeout > 0:
                raise ValueError(f"init_from_env: timeout must be > 0 seconds, got {timeout}")
            timeout = datetime.timedelta(seconds=float(timeout))
        kwargs["timeout"] = timeout
    if uses_cuda and backend == "nccl":
        kwargs["device_id"] = device  # eager NCCL init, bound to this rank's GPU
    store = _incarnation_store(world_size, kwargs.get("timeout"))
    if store is not None:
        kwargs["store"] = store
    else:
        kwargs["init_method"] = "env://"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistInfo(rank, world_size, local_rank, device, dist.get_backend())


def shutdown() -> None:
    """Leave the job at its end: a barrier, then ``destroy_process_group()``; a no-op when nothing
    is initialised. Every rank must call it.

    Why it matters: after a collective returns, a gloo worker thread still drops its reference to
    the collective's tensors, and that needs the GIL. A thread that asks for the GIL once the
    interpreter is ending is stopped mid-C++ and the process aborts ("terminate called without an
    active exception", exit code -6). Destroying the group joins its threads (with the GIL
    released) before the interpreter ends, but only if nothing else holds the group: torch's own
    torch.distributed.nn.functional may, and is unpinned here (:func:`_unpin_default_group`).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    settle_groups()  # the pipelines' own groups, the same race
    dist.barrier()
    _unpin_default_group()
    dist.destroy_process_group()


def _unpin_default_group() -> None:
    """Reset to None the default arguments of torch.distributed.nn.functional that hold a process
    group: that module, imported while a group existed, bound ``group.WORLD`` at import. Pinned
    there, the group outlives destroy_process_group(), and so do its gloo worker threads, which
    still drop their last collectives' tensors (needing the GIL) while the interpreter ends: the
    process aborts ("terminate called without an active exception", exit code -6). Unpinned, the
    group is destroyed at once and its threads joined. None means the default group, as meant."""
    module = sys.modules.get("torch.distributed.nn.functional")
    for fn in vars(module).values() if module else ():
        if isinstance(fn, types.FunctionType) and fn.__defaults__:
            if any(isinstance(d, dist.ProcessGroup) for d in fn.__defaults__):
                fn.__defaults__ = tuple(None if isinstance(d, dist.ProcessGroup) else d for d in fn.__defaults__)
