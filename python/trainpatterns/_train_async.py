"""The Trainer's asynchronous strategy: the same loop, with parameter servers behind it.

``Trainer(..., strategy="async")`` under torchrun wraps the model in
:class:`~trainpatterns.distributed.AsyncDataParallel`. The first ``num_servers`` ranks serve (their
``fit()`` applies gradients until the budget is spent); every other rank is a worker that trains on
its own contiguous shard of the array data with the same loss, loader, precision, accumulation,
validation, metrics and callbacks as a single-process run, pushing each optimizer step to the
servers instead of stepping an optimizer. The plan's ``total_steps`` is the job's budget of applied
updates, shared by the workers; one update is one worker's (global) batch. Workers cut their own
training into virtual epochs of the plan's ``steps_per_epoch`` local steps; the first worker speaks
and writes ``metrics.jsonl``, with ``step`` the servers' count of applied updates. The servers save
their shards, optimizer states and counters under ``checkpoint_dir/servers`` every virtual epoch's
worth of updates, and a job started again resumes from there.
"""
from __future__ import annotations

import os
import time
from typing import Any, Mapping, Optional

import torch

from .distributed import AsyncDataParallel
from .distributed._store import env_int

__all__ = ["AsyncPlace", "fit_async", "optimizer_factory", "place", "wrap"]


class AsyncPlace:
    """Where this process stands: ``rank``/``world`` of the job, and for a worker its index among
    ``workers`` (the shard of the data it reads)."""

    def __init__(self, options: Mapping) -> None:
        self.rank = env_int("RANK", 0, who="strategy='async'")
        self.world = env_int("WORLD_SIZE", 1, who="strategy='async'")
        self.num_servers = int(options.get("num_servers", 1))
        if self.world < 2:
            raise ValueError("strategy='async' runs under torchrun with at least 2 processes (a server and a worker)")
        self.workers = self.world - self.num_servers
        self.is_server = self.rank < self.num_servers
        self.worker = None if self.is_server else self.rank - self.num_servers


def place(options: Optional[Mapping]) -> AsyncPlace:
    return AsyncPlace(dict(options or {}))


def optimizer_factory(optimizer: Any):
    """A factory ``params -> optimizer`` for the servers: the given factory, or one that builds the
    given optimizer's class with its (single) param group's hyperparameters and, for a fused
    optimizer, its ``master_weights``. Its ``max_grad_norm`` is not carried: a shard's norm is not
    the gradient's, so the caller clips over the whole model (:class:`_Push`, the pipeline stepper)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if len(optimizer.param_groups) != 1:
        raise ValueError("strategy='async' rebuilds the optimizer on each server's shard: give one param group, or "
                         "optimizer=lambda params: ... as a factory")
    settings = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "initial_lr")}
    if hasattr(optimizer, "master_weights"):
        settings["master_weights"] = optimizer.master_weights
    return lambda params: type(optimizer)(params, **settings)


class _Push:
    """The optimizer the Trainer's stepper drives on a worker: ``step()`` pushes the gradients.

    With ``max_grad_norm`` (the given fused optimizer's) the gradient is first clipped by its norm
    over the whole model, as the optimizer would have: only the worker sees all of it, a server
    holds one shard. ``param_groups`` (the model's trainable parameters) lets torch.amp.GradScaler
    unscale the gradients before ``step()`` and skip a push holding inf or NaN."""

    def __init__(self, adp: AsyncDataParallel, max_grad_norm: Optional[float] = None) -> None:
        self.adp = adp
        self.max_grad_norm = max_grad_norm
        self.param_groups = [{"params": [p for p in adp.module.parameters() if p.requires_grad]}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.adp.module.parameters():
            p.grad = None

    def step(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.param_groups[0]["params"], self.max_grad_norm)
        self.adp.step()


def wrap(model: torch.nn.Module, optimizer: Any, total_updates: int, checkpoint_dir: Optional[str],
         save_every: int, options: Optional[Mapping]) -> tuple:
    """``(AsyncDataParallel, the optimizer the stepper drives)``."""
    options = dict(options or {})
    if "scheduler" in options and not callable(options["scheduler"]):
        raise TypeError("async_options['scheduler'] must be a factory optimizer -> scheduler (built on each server)")
    servers_dir = None if checkpoint_dir is None else os.path.join(checkpoint_dir, "servers")
    adp = AsyncDataParallel(model, optimizer_factory(optimizer), total_updates=total_updates,
                            checkpoint_dir=servers_dir, save_every=save_every if servers_dir else None, **options)
    return adp, _Push(adp, getattr(optimizer, "max_grad_norm", None))


def fit_async(trainer: Any) -> list:
    """``Trainer.fit`` for ``strategy="async"`` (see the module docstring)."""
    adp = trainer.model
    if adp.is_server:
        adp.serve()
        adp.finish()
        return trainer.history
    for cb in trainer.callbacks:
        cb.on_fit_start(trainer)
    batches = trainer._batches()
    index = 0
    try:
        while adp.training and not trainer.stop_training:
            for cb in trainer.callbacks:
                cb.on_epoch_start(trainer, index)
            adp.module.train()
            total = torch.zeros((), dtype=torch.float64, device=trainer.device)
            count, rows, t0 = 0, 0, time.perf_counter()
            while count < trainer.plan.steps_per_epoch and adp.training:
                loss, n = trainer.stepper(batches)
                total += loss
                count, rows = count + 1, rows + n
                trainer.step = min(adp.versions)
                for cb in trainer.callbacks:
                    cb.on_step_end(trainer, trainer.step, loss)
            if count:
                trainer._end_epoch(index, float(total) / count, rows, time.perf_counter() - t0, False)
            index += 1
    finally:
        batches.close()
        if trainer.loader is not None:
            trainer.loader.close()
    adp.finish()
    stats = adp.stats()
    trainer.say(f"async: {stats['updates']} updates applied, {stats['refused']} refused as too stale, staleness "
                f"histogram {stats['staleness']}, dropped workers {stats['dropped']}")
    for cb in trainer.callbacks:
        cb.on_fit_end(trainer)
    return trainer.history
