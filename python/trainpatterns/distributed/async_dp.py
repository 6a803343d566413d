"""AsyncDataParallel: asynchronous data parallelism through sharded parameter servers.

Every rank of a torchrun job runs the same script. The first ``num_servers`` ranks hold the model's
trainable parameters, sharded by bytes (``_ps_shards``), each shard with the optimizer
``optimizer(params)`` builds (``_ps_server``). The other ranks are workers: each trains a replica on
its own data, pushes each gradient to the servers without waiting (the push overlaps the next
batch's forward and backward), and takes the fresh values the servers send back every
``pull_every`` steps. No worker ever waits for another: the servers apply gradients as they arrive,
one update each, until ``total_updates`` have been applied, so a fast worker contributes more of the
budget and a slow or dead one costs only its own share.

Staleness: a gradient computed on version ``v`` and applied at version ``V`` has staleness
``V - v``. A worker keeps one push per server in flight, so its own pushes make it at most one
update stale; the other workers' pushes add the rest. With ``max_staleness=s`` a server refuses a
gradient staler than ``s`` (the worker gets fresh values and computes again), so every applied
gradient's staleness is at most ``s``; with ``s=0`` a worker also waits for its push's answer before
its next forward, and with one worker training is exactly single-process training. The transport is
``torch.distributed.rpc`` (``_ps_transport``; no process group is created).
"""
from __future__ import annotations

import re
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from .. import _kernels
from ._ps_server import ShardServer, rpc_final, rpc_outcome, rpc_push, rpc_register
from ._ps_shards import plan_shards
from ._store import env_int
from ._ps_transport import RpcTransport

__all__ = ["AsyncDataParallel"]

