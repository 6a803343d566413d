"""torchrun's environment for the distribution strategies: integer variables and the store.

Both ``init_from_env`` (a process group) and AsyncDataParallel's RPC transport rendezvous through
the store torchrun leaves to its workers; under ``--max-restarts`` that store outlives a restarted
group, so each incarnation must use keys of its own (:func:`incarnation_store`).
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch.distributed as dist

__all__ = ["env_int", "incarnation_store"]


def env_int(name: str, default: Optional[int] = None, who: str = "init_from_env") -> int:
    """The integer environment variable ``name`` (``default`` when unset; without one, unset is an
    error); errors start with ``who``."""
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise RuntimeError(f"{who}: environment variable {name} is not set (launch with torchrun)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{who}: environment variable {name}={raw!r} is not an integer") from None


def incarnation_store(world_size: int, timeout: Optional[datetime.timedelta]) -> Optional[dist.Store]:
    """Under torchrun's shared store, a key space of this incarnation's own; None elsewhere.

    torchrun (c10d rendezvous) lets its workers use the agent's TCPStore, and that store outlives a
    restart: without a prefix, the ranks of a restarted group read the previous group's addresses
    from it and fail to connect (pytorch/pytorch#135712). ``TORCHELASTIC_RESTART_COUNT`` tells the
    incarnations apart; it agrees on every rank of one torchrun agent (a single node). On several
    nodes an agent that restarts only because a peer node did keeps its count, so multi-node
    elastic jobs set ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (docs/distributed.md).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    client = dist.TCPStore(os.environ["MASTER_ADDR"], env_int("MASTER_PORT"), world_size, is_master=False,
                           timeout=timeout or datetime.timedelta(minutes=30))
    incarnation = env_int("TORCHELASTIC_RESTART_COUNT", 0)
    return dist.PrefixStore(f"trainpatterns/incarnation_{incarnation}", client)
