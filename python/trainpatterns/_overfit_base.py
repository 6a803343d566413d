"""What the overfitting modules share: switching regularisation off, where and in which dtype a
model's parameters live, and the whole-dataset error measures of interpolation mode.

The overfit check, interpolation mode, the L-BFGS finish and distillation each need some of these;
they live here so that those modules import one base and never each other in a circle.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


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


def param_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (float32 when it has none)."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return torch.float32 if p is None else p.dtype


def param_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU when it has none)."""
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def check_dataset(inputs: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise ValueError unless ``inputs`` and ``targets`` are non-empty with one row each per example."""
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"inputs has {inputs.shape[0]} rows but targets has {targets.shape[0]}")
    if inputs.shape[0] == 0 or targets.numel() == 0:
        raise ValueError("the dataset is empty")


def residual(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """``model(xb) - yb``, with a clear error when the output's shape is not the targets'."""
    out = model(xb)
    if out.shape != yb.shape:
        raise ValueError(f"the model returns shape {tuple(out.shape)} for targets of shape {tuple(yb.shape)}")
    return out - yb


def errors(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
           batch_size: int = 8192) -> tuple[float, float]:
    """``(max |model(x) - y|, mean (model(x) - y)^2)`` over every element of the dataset, in eval
    mode without gradients, in the model's dtype on its device (the model's mode is restored)."""
    check_dataset(inputs, targets)
    dtype, device = param_dtype(model), param_device(model)
    was_training = model.training
    model.eval()
    worst = torch.zeros((), dtype=dtype, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for start in range(0, inputs.shape[0], batch_size):
                xb = inputs[start:start + batch_size].to(device=device, dtype=dtype)
                yb = targets[start:start + batch_size].to(device=device, dtype=dtype)
                diff = residual(model, xb, yb)
                worst = torch.maximum(worst, diff.abs().max())
                total += diff.double().square().sum()
    finally:
        model.train(was_training)
    return float(worst), float(total) / targets.numel()


def max_error(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 8192) -> float:
    """The largest absolute error ``|model(x) - y|`` over every element of the whole dataset, in
    eval mode without gradients, computed in the model's dtype (the model's mode is restored)."""
    return errors(model, inputs, targets, batch_size=batch_size)[0]
