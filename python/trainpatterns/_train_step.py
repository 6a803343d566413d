"""One optimizer step of the Trainer: gradient accumulation and mixed precision.

An optimizer step runs ``accumulate`` micro-batches. Each one's loss is divided by ``accumulate``
so the summed gradients are the mean over the step's examples, as one large batch would give; the
inner micro-batches run under the data-parallel wrapper's ``no_sync()`` (forward included, since the
forward decides whether its backward synchronises), so only the last backward all-reduces.
``precision`` runs the forward under ``torch.autocast`` (bf16 or fp16); fp16 also scales the loss
with a ``GradScaler`` whose ``step`` unscales, checks for inf/NaN, clips and updates in one fused
pass with the trainpatterns optimizers. Interpolation mode ends its plan with one more kind of step,
:func:`finish_interpolation`: full-batch L-BFGS in float64 where Adam stalls.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
from torch import nn

from ._train_data import batch_rows
from .overfit import LBFGSReport, lbfgs_finish

__all__ = ["PRECISIONS", "Stepper", "finish_interpolation"]

PRECISIONS = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Stepper:
    """Runs optimizer steps of ``accumulate`` micro-batches each, in ``precision``."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, loss_of: Callable[[Any], torch.Tensor],
                 device: torch.device, precision: Optional[str], accumulate: int) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of 'fp32', 'bf16', 'fp16' or None, got {precision!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss_of = loss_of
        self.device_type = device.type
        self.dtype = PRECISIONS[precision]
        self.accumulate = accumulate
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's precision context (nothing in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def __call__(self, batches: Iterator[Any]) -> tuple[torch.Tensor, int]:
        """One optimizer step over the next ``accumulate`` batches: (the mean of their losses, a
        detached 0-d tensor; the rows they held)."""
        self.optimizer.zero_grad(set_to_none=True)
        total: Optional[torch.Tensor] = None
        rows = 0
        for i in range(self.accumulate):
            batch = next(batches)
            inner = i < self.accumulate - 1
            quiet = self.model.no_sync() if inner and hasattr(self.model, "no_sync") else contextlib.nullcontext()
            with quiet:
                with self.autocast():
                    loss = self.loss_of(batch)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise ValueError(f"the loss must be a scalar tensor, got {shape}")
                part = loss / self.accumulate if self.accumulate > 1 else loss
                (self.scaler.scale(part) if self.scaler is not None else part).backward()
            detached = loss.detach().float()
            total = detached if total is None else total + detached
            rows += batch_rows(batch)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return total / self.accumulate, rows


def finish_interpolation(module: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, options: Mapping,
                         rank: int, world: int) -> Optional[LBFGSReport]:
    """The L-BFGS finish (:func:`~trainpatterns.overfit.lbfgs_finish` with ``options``) on the whole
    training data: on rank 0, whose parameters are then broadcast (a time limit could stop the
    ranks at different iterations); the report on rank 0, None elsewhere."""
    report = lbfgs_finish(module, inputs, targets, **options) if rank == 0 else None
    if world > 1:
        with torch.no_grad():
            for p in module.parameters():
                torch.distributed.broadcast(p.data, src=0)
    return report
