"""One parameter server of AsyncDataParallel: a shard of the model, its optimizer, its version.

Workers call the ``rpc_*`` functions below through the transport; they run on the server's RPC
threads, any number at once, and take the server's lock only to apply. Each arriving gradient is
one update: unpacked into the shard's gradient slots, stepped by the optimizer ``optimizer(params)``
built (a fused optimizer's single native pass over the shard), the scheduler stepped, the version
counted. Its staleness (the version now minus the version the worker computed on) is recorded;
above ``max_staleness`` the gradient is refused and the worker gets fresh values instead.
``staleness_lr="inverse"`` divides a stale gradient's learning rate by ``1 + staleness``. With
``apply_every=N`` the server gathers N gradients and steps once on their mean; with
``apply_every_ms=T`` it also steps on what has gathered once the first of it has waited T ms.

Workers that send nothing for ``timeout`` seconds are dropped with a warning; the rest share the
budget. With ``checkpoint_dir`` the server saves its shard, optimizer, scheduler and counters through
:class:`~trainpatterns.checkpoint.CheckpointManager` every ``save_every`` updates and resumes from
the newest save when the job is started again.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..checkpoint import CheckpointManager
from ._ps_shards import Shard

__all__ = ["ShardServer", "rpc_final", "rpc_outcome", "rpc_push", "rpc_register"]

_SERVERS: dict = {}  # shard index -> the ShardServer living in this process


class _ShardModule(nn.Module):
    """The shard's parameters as one module (views into the flat buffers), for the checkpoint."""

    def __init__(self, params: list) -> None:
        super().__init__()
        self.params = nn.ParameterList(params)


