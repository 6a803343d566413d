"""Useful overfitting: the one-batch overfit check, interpolation mode for noise-free complete data,
and knowledge distillation.

Overfitting is the goal, not the failure, in three situations this module serves:

* Debugging: a model that cannot drive the loss on one batch to near zero has a bug (or is too
  small). :func:`overfit_check` runs that test on a copy and reports; it never touches the caller's
  model or optimizer, and it reports, rather than raises, when the model cannot fit.
* Interpolation: when the data is noise-free and covers the whole input space (a physics
  surrogate, a lookup table), the best model fits every point; regularisation and early stopping
  only hurt. :func:`interpolate` trains that way and measures the worst-case error over the whole
  dataset (:func:`max_error`), optionally in float64.
* Distillation: a small student learns the teacher's full output distribution (softened by a
  temperature), which carries more information per example than the hard label
  (:func:`distillation_loss`, :func:`distill`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._tree import to_device

__all__ = [
    "overfit_check", "OverfitReport", "disable_regularization", "max_error", "interpolate",
    "InterpolationReport", "distillation_loss", "DistillationLoss", "distill",
]


# ----- regularisation switches ---------------------------------------------------------------------

def disable_regularization(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Turn off dropout and weight decay, in place and for good (it survives ``model.train()``):
    every dropout module (``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``...) gets ``p = 0``,
    every ``nn.MultiheadAttention`` an attention dropout of 0, and every param group of
    ``optimizer`` that has a ``weight_decay`` gets 0. Dropout called functionally inside a
    ``forward`` (``F.dropout(x, 0.1, self.training)``) cannot be seen from outside and stays."""
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        elif isinstance(m, nn.MultiheadAttention):
            m.dropout = 0.0
    if optimizer is not None:
        for g in optimizer.param_groups:
            if "weight_decay" in g:
                g["weight_decay"] = 0.0


# ----- the one-batch overfit check -----------------------------------------------------------------

_CLASSIFICATION_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


