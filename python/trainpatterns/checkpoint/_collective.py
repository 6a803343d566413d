"""The few collectives the manager needs to keep the ranks of a distributed job in step.

Every rank must agree on which checkpoint to restore and whether every rank could read it, so rank
0's choice and each rank's verdict travel as small int64 tensors (never pickles) on the process
group's own device: the current CUDA device under NCCL, the CPU otherwise.
"""
from __future__ import annotations

import torch

__all__ = ["all_ok", "broadcast_steps"]


def _collective_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank."""
    t = torch.tensor([1 if ok else 0], dtype=torch.int64, device=_collective_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def broadcast_steps(steps: list) -> list:
    """Rank 0's list of ints, on every rank (tensors, not pickles)."""
    dev = _collective_device()
    n = torch.tensor([len(steps)], dtype=torch.int64, device=dev)
    torch.distributed.broadcast(n, 0)
    buf = torch.tensor(steps if steps else [0], dtype=torch.int64, device=dev)
    if buf.numel() != max(int(n.item()), 1):
        buf = torch.zeros(max(int(n.item()), 1), dtype=torch.int64, device=dev)
    torch.distributed.broadcast(buf, 0)
    return buf[: int(n.item())].tolist()