_WIRE = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class AsyncDataParallel(nn.Module):
    """Asynchronous training of ``module`` by parameter servers (see the module docstring).

    Args:
        module: the model; every rank builds the same architecture (checked). The servers start
            from their own rank's values, and every worker starts from the servers'.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, built by each server over its
            shard (any trainpatterns fused optimizer; its state is checkpointed).
        num_servers: how many of the first ranks serve (at least one rank must work).
        total_updates: the job's budget of applied gradients (per server shard).
        pull_every: a worker takes fresh values every this many steps (1: every step).
        max_staleness: bound on an applied gradient's staleness (None: unbounded).
        staleness_lr: ``"inverse"``: a gradient of staleness k is applied with lr / (1 + k).
        scheduler: ``scheduler(optimizer)``, stepped by the server after every update.
        compress: ``"bf16"`` or ``"fp16"``: gradients cross the wire in 16 bits.
        timeout: seconds after which a silent worker is dropped and a call to a dead server fails.
        checkpoint_dir, save_every: the servers save there every ``save_every`` updates and resume
            from it when the job starts again.
        apply_every: a server steps once per this many arriving gradients, on their mean (one
            update; the budget counts updates).
        apply_every_ms: a server also steps on what has gathered once its first gradient has
            waited this many milliseconds (with ``apply_every > 1``).
    """

    def __init__(self, module: nn.Module, optimizer: Callable, num_servers: int = 1, total_updates: int = 10_000,
                 pull_every: int = 1, max_staleness: Optional[int] = None, *, staleness_lr: Optional[str] = None,
                 scheduler: Optional[Callable] = None, compress: Optional[str] = None, timeout: float = 60.0,
                 checkpoint_dir: Optional[str] = None, save_every: Optional[int] = None, apply_every: int = 1,
                 apply_every_ms: Optional[float] = None) -> None:
        super().__init__()
        self.rank = env_int("RANK", who="AsyncDataParallel")
        self.world = env_int("WORLD_SIZE", who="AsyncDataParallel")
        _check_arguments(self.world, num_servers, total_updates, pull_every, max_staleness, staleness_lr,
                         compress, timeout, save_every, optimizer, apply_every, apply_every_ms)
        self.module = module
        self.num_servers = num_servers
        self.pull_every = pull_every
        self.max_staleness = max_staleness
        self.wire = _WIRE[compress]
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("AsyncDataParallel: the model has no trainable parameters")
        self._params = [p for _, p in named]
        self.shards = plan_shards(named, num_servers)
        self.is_server = self.rank < num_servers
        self.worker = None if self.is_server else self.rank - num_servers
        self._worker_ranks = {w: w + num_servers for w in range(self.world - num_servers)}
        self.server = None
        if self.is_server:
            shard = self.shards[self.rank]
            self.server = ShardServer(shard, [self._params[i].detach() for i in shard.model_indices], optimizer,
                                      scheduler, total_updates=total_updates, max_staleness=max_staleness, staleness_lr=staleness_lr, timeout=timeout,
                                      checkpoint_dir=checkpoint_dir, save_every=save_every, apply_every=apply_every,
                                      apply_every_ms=apply_every_ms)
        self.transport = RpcTransport(self.rank, self.world, timeout)
        self._done = False
        self._steps = 0
        self._pending: list = []  # (server, future) of pushes not yet answered
        self._versions = [0] * num_servers  # the version of each shard this replica holds
        self._forward_versions = list(self._versions)
        self._final_stats: Optional[list] = None
        self._tables = [[g.table(torch.device("cpu")) for g in s.groups] for s in self.shards]
        if not self.is_server:
            self._register()

    @property
    def versions(self) -> list:
        """Per server shard, the version (applied updates) of the values this replica holds."""
        return list(self._versions)

    # ----- worker side ---------------------------------------------------------------------------

    def _register(self) -> None:
        for s in self.shards:
            try:
                values, version, done = self.transport.call(s.index, rpc_register, s.index, self.worker, s.signature())
            except Exception as e:
                self.transport.close(graceful=False)
                raise ValueError(f"AsyncDataParallel: rank {self.rank} cannot join server {s.index}: "
                                 f"{_remote_message(e)}") from e
            self._take(s.index, values, version)
            self._done = self._done or done

    @property
    def training(self) -> bool:
        """nn.Module's mode flag, and False once the servers have applied ``total_updates``: the
        workers' loop condition (``while adp.training``)."""
        return self.__dict__.get("_training_flag", True) and not self.__dict__.get("_done", False)

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_training_flag"] = mode

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_server:
            raise RuntimeError(f"AsyncDataParallel: rank {self.rank} is a server (the first {self.num_servers} ranks "
                               f"serve); call serve() there, and train on the other ranks")
        self._settle(wait=False)  # the freshest values that have arrived
        self._forward_versions = list(self._versions)
        return self.module(*args, **kwargs)

    def step(self, rows: int = 0) -> None:
        """Push this replica's gradients (set by backward) to the servers without waiting, then zero
        them. The previous push's answer (its fresh values) is taken first: it had this batch's
        forward and backward to arrive, so a worker keeps one push per server in flight and its own
        pushes make its gradients at most one update stale. ``rows``: examples in the batch (for
        the statistics)."""
        if self.is_server:
            raise RuntimeError(f"AsyncDataParallel: rank {self.rank} is a server and cannot train")
        self._settle(wait=True)
        self._steps += 1
        want = self._steps % self.pull_every == 0
        for s, tables in zip(self.shards, self._tables):
            wires = []
            for g, table in zip(s.groups, tables):
                grads = [self._params[i].grad for i in g.indices]
                table.set_tensors([None if t is None else t.detach().contiguous() for t in grads])
                wire = torch.empty(g.span, dtype=self.wire or g.dtype)
                _kernels.bucket_pack(table, wire)
                table.release()
                wires.append(wire)
            future = self.transport.call_async(s.index, rpc_push, s.index, self.worker, wires,
                                               self._forward_versions[s.index], want, rows)
            self._pending.append((s.index, future))
        for p in self._params:
            p.grad = None
        if self.max_staleness == 0:  # not even its own push may be missing from the next forward's values
            self._settle(wait=True)

    def _settle(self, wait: bool) -> None:
        """Take the answered pushes' values: all of them, waiting, with ``wait``; else those that
        have arrived."""
        still = []
        for index, future in self._pending:
            if not wait and not future.done():
                still.append((index, future))
                continue
            try:
                applied, version, values, done = future.wait()
            except Exception as e:
                self.transport.close(graceful=False)  # a live agent would abort the interpreter at exit
                raise RuntimeError(f"AsyncDataParallel: server {index} (rank {index}) did not answer: "
                                   f"{_remote_message(e)}; restart the job (torchrun --max-restarts) to resume from "
                                   f"the servers' checkpoints") from e
            if values is not None:
                self._take(index, values, version)
            self._done = self._done or done
        self._pending = still

    def _take(self, index: int, values: list, version: int) -> None:
        if version < self._versions[index]:
            return  # an older answer arriving after a newer one
        s = self.shards[index]
        with torch.no_grad():
            for g, table, flat in zip(s.groups, self._tables[index], values):
                table.set_tensors([self._params[i].detach() for i in g.indices])
                _kernels.bucket_unpack(table, flat)
                table.release()
        self._versions[index] = version

    # ----- server side ---------------------------------------------------------------------------

    def serve(self) -> None:
        """Apply arriving gradients until the budget is spent and every live worker has taken the
        final values (or been dropped). Server ranks only."""
        if not self.is_server:
            raise RuntimeError(f"AsyncDataParallel: rank {self.rank} is a worker; only the first "
                               f"{self.num_servers} ranks serve")
        while True:
            if self.server.error is not None:
                time.sleep(0.5)  # the workers' next calls hear of the error before the agent goes
                self.transport.close(graceful=False)
                raise ValueError(self.server.error)
            self.server.check_workers(self._worker_ranks)
            self.server.apply_if_due()
            live = {r for w, r in self._worker_ranks.items() if w not in self.server.dropped}
            if self.server.done and live <= self.server.left:
                self.server.settled = sorted(self.server.dropped)
                return
            if not live:
                raise RuntimeError("AsyncDataParallel: every worker was dropped before the budget was spent")
            time.sleep(0.02 if self.server.apply_every_s is None else min(0.02, self.server.apply_every_s / 2))

    # ----- the end -------------------------------------------------------------------------------

    def finish(self) -> None:
        """Every rank: load the final values of every shard into ``module``, collect the statistics
        and leave the job. Workers may call it as soon as ``training`` is False."""
        if self._final_stats is not None:
            return
        if self.is_server and self.server.settled is None:
            self.serve()
        if not self.is_server:
            self._settle(wait=True)
        for s in self.shards:
            values, version = self.transport.call(s.index, rpc_final, s.index, self.rank)
            self._take(s.index, values, version)
        # Every rank learns each server's outcome once its serve() has ended (a dead worker is
        # dropped only after the timeout): all leave gracefully, or, with a rank gone, all at once.
        outcomes = [self.transport.call(s.index, rpc_outcome, s.index, self.rank, timeout=3 * self.transport.timeout)
                    for s in self.shards]
        dropped = {w for d, _ in outcomes for w in d}
        if self.is_server:  # stay until every live rank has had its answer from this server
            needed = set(range(self.world)) - {self._worker_ranks[w] for w in dropped}
            deadline = time.monotonic() + self.transport.timeout
            while not needed <= self.server.told and time.monotonic() < deadline:
                time.sleep(0.02)
            self.server.close()
        self._final_stats = [st for _, st in outcomes]
        self.transport.close(graceful=not dropped)

    def stats(self) -> dict:
        """After :meth:`finish`: server 0's updates applied, refused (too stale), staleness
        histogram and per-worker updates, rows and updates/s; the dropped workers; and under
        ``"shards"`` every server's own figures (each shard counts its own versions)."""
        if self._final_stats is None:
            raise RuntimeError("AsyncDataParallel.stats() is available after finish()")
        first = self._final_stats[0]
        return {"updates": first["updates"], "refused": first["refused"], "staleness": first["staleness"],
                "workers": first["workers"], "dropped": sorted({w for st in self._final_stats for w in st["dropped"]}),
                "shards": self._final_stats}


