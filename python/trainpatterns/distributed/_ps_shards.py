"""How AsyncDataParallel cuts a model into server shards, and each shard into flat buffers.

Every rank computes the same plan from the model alone (trainable parameters in registration
order): parameters go, largest first, to the server holding the fewest bytes so far, so the
servers' loads (and their apply times) are balanced by bytes. Inside a shard the parameters keep
the model's order and are laid out back to back in one flat buffer per dtype: one tensor per dtype
crosses the wire per push or pull, and the native bucket kernels pack a shard's gradients into it
(casting to a 16-bit wire dtype when asked) and unpack pulled values into the replica in one pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .. import _kernels

__all__ = ["FlatGroup", "Shard", "plan_shards"]


@dataclass
class FlatGroup:
    """Parameters of one dtype in one shard: their slots in a flat buffer of ``span`` elements."""

    dtype: torch.dtype
    indices: list  # positions in the model's trainable-parameter list
    numels: list
    offsets: list
    span: int

    def table(self, device: torch.device, tensors: Optional[list] = None) -> _kernels.BucketTable:
        return _kernels.make_bucket_table(self.numels, self.offsets, self.dtype, device, tensors)


@dataclass
class Shard:
    """Server ``index``'s part of the model."""

    index: int
    names: list  # in flat order: group by group, the model's order inside each
    shapes: list
    groups: list  # FlatGroup per dtype, in first-appearance order

    def signature(self) -> list:
        """What two ranks must agree on to share this shard: names, shapes and dtypes."""
        dtypes = [str(g.dtype) for g in self.groups for _ in g.indices]
        return [list(t) for t in zip(self.names, [list(s) for s in self.shapes], dtypes)]

    @property
    def model_indices(self) -> list:
        """The shard's parameters' positions in the model's trainable list, in flat order."""
        return [i for g in self.groups for i in g.indices]


def plan_shards(named: list, num_servers: int) -> list:
    """The shards of ``named`` ((name, parameter) pairs, trainable, in registration order) over
    ``num_servers`` servers, balanced by bytes; a server may get nothing when parameters are few."""
    loads = [0] * num_servers
    owner = [0] * len(named)
    for i in sorted(range(len(named)), key=lambda i: -named[i][1].numel() * named[i][1].element_size()):
        k = min(range(num_servers), key=lambda s: (loads[s], s))
        owner[i] = k
        loads[k] += named[i][1].numel() * named[i][1].element_size()
    shards = []
    for k in range(num_servers):
        mine = [i for i in range(len(named)) if owner[i] == k]
        groups: dict = {}
        for i in mine:
            p = named[i][1]
            g = groups.setdefault(p.dtype, FlatGroup(p.dtype, [], [], [], 0))
            g.indices.append(i)
            g.numels.append(p.numel())
            g.offsets.append(g.span)
            g.span += p.numel()
        order = [i for g in groups.values() for i in g.indices]
        shards.append(Shard(k, [named[i][0] for i in order], [tuple(named[i][1].shape) for i in order],
                            list(groups.values())))
    return shards
