"""What the Trainer accepts as data, and how it splits it: array data, row counts, per-rank shards.

The Trainer feeds "array data" (a tensor or array, or a tuple/list/dict of them with one row per
example) through the native PrefetchLoader, and anything else as an iterable of batches. These
helpers tell the two apart, count rows, cut each rank's contiguous shard under torchrun and count
the rows of a batch (for the samples/s figure and the row-weighted validation mean). They live apart
from the training loop so that it reads as a loop.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["batch_rows", "is_array_data", "num_rows", "shard"]

_ARRAY_TYPES = (np.ndarray, torch.Tensor)


def is_array_data(data: Any) -> bool:
    """A tensor/array, or a non-empty tuple/list/dict of them: what the PrefetchLoader takes."""
    if isinstance(data, _ARRAY_TYPES):
        return True
    if isinstance(data, (tuple, list)) and data and all(isinstance(a, _ARRAY_TYPES) for a in data):
        return True
    if isinstance(data, Mapping) and data and all(isinstance(a, _ARRAY_TYPES) for a in data.values()):
        return True
    return False


def num_rows(data: Any) -> int:
    """The number of rows (examples) of array data; ValueError when its arrays disagree or one is
    0-d."""
    if isinstance(data, _ARRAY_TYPES):
        return int(data.shape[0])
    arrays = list(data.values()) if isinstance(data, Mapping) else list(data)
    counts = {int(a.shape[0]) if a.ndim > 0 else -1 for a in arrays}
    if len(counts) != 1 or -1 in counts:
        raise ValueError(f"the arrays of the data have different numbers of rows: "
                         f"{[tuple(a.shape) for a in arrays]}")
    return counts.pop()


def shard(data: Any, rank: int, world: int) -> Any:
    """Rank ``rank``'s contiguous block of rows ``[n*rank//world, n*(rank+1)//world)`` of array
    data (a contiguous view, as the loader needs), in the same container type."""
    n = num_rows(data)
    lo, hi = n * rank // world, n * (rank + 1) // world
    if isinstance(data, _ARRAY_TYPES):
        return data[lo:hi]
    if isinstance(data, Mapping):
        return {k: a[lo:hi] for k, a in data.items()}
    return type(data)(a[lo:hi] for a in data)


def batch_rows(batch: Any) -> int:
    """Rows in a batch: the leading dimension of its first tensor leaf (1 when that is not a tensor
    with at least one dimension)."""
    first = batch
    while isinstance(first, (tuple, list, Mapping)):
        first = next(iter(first.values())) if isinstance(first, Mapping) else first[0]
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else 1
