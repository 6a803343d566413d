"""The Trainer's pipeline strategy: the same loop, with the model cut into stages across ranks.

``Trainer(..., strategy="pipeline")`` under torchrun wraps an ``nn.Sequential`` in
:class:`~trainpatterns.distributed.PipelineParallel` (``pipeline_options`` are its arguments, plus
``scheduler``: a factory ``optimizer -> scheduler``, since each rank's optimizer holds its stage's
parameters only and is built here from the one given). The ranks of one pipeline replica read the
same batches (the first stage uses the inputs, the last the targets); replicas read their own
shards. An optimizer step is one batch through the schedule: its micro-batches are the
accumulation, so ``accumulate`` stays 1. The batch's loss, known on the last stage, is shared with
the pipeline's other ranks so that every rank keeps the same records; evaluation and prediction run
the stages forward only (``PipelineParallel.eval_step``). Checkpoints save each rank's stage,
optimizer and scheduler as per-rank entries.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn

from ._train_async import optimizer_factory
from ._train_data import batch_rows
from ._train_step import PRECISIONS
from .distributed import PipelineParallel

__all__ = ["PER_RANK", "PipelineStepper", "check", "place", "wrap"]

_ARGUMENTS = ("stages", "split_points", "balance", "microbatches", "schedule", "data_parallel", "example_inputs",
              "bucket_mb")
PER_RANK = ["loader", "model", "optimizer", "scheduler"]


def check(options: Optional[Mapping], scheduler: Any, accumulate: int, compute_loss: Any,
          interpolation: bool) -> dict:
    """The pipeline options, after refusing what the strategy cannot honour."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_ARGUMENTS) - {"scheduler"})
    if unknown:
        raise ValueError(f"pipeline_options: unknown {unknown}; known: {sorted(_ARGUMENTS + ('scheduler',))}")
    if scheduler is not None:
        raise ValueError("strategy='pipeline': each rank's optimizer holds its stage only and is built by the Trainer; "
                         "pass pipeline_options={'scheduler': lambda optimizer: ...} instead of scheduler=")
    if accumulate != 1:
        raise ValueError("strategy='pipeline' accumulates over its micro-batches: pass pipeline_options="
                         "{'microbatches': k} instead of accumulate=")
    if compute_loss is not None:
        raise ValueError("strategy='pipeline' needs loss_fn(outputs, targets) on the last stage, not compute_loss")
    if interpolation:
        raise ValueError("strategy='pipeline' does not run interpolation mode (its finish needs the whole model)")
    return options


def place(options: Mapping, rank: int, world: int) -> tuple[int, int]:
    """(this rank's replica, the number of replicas): the shard of the data it reads."""
    replicas = options.get("data_parallel", 1)
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1 or world % replicas:
        raise ValueError(f"pipeline_options data_parallel={replicas!r} must be an int >= 1 dividing the "
                         f"job's {world} ranks")
    return rank // (world // replicas), replicas


def wrap(model: nn.Module, loss_fn: Any, optimizer: Any, options: Mapping) -> tuple:
    """(the PipelineParallel, this rank's optimizer over its stage, its scheduler or None). The
    optimizer is rebuilt with the given one's class and settings; its ``max_grad_norm`` (a fused
    optimizer's clipping) is left to the stepper, which clips by the norm over all stages."""
    pp = PipelineParallel(model, loss_fn=loss_fn, **{k: v for k, v in options.items() if k in _ARGUMENTS})
    params = [p for p in pp.parameters() if p.requires_grad]
    opt = optimizer_factory(optimizer)(params) if optimizer is not None else None
    scheduler = options["scheduler"](opt) if options.get("scheduler") is not None and opt is not None else None
    return pp, opt, scheduler


class PipelineStepper:
    """The Trainer's step for a pipeline: the ``Stepper`` interface (``__call__``, ``autocast``,
    ``scaler``)."""

    def __init__(self, pp: PipelineParallel, optimizer: torch.optim.Optimizer, device: torch.device,
                 precision: Optional[str], max_grad_norm: Optional[float] = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of 'fp32', 'bf16', 'fp16' or None, got {precision!r}")
        self.pp = pp
        self.optimizer = optimizer
        self.device_type = device.type
        self.dtype = PRECISIONS[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.max_grad_norm = max_grad_norm
        self.width = pp.ranks_per_pipeline

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def __call__(self, batches: Iterator[Any]) -> tuple[torch.Tensor, float]:
        """One batch through the pipeline and one optimizer step: (the batch's mean loss, the same
        on every rank of the pipeline; this rank's share of the batch's rows)."""
        batch = next(batches)
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise ValueError("strategy='pipeline' needs (inputs, targets) batches")
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.pp.step(batch[0], batch[1], scaler=self.scaler)
        if self.scaler is not None and self.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
        if self.max_grad_norm is not None:
            self.pp.clip_grad_norm_(self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        shared = self.pp.share_from_last(loss)
        return torch.tensor(shared, dtype=torch.float64), batch_rows(batch) / self.width
