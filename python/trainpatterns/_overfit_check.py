"""The one-batch overfit check: can the model drive the loss on one batch to near zero?

A model that cannot has a bug (or is too small). :func:`overfit_check` runs that test on a deep
copy and reports, never touching the caller's model, optimizer or RNG state, and never raising for
a poor fit, a diverging loss or a model with nothing to train. For classification it also checks
the loss at initialisation against ``log C``, the loss of a uniform guess: a loss far from it means
a mis-scaled output layer, which a fitted batch can hide.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._overfit_base import disable_regularization
from ._tree import to_device

_CLASSIFICATION_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


@dataclass
class OverfitReport:
    """Outcome of :func:`overfit_check`. Losses are the values ``loss_fn`` returned; ``losses[k]``
    is the loss before update k+1 (``losses[0]`` at initialisation). ``initial_loss_suspect`` is
    True when, for classification, the loss at initialisation is outside [0.5, 1.5] x ``log C``
    (a warning, shown by ``str(report)``, whether or not the batch was fitted). ``bool(report)``
    is ``report.passed``."""

    passed: bool
    initial_loss: float
    final_loss: float
    best_loss: float
    target: float
    steps: int  # updates made
    steps_to_target: Optional[int]  # updates needed to reach the target; None if never reached
    expected_initial_loss: Optional[float] = None  # log C for classification with C classes
    num_classes: Optional[int] = None
    initial_loss_suspect: bool = False
    losses: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.initial_loss_suspect:
            verdict += " (WARNING: the loss at init is far from log C, see the note)"
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
        return torch.optim.Adam([p for p in work.parameters() if p.requires_grad], lr=1e-3 if lr is None else lr)
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
    ``<= target``. Default target: 1% of the loss at initialisation, and for classification 1% of
    the smaller of that loss and ``log C`` (a mis-scaled model's inflated initial loss would
    otherwise make the target too easy). ``optimizer``: None (Adam, ``lr`` default 1e-3), the
    caller's optimizer (its class and param-group hyperparameters are reused on the copy, with
    fresh state; ``lr`` overrides), or a factory ``params -> optimizer``. The caller's model,
    optimizer and torch RNG state are unchanged afterwards.

    For classification (cross-entropy or NLL loss, or integer targets with ``(N, C, ...)``
    outputs; override with ``classification=``), the report carries the loss expected at
    initialisation, ``log C``, and flags (``initial_loss_suspect`` and a note) an initial loss far
    from it, even when the batch is fitted. A model too small to fit, a loss that becomes NaN/inf,
    or a model with no trainable parameter (or a loss that does not depend on one) gives a failing
    report, not an exception; errors in the model or loss themselves (a shape mismatch) propagate.
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
    x, y = batch if ref is None else (to_device(batch[0], ref.device), to_device(batch[1], ref.device))
    trainable = any(p.requires_grad for p in work.parameters())
    cuda_devices = sorted({p.device.index or 0 for p in work.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda_devices):
        opt = _clone_optimizer(optimizer, model, work, lr) if trainable else None
        disable_regularization(work, opt)
        losses: list = []
        steps_to_target = None
        notes = []
        out = work(x)
        is_cls = _is_classification(loss_fn, out, y, classification)
        num_classes = int(out.shape[1]) if is_cls and isinstance(out, torch.Tensor) and out.dim() >= 2 else None
        expected = math.log(num_classes) if num_classes and num_classes > 1 else None
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
                target = 0.01 * (min(value, expected) if expected is not None else value)
            if not trainable:
                notes.append("the model has no trainable parameters (none, or all with requires_grad=False): "
                             "there is nothing to fit; unfreeze some before checking")
                break
            if value <= target:
                steps_to_target = step
                break
            if step == steps:
                break
            if not loss.requires_grad:
                notes.append("the loss does not depend on any trainable parameter (a detach(), torch.no_grad() "
                             "or a non-tensor step in the model or the loss?): nothing to fit")
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finite = [v for v in losses if math.isfinite(v)]
    initial = losses[0]
    passed = steps_to_target is not None
    suspect = expected is not None and math.isfinite(initial) and not (0.5 * expected <= initial <= 1.5 * expected)
    if suspect:
        notes.append(f"the loss at init ({initial:.4g}) is far from log {num_classes} = {expected:.4g}: the output "
                     f"layer's initial scale may be off, or a softmax is applied before the loss")
    if not passed and not notes:
        notes.append(f"the loss did not reach {target:.4g} in {steps} steps: the model may be too small for "
                     f"the batch, the learning rate too low, or inputs and targets misaligned")
    return OverfitReport(passed=passed, initial_loss=initial, final_loss=losses[-1],
                         best_loss=min(finite) if finite else math.nan,
                         target=float(target if target is not None else math.nan), steps=len(losses) - 1,
                         steps_to_target=steps_to_target, expected_initial_loss=expected, num_classes=num_classes,
                         initial_loss_suspect=suspect, losses=losses, notes=notes)
