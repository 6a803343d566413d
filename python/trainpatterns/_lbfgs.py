"""The second-order finish of interpolation mode: full-batch L-BFGS on the mean squared error.

First-order optimizers stall on noise-free interpolation problems: the error left is a smooth,
badly conditioned landscape where Adam's minibatch noise and diagonal scaling make little headway,
while L-BFGS with a strong-Wolfe line search on the whole dataset converges much further in the
same time. :func:`lbfgs_finish` runs it on a deep copy of the model in float64 (float32 rounding
ends the progress long before the model does) and writes the result back into the caller's
parameters only when it lowered the worst-case error, so a finish never makes a model worse.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ._overfit_base import check_dataset, errors, param_device, residual

# A loss evaluation counts as progress when it lowers the reference loss by at least this fraction.
_MIN_PROGRESS = 1e-6
# torch's L-BFGS keeps a curvature pair only when y.s > 1e-10, an absolute threshold: on the small
# losses of a well-trained model every pair is dropped and L-BFGS degrades to steepest descent.
# So the objective is the MSE divided by a scale, first the initial MSE; when it has fallen below
# this fraction of the scale, the scale becomes the current MSE and L-BFGS starts afresh.
_RESCALE = 1e-4


@dataclass
class LBFGSReport:
    """Outcome of :func:`lbfgs_finish`. ``max_error`` and ``mse`` are over the whole dataset, in the
    model's dtype, after the finish (the model's values before it when it did not improve:
    ``improved`` is False and the model is unchanged). ``seconds`` is the wall time of the whole
    call. ``history`` holds ``(seconds since the call began, max_error)`` each time the best max
    error seen by the search (in the finish's ``dtype``) fell. ``stopped`` says why the search ended:
    ``"max_iter"``, ``"time limit"``, ``"no progress"``, ``"converged"`` (L-BFGS found no descent
    direction or took a zero step), ``"evaluation limit"`` or ``"non-finite loss"``."""

    max_error: float
    mse: float
    initial_max_error: float
    improved: bool
    iterations: int
    evaluations: int
    seconds: float
    stopped: str
    dtype: torch.dtype
    history: list = field(default_factory=list)

    def __str__(self) -> str:
        kept = "" if self.improved else " (no improvement: the model is unchanged)"
        return (f"L-BFGS finish: max error {self.initial_max_error:.3e} -> {self.max_error:.3e}, mse {self.mse:.3e}"
                f"{kept}; {self.iterations} iterations, {self.evaluations} evaluations in {self.seconds:.1f} s "
                f"({self.dtype}), stopped: {self.stopped}")


class _Rescale(Exception):
    """Raised inside the closure when the loss scale changes: the L-BFGS history is rebuilt."""


class _Stop(Exception):
    """Raised inside the closure to end the search early; ``reason`` becomes ``LBFGSReport.stopped``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _flat(params: list) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


def _load_flat(params: list, flat: torch.Tensor) -> None:
    """Copy ``flat`` (as made by :func:`_flat`) into ``params``, cast to each one's dtype and device."""
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n


def _check_arguments(max_iter: int, time_limit: Optional[float], dtype: torch.dtype, history_size: int,
                     patience: int, batch_size: int) -> None:
    for name, value in (("max_iter", max_iter), ("history_size", history_size), ("patience", patience),
                        ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or not (math.isfinite(time_limit) and time_limit >= 0)):
        raise ValueError(f"time_limit must be None or a finite number of seconds >= 0, got {time_limit!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype!r}")


def lbfgs_finish(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, max_iter: int = 1000,
                 time_limit: Optional[float] = None, dtype: torch.dtype = torch.float64, history_size: int = 100,
                 patience: int = 50, batch_size: int = 8192) -> LBFGSReport:
    """Polish a trained model on noise-free data with full-batch L-BFGS on the mean squared error.

    ``torch.optim.LBFGS`` with a strong-Wolfe line search (``history_size`` correction pairs) runs
    on a deep copy of ``model`` cast to ``dtype`` (float64 by default), in eval mode (BatchNorm
    uses its running statistics, which stay as they are; dropout is off), over the whole dataset
    (``batch_size`` rows per forward pass; the gradient is that of the full-batch loss). Only
    parameters with ``requires_grad`` are optimised.

    The search stops after ``max_iter`` L-BFGS iterations, once ``time_limit`` seconds of wall
    time have passed since the call began (None: no limit), when ``patience`` loss evaluations in
    a row have together lowered the loss by less than a relative 1e-6 (no progress), or when
    L-BFGS converges. The parameters with the smallest max error seen are then cast back into the
    caller's model, and kept only if the model's max error (measured in its own dtype, as
    :func:`max_error` does) is lower than before; otherwise the model is left as it was. Without a
    time limit the result is deterministic: the same model and data give bitwise the same
    parameters. The caller's gradients and buffers are not touched.
    """
    start = time.perf_counter()
    _check_arguments(max_iter, time_limit, dtype, history_size, patience, batch_size)
    check_dataset(inputs, targets)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (none with requires_grad=True): nothing to finish")
    initial_max, initial_mse = errors(model, inputs, targets, batch_size=batch_size)

    work = copy.deepcopy(model).to(dtype=dtype)
    work.eval()
    params = [q for q in work.parameters() if q.requires_grad]
    device = param_device(work)
    x = inputs.to(device=device, dtype=dtype)
    y = targets.to(device=device, dtype=dtype)
    max_eval = 2 * max_iter
    # The closure's bookkeeping: the best point by max error, the no-progress count, and the loss
    # scale (see _RESCALE).
    scale = errors(work, x, y, batch_size=batch_size)[1]  # in ``dtype``: the search depends on it alone
    track = dict(evaluations=0, best_error=math.inf, best=None, reference=math.inf, stale=0,
                 scale=scale if math.isfinite(scale) and scale > 0 else 1.0)
    history: list = []

    def closure() -> torch.Tensor:
        if time_limit is not None and time.perf_counter() - start >= time_limit:
            raise _Stop("time limit")
        if track["evaluations"] >= max_eval:
            raise _Stop("evaluation limit")
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=dtype, device=device)
        worst = torch.zeros((), dtype=dtype, device=device)
        for s in range(0, x.shape[0], batch_size):
            diff = residual(work, x[s:s + batch_size], y[s:s + batch_size])
            loss = diff.square().sum() / (y.numel() * track["scale"])
            loss.backward()
            total += loss.detach()
            worst = torch.maximum(worst, diff.detach().abs().max())
        value, error = float(total) * track["scale"], float(worst)
        if not (math.isfinite(value) and math.isfinite(error)):
            raise _Stop("non-finite loss")
        track["evaluations"] += 1
        if error < track["best_error"]:
            track["best_error"], track["best"] = error, _flat(params)
            history.append((time.perf_counter() - start, error))
        if value < track["reference"] * (1.0 - _MIN_PROGRESS):
            track["reference"], track["stale"] = value, 0
        else:
            track["stale"] += 1
            if track["stale"] >= patience:
                raise _Stop("no progress")
        if value < _RESCALE * track["scale"]:
            track["scale"] = value
            raise _Rescale()
        return total

    iterations, stopped = 0, None
    while stopped is None:
        opt = torch.optim.LBFGS(params, lr=1.0, max_iter=max_iter - iterations, max_eval=max_eval, tolerance_grad=0.0,
                                tolerance_change=0.0, history_size=history_size, line_search_fn="strong_wolfe")
        try:
            opt.step(closure)
            stopped = "evaluation limit" if track["evaluations"] >= max_eval else "converged"
        except _Rescale:
            pass
        except _Stop as stop:
            stopped = stop.reason
        iterations += int(opt.state[params[0]].get("n_iter", 0))
        if iterations >= max_iter and stopped in (None, "converged", "evaluation limit"):
            stopped = "max_iter"

    final_max, final_mse, improved = initial_max, initial_mse, False
    if track["best"] is not None:
        saved = [p.detach().clone() for p in trainable]
        _load_flat(trainable, track["best"])
        new_max, new_mse = errors(model, inputs, targets, batch_size=batch_size)
        improved = new_max < initial_max or (not math.isfinite(initial_max) and math.isfinite(new_max))
        if improved:
            final_max, final_mse = new_max, new_mse
        else:
            with torch.no_grad():
                for p, old in zip(trainable, saved):
                    p.copy_(old)
    return LBFGSReport(max_error=final_max, mse=final_mse, initial_max_error=initial_max, improved=improved,
                       iterations=iterations, evaluations=track["evaluations"], seconds=time.perf_counter() - start,
                       stopped=stopped, dtype=dtype, history=history)
