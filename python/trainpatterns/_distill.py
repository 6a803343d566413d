"""Knowledge distillation: a small student learns the teacher's full output distribution.

The teacher's softened probabilities (a temperature above 1) carry more information per example
than the hard label, so the student learns from :func:`distillation_loss`, Hinton et al.'s mix of
the temperature-scaled KL divergence and the ordinary cross-entropy; :func:`distill` is the loop
that runs it with the teacher frozen in eval mode.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._overfit_base import param_device


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
    device = torch.device(device) if device is not None else param_device(student)
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