def _check_arguments(world: int, num_servers: Any, total_updates: Any, pull_every: Any, max_staleness: Any,
                     staleness_lr: Any, compress: Any, timeout: Any, save_every: Any, optimizer: Any,
                     apply_every: Any, apply_every_ms: Any) -> None:
    def positive(name: str, v: Any, allow_none: bool = False, zero: bool = False) -> None:
        if v is None and allow_none:
            return
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if zero else 1):
            raise ValueError(f"AsyncDataParallel: {name} must be an int >= {0 if zero else 1}, got {v!r}")

    positive("num_servers", num_servers)
    if num_servers > world - 1:
        raise ValueError(f"AsyncDataParallel: num_servers={num_servers} leaves no worker among {world} ranks "
                         f"(at most {world - 1} servers)")
    positive("total_updates", total_updates)
    positive("pull_every", pull_every)
    positive("max_staleness", max_staleness, allow_none=True, zero=True)
    positive("save_every", save_every, allow_none=True)
    positive("apply_every", apply_every)
    if apply_every_ms is not None and not (isinstance(apply_every_ms, (int, float)) and apply_every_ms > 0):
        raise ValueError(f"AsyncDataParallel: apply_every_ms must be > 0 (milliseconds) or None, got {apply_every_ms!r}")
    if staleness_lr not in (None, "inverse"):
        raise ValueError(f"AsyncDataParallel: staleness_lr must be None or 'inverse', got {staleness_lr!r}")
    if compress not in _WIRE:
        raise ValueError(f"AsyncDataParallel: compress must be None, 'bf16' or 'fp16', got {compress!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"AsyncDataParallel: timeout must be > 0 seconds, got {timeout!r}")
    if not callable(optimizer) or isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("AsyncDataParallel: optimizer must be a factory params -> optimizer, e.g. "
                        "lambda params: FusedAdamW(params, lr=1e-3): each server builds one over its shard")


def _remote_message(e: BaseException) -> str:
    """The message of an exception raised on another rank: RPC carries the remote traceback as
    text, whose last ``SomethingError: ...`` line is what was raised there."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    raised = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception): ", line)]
    return raised[-1] if raised else (lines[0] if lines else type(e).__name__)