@dataclass
class OverfitReport:
    """Outcome of :func:`overfit_check`. Losses are the values ``loss_fn`` returned; ``losses[k]``
    is the loss before update k+1 (``losses[0]`` at initialisation). ``bool(report)`` is
    ``report.passed``."""

    passed: bool
    initial_loss: float
    final_loss: float
    best_loss: float
    target: float
    steps: int  # updates made
    steps_to_target: Optional[int]  # updates needed to reach the target; None if never reached
    expected_initial_loss: Optional[float] = None  # log C for classification with C classes
    num_classes: Optional[int] = None
    losses: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        lines = [f"overfit check: {verdict}"]
        init = f"  loss at init   {self.initial_loss:.4g}"
        if self.expected_initial_loss is not None:
            init += f"  (expected log {self.num_classes} = {self.expected_initial_loss:.4g} for a uniform guess)"
        lines.append(init)
        lines.append(f"  final loss     {self.final_loss:.4g}  (best {self.best_loss:.4g}, target {self.target:.4g})")
        reached = f"{self.steps_to_target}" if self.steps_to_target is not None else "not reached"
        lines.append(f"  steps to target {reached} (of {self.steps} run)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _is_classification(loss_fn: Any, out: Any, y: Any, flag: Optional[bool]) -> bool:
    if flag is not None:
        return flag
    if isinstance(loss_fn, _CLASSIFICATION_LOSSES) or loss_fn in (F.cross_entropy, F.nll_loss):
        return True
    return (isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and out.dim() >= 2
            and out.is_floating_point() and not y.is_floating_point() and y.dtype != torch.bool)


def _clone_optimizer(optimizer: Any, source: nn.Module, work: nn.Module, lr: Optional[float]):
    """An optimizer for ``work`` (a deep copy of ``source``): the caller's class and group
    hyperparameters on the copy's parameters, fresh state; or a factory's result; or Adam."""
    if optimizer is None:
        return torch.optim.Adam(work.parameters(), lr=1e-3 if lr is None else lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        mapping = {id(p): q for p, q in zip(source.parameters(), work.parameters())}
        groups = []
        for g in optimizer.param_groups:
            missing = [p for p in g["params"] if id(p) not in mapping]
            if missing:
                raise ValueError("the optimizer holds parameters that are not in the model")
            new = {k: v for k, v in g.items() if k not in ("params", "initial_lr")}
            new["params"] = [mapping[id(p)] for p in g["params"]]
            if lr is not None:
                new["lr"] = lr
            groups.append(new)
        try:
            return type(optimizer)(groups)
        except TypeError as e:
            raise TypeError(f"cannot re-create {type(optimizer).__name__} from its param groups ({e}): pass "
                            f"optimizer= as a factory, e.g. lambda params: MyOptimizer(params, lr=...)") from None
    if callable(optimizer):
        opt = optimizer(work.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned {type(opt).__name__}, not a torch optimizer")
        if lr is not None:
            for g in opt.param_groups:
                g["lr"] = lr
        return opt
    raise TypeError(f"optimizer must be None, a torch optimizer or a factory, got {type(optimizer).__name__}")


def overfit_check(model: nn.Module, batch: Any, loss_fn: Callable, steps: int = 500,
                  target: Optional[float] = None, *, optimizer: Any = None, lr: Optional[float] = None,
                  classification: Optional[bool] = None) -> OverfitReport:
    """Can ``model`` drive the loss on one ``batch`` to ``target``? The "overfit one batch" test.

    ``batch`` is ``(inputs, targets)``: the loss is ``loss_fn(model(inputs), targets)``. Training
    runs on a deep copy of the model with dropout and weight decay disabled
    (:func:`disable_regularization`), for at most ``steps`` updates, stopping when the loss is
    ``<= target`` (default: 1% of the loss at initialisation). ``optimizer``: None (Adam, ``lr``
    default 1e-3), the caller's optimizer (its class and param-group hyperparameters are reused on
    the copy, with fresh state; ``lr`` overrides), or a factory ``params -> optimizer``. The
    caller's model, optimizer and torch RNG state are unchanged afterwards.

    For classification (cross-entropy or NLL loss, or integer targets with ``(N, C, ...)``
    outputs; override with ``classification=``), the report carries the loss expected at
    initialisation, ``log C``, and a note when the initial loss is far from it. A model too small
    to fit, or a loss that becomes NaN/inf, gives a failing report, not an exception; errors in
    the model or loss themselves (a shape mismatch) propagate.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if target is not None and not (math.isfinite(target) and target >= 0):
        raise ValueError(f"target must be a finite non-negative loss value, got {target!r}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ValueError("batch must be a pair (inputs, targets)")
    work = copy.deepcopy(model)
    work.train()
    ref = next(work.parameters(), None)
    if ref is None:
        raise ValueError("the model has no parameters: nothing to train")
    device = ref.device
    x, y = to_device(batch[0], device), to_device(batch[1], device)
    cuda_devices = sorted({p.device.index or 0 for p in work.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        opt = _clone_optimizer(optimizer, model, work, lr)
        disable_regularization(work, opt)
        losses: list = []
        steps_to_target = None
        notes = []
        out = work(x)
        is_cls = _is_classification(loss_fn, out, y, classification)
        num_classes = int(out.shape[1]) if is_cls and isinstance(out, torch.Tensor) and out.dim() >= 2 else None
        expected = math.log(num_classes) if num_classes else None
        for step in range(steps + 1):
            if step > 0:
                out = work(x)
            loss = loss_fn(out, y)
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value):
                notes.append(f"the loss became {value} after {step} update(s): learning rate too high, or a bug "
                             f"(log of 0, division by 0) in the model or loss")
                break
            if step == 0 and target is None:
                target = 0.01 * value
            if value <= target:
                steps_to_target = step
                break
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finite = [v for v in losses if math.isfinite(v)]
    initial = losses[0]
    passed = steps_to_target is not None
    if expected is not None and math.isfinite(initial) and not (0.5 * expected <= initial <= 1.5 * expected):
        notes.append(f"the loss at init ({initial:.4g}) is far from log {num_classes} = {expected:.4g}: the output "
                     f"layer's initial scale may be off, or a softmax is applied before the loss")
    if not passed and not notes:
        notes.append(f"the loss did not reach {target:.4g} in {steps} steps: the model may be too small for "
                     f"the batch, the learning rate too low, or inputs and targets misaligned")
    return OverfitReport(passed=passed, initial_loss=initial, final_loss=losses[-1],
                         best_loss=min(finite) if finite else math.nan, target=float(target if target is not None
                                                                                      else math.nan),
                         steps=len(losses) - 1, steps_to_target=steps_to_target,
                         expected_initial_loss=expected, num_classes=num_classes, losses=losses, notes=notes)


# ----- interpolation mode --------------------------------------------------------------------------

def _param_dtype(model: nn.Module) -> torch.dtype:
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float32 if p is None else p.dtype


def _param_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def max_error(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 8192) -> float:
    """The largest absolute error ``|model(x) - y|`` over every element of the whole dataset, in
    eval mode without gradients, computed in the model's dtype (the model's mode is restored)."""
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs has {inputs.shape[0]} rows but targets has {targets.shape[0]}")
    if inputs.shape[0] == 0:
        raise ValueError("the dataset is empty")
    dtype, device = _param_dtype(model), _param_device(model)
    was_training = model.training
    model.eval()
    worst = torch.zeros((), dtype=dtype, device=device)
    try:
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                xb = inputs[start:start + batch_size].to(device=device, dtype=dtype)
                yb = targets[start:start + batch_size].to(device=device, dtype=dtype)
                out = model(xb)
                if out.shape != yb.shape:
                    raise ValueError(f"the model returns shape {tuple(out.shape)} for targets of shape {tuple(yb.shape)}")
                worst = torch.maximum(worst, (out - yb).abs().max())
    finally:
        model.train(was_training)
    return float(worst)


@dataclass
class InterpolationReport:
    """Outcome of :func:`interpolate`: the worst-case absolute error and the mean squared error
    over the whole dataset after training, and ``history`` of ``(step, max_error)``."""

    max_error: float
    mse: float
    steps: int
    dtype: torch.dtype
    history: list = field(default_factory=list)

    def __str__(self) -> str:
        return (f"interpolation: max error {self.max_error:.3e}, mse {self.mse:.3e} over the whole dataset "
                f"after {self.steps} steps ({self.dtype})")


def interpolate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, steps: int = 2000,
                lr: float = 1e-3, batch_size: Optional[int] = None, dtype: Optional[torch.dtype] = torch.float64,
                optimizer: Optional[torch.optim.Optimizer] = None, eval_every: Optional[int] = None,
                seed: int = 0) -> InterpolationReport:
    """Fit noise-free, complete data as exactly as possible (interpolation mode), in place.

    No regularisation (:func:`disable_regularization` on the model and the optimizer), no early
    stopping (all ``steps`` run), MSE loss, ``dtype`` for the model and data (float64 by default,
    None keeps the model's), full-batch unless ``batch_size`` (minibatches drawn with ``seed``).
    Default optimizer: FusedAdamW with ``lr``, no weight decay, cosine decay to 0 over ``steps``.
    Reports :func:`max_error` over the whole dataset every ``eval_every`` steps (default a tenth
    of the run) and at the end.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs has {inputs.shape[0]} rows but targets has {targets.shape[0]}")
    if inputs.shape[0] == 0:
        raise ValueError("the dataset is empty")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    if dtype is not None:
        model.to(dtype=dtype)
    dtype, device = _param_dtype(model), _param_device(model)
    x = inputs.to(device=device, dtype=dtype)
    y = targets.to(device=device, dtype=dtype)
    scheduler = None
    if optimizer is None:
        from .optim import FusedAdamW

        optimizer = FusedAdamW(model.parameters(), lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    disable_regularization(model, optimizer)
    every = eval_every or max(1, steps // 10)
    gen = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for step in range(1, steps + 1):
        if batch_size is None or batch_size >= x.shape[0]:
            xb, yb = x, y
        else:
            idx = torch.randint(0, x.shape[0], (batch_size,), generator=gen).to(device)
            xb, yb = x[idx], y[idx]
        loss = F.mse_loss(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if step % every == 0 or step == steps:
            history.append((step, max_error(model, x, y)))
    with torch.no_grad():
        model.eval()
        mse = float(sum(F.mse_loss(model(x[s:s + 8192]), y[s:s + 8192], reduction="sum")
                        for s in range(0, x.shape[0], 8192)) / y.numel())
        model.train()
    return InterpolationReport(max_error=history[-1][1], mse=mse, steps=steps, dtype=dtype, history=history)


# ----- distillation --------------------------------------------------------------------------------

def _class_last(logits: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` or ``(N, C, d1, ...)`` -> rows of C logits (class dimension 1, as cross_entropy)."""
    if logits.dim() < 2:
        raise ValueError(f"logits must have shape (N, C) or (N, C, ...), got {tuple(logits.shape)}")
    return logits.movedim(1, -1).reshape(-1, logits.shape[1])


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: Optional[torch.Tensor] = None, *, temperature: float = 4.0,
                      alpha: float = 0.5) -> torch.Tensor:
    """Hinton et al.'s knowledge-distillation loss::

        alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))  +  (1 - alpha) * CE(student, targets)

    The KL is averaged over examples (and positions, for ``(N, C, ...)`` logits, as
    ``cross_entropy`` averages). The ``T^2`` factor keeps the soft term's gradient scale independent
    of the temperature. Without ``targets`` only the soft term is used (``alpha`` is ignored). The
    teacher's logits are detached: no gradient reaches the teacher.
    """
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits have shape {tuple(student_logits.shape)} but teacher logits "
                         f"{tuple(teacher_logits.shape)}")
    s = _class_last(student_logits)
    t = _class_last(teacher_logits.detach()).to(s.dtype)
    T = float(temperature)
    soft = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(t / T, dim=1), reduction="batchmean",
                    log_target=True) * (T * T)
    if targets is None:
        return soft
    return alpha * soft + (1.0 - alpha) * F.cross_entropy(student_logits, targets)


class DistillationLoss(nn.Module):
    """:func:`distillation_loss` as a module: ``loss(student_logits, teacher_logits, targets=None)``."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.5) -> None:
        super().__init__()
        distillation_loss(torch.zeros(1, 2), torch.zeros(1, 2), temperature=temperature, alpha=alpha)  # validate
        self.temperature = temperature
        self.alpha = alpha

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                targets: Optional[torch.Tensor] = None) -> torch.Tensor:
        return distillation_loss(student_logits, teacher_logits, targets, temperature=self.temperature,
                                 alpha=self.alpha)


def distill(teacher: nn.Module, student: nn.Module, data: Iterable, optimizer: torch.optim.Optimizer, *,
            epochs: int = 1, temperature: float = 4.0, alpha: float = 0.5,
            device: Union[str, torch.device, None] = None) -> list:
    """Train ``student`` to match ``teacher`` on ``data``: each batch is ``(inputs, targets)``,
    ``(inputs,)`` or an input tensor (without targets the loss is the soft term only).

    The teacher runs in eval mode under ``torch.no_grad()``: its parameters get no gradients and
    its BatchNorm statistics do not change; its mode is restored afterwards. ``data`` must be
    re-iterable for ``epochs > 1``. Returns the mean loss of each epoch.
    """
    if teacher is student:
        raise ValueError("teacher and student are the same module")
    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    device = torch.device(device) if device is not None else _param_device(student)
    teacher_training = teacher.training
    teacher.eval()
    student.train()
    history = []
    try:
        for epoch in range(epochs):
            total, count = 0.0, 0
            for batch in data:
                if isinstance(batch, torch.Tensor):
                    x, y = batch, None
                elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
                    x, y = batch[0], (batch[1] if len(batch) == 2 else None)
                else:
                    raise ValueError("each batch must be (inputs, targets), (inputs,) or an input tensor")
                x = x.to(device)
                y = None if y is None else y.to(device)
                with torch.no_grad():
                    t = teacher(x)
                loss = distillation_loss(student(x), t, y, temperature=temperature, alpha=alpha)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                count += 1
            if count == 0:
                raise ValueError(f"data yielded no batch in epoch {epoch}")
            history.append(total / count)
    finally:
        teacher.train(teacher_training)
    return history
