"""Interpolation mode: fit noise-free, complete data (a physics surrogate, a lookup table) as
exactly as possible, and measure the worst-case error over the whole dataset.

:func:`interpolate` trains with a first-order optimizer (FusedAdamW by default) until its max
error stalls or its steps run out, then hands over to the full-batch L-BFGS finish
(:func:`~trainpatterns._lbfgs.lbfgs_finish`), which gets much further on such smooth problems.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._lbfgs import LBFGSReport, lbfgs_finish
from ._overfit_base import check_dataset, disable_regularization, errors, param_device, param_dtype
from .optim import FusedAdamW

_FINISHES = ("lbfgs", None)


@dataclass
class InterpolationReport:
    """Outcome of :func:`interpolate`: the worst-case absolute error and the mean squared error
    over the whole dataset after training (and the finish), ``steps`` first-order steps run
    (fewer than asked when ``stalled``), ``history`` of ``(step, max_error)`` during those steps,
    the model's ``dtype``, and ``finish``: the :class:`LBFGSReport` of the L-BFGS finish, or None."""

    max_error: float
    mse: float
    steps: int
    dtype: torch.dtype
    history: list = field(default_factory=list)
    stalled: bool = False
    finish: Optional[LBFGSReport] = None

    def __str__(self) -> str:
        text = (f"interpolation: max error {self.max_error:.3e}, mse {self.mse:.3e} over the whole dataset "
                f"after {self.steps} steps{' (stalled)' if self.stalled else ''} ({self.dtype})")
        return text if self.finish is None else f"{text}\n  {self.finish}"


def _step_needs_closure(optimizer: torch.optim.Optimizer) -> bool:
    """True when ``optimizer.step`` has a ``closure`` parameter without a default (L-BFGS)."""
    try:
        closure = inspect.signature(optimizer.step).parameters.get("closure")
    except (TypeError, ValueError):  # a builtin without a signature: it takes no required closure we can see
        return False
    return closure is not None and closure.default is inspect.Parameter.empty


def interpolate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, steps: int = 2000,
                lr: float = 1e-3, batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = torch.float64,
                optimizer: Optional[torch.optim.Optimizer] = None, eval_every: Optional[int] = None,
                seed: int = 0, finish: Optional[str] = "lbfgs", stall: float = 0.05, finish_max_iter: int = 1000,
                finish_time_limit: Optional[float] = None) -> InterpolationReport:
    """Fit noise-free, complete data as exactly as possible (interpolation mode), in place.

    The caller's ``model`` itself is trained, and converted to ``dtype`` in place first (float64 by
    default; None keeps the model's dtype): afterwards its parameters and buffers are float64, and
    inputs given to it must be too (``model.float()`` converts it back). An ``optimizer`` passed
    in must hold the model's own parameters.

    No regularisation (:func:`disable_regularization` on the model and the optimizer), MSE loss,
    full-batch unless ``batch_size`` (minibatches drawn with ``seed``). Default optimizer:
    FusedAdamW with ``lr``, no weight decay, cosine decay to 0 over ``steps``; an optimizer whose
    ``step`` needs a closure (``torch.optim.LBFGS``) is given one. The max error over the whole
    dataset is measured every ``eval_every`` steps (default a tenth of the run).

    ``finish="lbfgs"`` (default): the first-order phase ends early when it stalls, i.e. when a
    measurement lowers the best max error so far by less than the fraction ``stall`` (0.05: less
    than 5%), and then :func:`lbfgs_finish` polishes the model (``finish_max_iter`` iterations,
    at most ``finish_time_limit`` seconds). ``finish=None``: all ``steps`` run, no finish.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    check_dataset(inputs, targets)
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if finish not in _FINISHES:
        raise ValueError(f"finish must be 'lbfgs' or None, got {finish!r}")
    if not (isinstance(stall, (int, float)) and 0.0 <= stall < 1.0):
        raise ValueError(f"stall must be a fraction in [0, 1), got {stall!r}")
    if eval_every is not None and (not isinstance(eval_every, int) or eval_every < 1):
        raise ValueError(f"eval_every must be a positive integer or None, got {eval_every!r}")
    if dtype is not None:
        model.to(dtype=dtype)
    dtype, device = param_dtype(model), param_device(model)
    x = inputs.to(device=device, dtype=dtype)
    y = targets.to(device=device, dtype=dtype)
    scheduler = None
    if optimizer is None:
        optimizer = FusedAdamW(model.parameters(), lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    disable_regularization(model, optimizer)
    needs_closure = _step_needs_closure(optimizer)
    every = eval_every or max(1, steps // 10)
    gen = torch.Generator().manual_seed(seed)
    history: list = []
    best, stalled, step = math.inf, False, 0
    batch = (x, y)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(batch[0]), batch[1])
        loss.backward()
        return loss

    model.train()
    for step in range(1, steps + 1):
        if batch_size is not None and batch_size < x.shape[0]:
            idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen).to(device)
            batch = (x[idx], y[idx])
        if needs_closure:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step % every == 0 or step == steps:
            error = errors(model, x, y)[0]
            history.append((step, error))
            stalled = finish is not None and step < steps and error > (1.0 - stall) * best
            best = min(best, error)
            if stalled:
                break
    report = None
    if finish == "lbfgs":
        report = lbfgs_finish(model, x, y, max_iter=finish_max_iter, time_limit=finish_time_limit)
    final_max, mse = errors(model, x, y)
    return InterpolationReport(max_error=final_max, mse=mse, steps=step, dtype=dtype, history=history,
                               stalled=stalled, finish=report)