class ShardServer:
    """Serves ``shard`` starting from ``values`` (the shard's parameters of this rank's model)."""

    def __init__(self, shard: Shard, values: list, optimizer: Callable, scheduler: Optional[Callable], *,
                 total_updates: int, max_staleness: Optional[int], staleness_lr: Optional[str],
                 timeout: float, checkpoint_dir: Optional[str], save_every: Optional[int], apply_every: int = 1,
                 apply_every_ms: Optional[float] = None) -> None:
        self.shard = shard
        self.flats = [torch.empty(g.span, dtype=g.dtype) for g in shard.groups]
        params = []
        for g, flat in zip(shard.groups, self.flats):
            for k, i in enumerate(g.indices):
                view = flat[g.offsets[k]:g.offsets[k] + g.numels[k]].view(shard.shapes[len(params)])
                view.copy_(values[len(params)])
                params.append(nn.Parameter(view))
        self.params = params
        self.grads = [torch.zeros_like(f) for f in self.flats]
        for p, g in zip(params, self._views(self.grads)):
            p.grad = g
        self.optimizer = optimizer(params)
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer(params) must return a torch optimizer, got {type(self.optimizer).__name__}")
        self.scheduler = scheduler(self.optimizer) if scheduler is not None else None
        self.total_updates = total_updates
        self.max_staleness = max_staleness
        self.staleness_lr = staleness_lr
        self.timeout = timeout
        self.lock = threading.Lock()
        self.apply_every = apply_every
        self.apply_every_s = None if apply_every_ms is None else apply_every_ms / 1e3
        self.gathered_since = 0.0  # when the first gradient of the next step arrived
        self.scales: list = []  # per gradient gathered for the next step, its learning-rate scale
        self.version = 0
        self.staleness: dict = {}  # staleness -> applied gradients
        self.refused = 0
        self.per_worker: dict = {}  # worker -> [applied, rows, first push time, last push time]
        self.left: set = set()  # ranks that fetched the final values
        self.dropped: set = set()
        self.error: Optional[str] = None  # a fault every rank must hear of (a worker with another model)
        self.settled: Optional[list] = None  # once serve() has ended: the workers it dropped
        self.told: set = set()  # ranks that have asked for the outcome
        self.started = time.monotonic()
        self.manager = None
        self.save_every = save_every
        if checkpoint_dir is not None:
            self.manager = CheckpointManager(os.path.join(checkpoint_dir, f"server_{shard.index}"), keep_last=2)
            self.manager.restore(self._state())
        self.start_version = self.version  # 0, or the update count of the checkpoint restored
        _SERVERS[shard.index] = self

    def _views(self, flats: list) -> list:
        out = []
        for g, flat in zip(self.shard.groups, flats):
            out += [flat[o:o + n] for o, n in zip(g.offsets, g.numels)]
        return [v.view(s) for v, s in zip(out, self.shard.shapes)]

    def _state(self) -> dict:
        state = {"shard": _ShardModule(self.params), "optimizer": self.optimizer, "counters": _Counters(self)}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        return state

    @property
    def done(self) -> bool:
        return self.version >= self.total_updates

    def values(self) -> list:
        return [f.clone() for f in self.flats]

    def register(self, worker: int, signature: list) -> tuple:
        mine = self.shard.signature()
        if signature != mine:
            bad = next((a, b) for a, b in zip(signature + [None] * len(mine), mine + [None] * len(signature))
                       if a != b)
            self.error = (f"AsyncDataParallel: worker {worker}'s model differs from server {self.shard.index}'s shard: "
                          f"it has {bad[0]} where the server has {bad[1]} (every rank must build the same model)")
            raise ValueError(self.error)
        with self.lock:
            self.per_worker.setdefault(worker, [0, 0, time.monotonic(), time.monotonic()])
            return self.values(), self.version, self.done

    def push(self, worker: int, wires: list, version: int, want_values: bool, rows: int) -> tuple:
        """Apply one gradient (or refuse it as too stale); ``(applied, version, values or None, done)``."""
        if self.error is not None:
            raise ValueError(self.error)
        with self.lock:
            now = time.monotonic()
            record = self.per_worker.setdefault(worker, [0, 0, now, now])
            record[3] = now
            if self.done or worker in self.dropped:
                return False, self.version, self.values(), True
            staleness = self.version - version
            if self.max_staleness is not None and staleness > self.max_staleness:
                self.refused += 1
                return False, self.version, self.values(), False
            if not self.scales:
                self.gathered_since = now
            for grad, wire in zip(self.grads, wires):
                grad.copy_(wire) if not self.scales else grad.add_(wire)
            self.scales.append(1.0 / (1 + staleness) if self.staleness_lr == "inverse" else 1.0)
            self.staleness[staleness] = self.staleness.get(staleness, 0) + 1
            record[0] += 1
            record[1] += rows
            if len(self.scales) >= self.apply_every or self._due(now):
                self._apply()
            return True, self.version, self.values() if want_values else None, self.done

    def _due(self, now: float) -> bool:
        return self.apply_every_s is not None and bool(self.scales) and now - self.gathered_since >= self.apply_every_s

    def apply_if_due(self) -> None:
        """With ``apply_every_ms``: step on what has gathered once it has waited that long (the
        serve loop calls this between arrivals)."""
        with self.lock:
            if self._due(time.monotonic()) and not self.done:
                self._apply()

    def _apply(self) -> None:
        """One optimizer step on the mean of the gradients gathered since the last, at the mean of
        their learning-rate scales (under the lock)."""
        count, scale = len(self.scales), sum(self.scales) / len(self.scales)
        self.scales = []
        if count > 1:
            for grad in self.grads:
                grad.div_(count)
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * scale
        self.optimizer.step()
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr
        if self.scheduler is not None:
            self.scheduler.step()
        self.version += 1
        if self.manager is not None and self.save_every and (self.version % self.save_every == 0 or self.done):
            self.manager.save(self._state(), step=self.version)

    def final(self, rank: int) -> tuple:
        if self.error is not None:
            raise ValueError(self.error)
        with self.lock:
            self.left.add(rank)
            return self.values(), self.version

    def check_workers(self, worker_ranks: dict) -> None:
        """Drop the workers silent for ``timeout`` seconds (warned once each)."""
        now = time.monotonic()
        with self.lock:
            for worker, rank in worker_ranks.items():
                if worker in self.dropped or rank in self.left:
                    continue
                last = self.per_worker.get(worker, [0, 0, self.started, self.started])[3]
                if now - last > self.timeout:
                    self.dropped.add(worker)
                    warnings.warn(f"AsyncDataParallel: worker {worker} (rank {rank}) sent nothing for "
                                  f"{self.timeout:g} s: dropped; the other workers finish the job", RuntimeWarning,
                                  stacklevel=2)

    def stats(self) -> dict:
        with self.lock:
            per = {w: {"updates": r[0], "rows": r[1],
                       "updates_per_s": r[0] / max(r[3] - r[2], 1e-9) if r[0] > 1 else 0.0}
                   for w, r in sorted(self.per_worker.items())}
            return {"server": self.shard.index, "updates": self.version, "refused": self.refused,
                    "staleness": dict(sorted(self.staleness.items())), "workers": per,
                    "dropped": sorted(self.dropped), "seconds": time.monotonic() - self.started}

    def close(self) -> None:
        """Wait for the last checkpoint; the server stays registered while the RPC agent lives."""
        if self.manager is not None:
            self.manager.wait()


class _Counters:
    """The server's version and statistics in the checkpoint."""

    def __init__(self, server: ShardServer) -> None:
        self.server = server

    def state_dict(self) -> dict:
        s = self.server
        return {"version": s.version, "refused": s.refused,
                "staleness": {str(k): v for k, v in s.staleness.items()}}

    def load_state_dict(self, state: dict) -> None:
        s = self.server
        s.version, s.refused = int(state["version"]), int(state["refused"])
        s.staleness = {int(k): int(v) for k, v in state["staleness"].items()}


def _server(index: int) -> ShardServer:
    server = _SERVERS.get(index)
    if server is None:
        raise RuntimeError(f"AsyncDataParallel: no server for shard {index} in this process (yet)")
    return server


def rpc_register(index: int, worker: int, signature: list) -> Any:
    return _server(index).register(worker, signature)


def rpc_push(index: int, worker: int, wires: list, version: int, want_values: bool, rows: int) -> Any:
    return _server(index).push(worker, wires, version, want_values, rows)


def rpc_final(index: int, rank: int) -> Any:
    return _server(index).final(rank)


def rpc_outcome(index: int, rank: int) -> Any:
    """``(dropped workers, statistics)`` once the server's serve() has ended (waits for it)."""
    server = _server(index)
    while server.settled is None:
        time.sleep(0.02)
    stats = server.stats()
    server.told.add(rank)
    return server.settled, stats
