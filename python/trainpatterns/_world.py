"""This process's rank and the job's world size, whether or not torch.distributed is in use.

Checkpoints, the Trainer and the CLI each ask "am I rank 0, and how many ranks are there?"; one
function answers for all, without importing the distribution strategies.
"""
from __future__ import annotations

import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
