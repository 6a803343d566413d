"""This process's rank and the job's world size, whether or not torch.distributed is in use, and the
small agreements the ranks make (rank 0's value for all, "does any rank say yes?").

Checkpoints, the Trainer and the CLI each ask "am I rank 0, and how many ranks are there?" and need
every rank to act on one decision; these functions answer for all, without importing the
distribution strategies. In a single process each is the identity.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def agree(rank0_value: Any, world: int) -> Any:
    """Rank 0's value (a picklable object) on every rank; every rank must call it."""
    if world == 1:
        return rank0_value
    box = [rank0_value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one; every rank must call it."""
    if world == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(total: torch.Tensor, count: int, world: int) -> float:
    """``sum(total) / sum(count)`` over the ranks (``total`` a float64 0-d tensor on the device of
    the collectives); every rank must call it."""
    if world == 1:
        return float(total) / count
    both = torch.stack([total, total.new_tensor(float(count))])
    dist.all_reduce(both)
    return float(both[0]) / float(both[1])
