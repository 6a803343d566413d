"""Gradient control of a fused optimizer step: unscaling, the inf/NaN check and global-norm clipping.

The update kernels take one "control" per step: a gradient multiplier (the loss-scale reciprocal
times the clip factor) and an optional device flag that makes them skip the step. This module
decides that control, apart from the optimizers' pointer tables and state layout, because it is
the one place that talks to ``torch.amp.GradScaler`` and the one that needs every gradient before
any update:

* Unscaling: ``GradScaler.step`` hands itself to optimizers whose class sets
  ``_step_supports_amp_scaling``; the gradients are then unscaled inside the update pass and the
  step is skipped when any is not finite, with ``found_inf_per_device`` recorded for the scaler's
  ``update()``. After ``scaler.unscale_(opt)`` only the recorded flags decide the skip.
* Clipping by the global L2 norm (``max_grad_norm``, as ``clip_grad_norm_``): the norm comes from
  one read-only pre-pass over the gradients; the clip factor is applied inside the update.
* On CUDA the norm, the skip flag and the multiplier stay on the device (no synchronisation); on
  the CPU they are Python floats.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.amp.grad_scaler import OptState

from . import _kernels

# GradScaler still hands itself to optimizers whose step() takes `grad_scaler`, which is what lets
# unscaling and the finite check happen inside our single pass; it warns about a future change on
# every such call. The message is specific to that handshake, so silencing it hides nothing else.
warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)

# The control of a step that neither unscales nor clips: the kernels only read it.
_UNIT = _kernels.grad_control(1.0)


@dataclass
class _Scaling:
    """What the loss scaler asks of this step."""

    state: Optional[dict]  # the scaler's per-optimizer state, when it passed itself to step()
    inv_scale: Optional[torch.Tensor]  # reciprocal of the loss scale; None: gradients are not scaled
    already_found: Optional[list]  # found_inf flags recorded by an earlier scaler.unscale_(opt)

    @property
    def records_found_inf(self) -> bool:
        """Whether this step unscales for a scaler that expects ``found_inf_per_device`` back."""
        return self.state is not None and self.inv_scale is not None


def _scaling(optimizer: torch.optim.Optimizer, grad_scaler: Any) -> _Scaling:
    scaling = _Scaling(None, None, None)
    if grad_scaler is not None and getattr(grad_scaler, "_enabled", True):
        scaling.state = grad_scaler._per_optimizer_states[id(optimizer)]
        if scaling.state["stage"] is OptState.UNSCALED:
            scaling.already_found = list(scaling.state["found_inf_per_device"].values())
        else:
            scaling.inv_scale = grad_scaler._get_scale_async().double().reciprocal().float()
    elif getattr(optimizer, "grad_scale", None) is not None or getattr(optimizer, "found_inf", None) is not None:
        # GradScaler's attribute protocol: it sets these on the optimizer and has checked the gradients.
        if getattr(optimizer, "grad_scale", None) is not None:
            scaling.inv_scale = optimizer.grad_scale.double().reciprocal().float()
        if getattr(optimizer, "found_inf", None) is not None:
            scaling.already_found = [optimizer.found_inf]
    return scaling


class GradControl:
    """Decides the control of each step of one optimizer and keeps the norm it measured.

    ``last_norm``: the global L2 norm of the unscaled gradients of the last step that computed one,
    as a 0-d float32 tensor on the parameters' device; None after a step that neither clipped nor
    unscaled.
    """

    def __init__(self) -> None:
        self.last_norm: Optional[torch.Tensor] = None

    def for_step(self, optimizer: torch.optim.Optimizer, tables: list, max_grad_norm: Optional[float],
                 grad_scaler: Any) -> Optional[Any]:
        """The control for a step over ``tables`` (the pointer tables it launches), or None when the
        step must be skipped. ``grad_scaler`` is what ``GradScaler.step`` passed (or None)."""
        scaling = _scaling(optimizer, grad_scaler)
        need_norm = max_grad_norm is not None or scaling.records_found_inf
        if not tables:
            if scaling.records_found_inf:
                device = grad_scaler._scale.device
                scaling.state["found_inf_per_device"] = {device: torch.zeros((), dtype=torch.float32, device=device)}
            return _kernels.grad_control(1.0)
        if not need_norm and scaling.inv_scale is None and not scaling.already_found:
            self.last_norm = None
            return _UNIT  # the usual step: nothing to unscale, check or clip, on any device
        devices = {t.device for t in tables}
        if devices == {torch.device("cpu")}:
            return self._on_cpu(tables, scaling, max_grad_norm, need_norm)
        if len(devices) > 1 or next(iter(devices)).type != "cuda":
            if need_norm or scaling.already_found:
                raise ValueError(
                    f"max_grad_norm and GradScaler need all parameters of the optimizer on one device, "
                    f"found {sorted(str(d) for d in devices)}")
            return _kernels.grad_control(1.0)
        return self._on_cuda(tables, next(iter(devices)), scaling, max_grad_norm, need_norm)

    def _on_cpu(self, tables: list, scaling: _Scaling, max_grad_norm: Optional[float], need_norm: bool):
        if scaling.already_found and any(float(f) != 0.0 for f in scaling.already_found):
            return None
        inv = 1.0 if scaling.inv_scale is None else float(scaling.inv_scale)
        if not need_norm:
            self.last_norm = None
            return _kernels.grad_control(inv)
        threads = torch.get_num_threads()
        norm = math.sqrt(sum(_kernels.grad_sumsq_cpu(t, threads) for t in tables)) * inv
        self.last_norm = torch.tensor(norm, dtype=torch.float32)
        if scaling.records_found_inf:
            found = 0.0 if math.isfinite(norm) else 1.0
            scaling.state["found_inf_per_device"] = {scaling.inv_scale.device: torch.tensor(found, dtype=torch.float32)}
            if found:
                return None
        clip = 1.0
        if max_grad_norm is not None:
            clip = max_grad_norm / (norm + 1e-6)
            if clip == clip:  # torch.clamp(max=1) keeps NaN, and so do we
                clip = min(clip, 1.0)
        return _kernels.grad_control(inv * clip)

    def _on_cuda(self, tables: list, device: torch.device, scaling: _Scaling, max_grad_norm: Optional[float],
                 need_norm: bool):
        skip = None
        if scaling.already_found:
            skip = torch.stack([f.to(device=device, dtype=torch.float32) for f in scaling.already_found]).sum()
        if not need_norm:
            self.last_norm = None
            if scaling.inv_scale is None:
                return _kernels.grad_control(1.0, skip_dev=skip)
            # Unscale without a norm pass (the scaler already checked): multiplier from the device.
            # (Tensors freed after the launch are safe: the caching allocator is stream-ordered.)
            grad_mul = scaling.inv_scale.to(device=device, dtype=torch.float32).reshape(())
            return _kernels.grad_control(1.0, grad_mul_dev=grad_mul, skip_dev=skip)
        sumsq = torch.zeros((), dtype=torch.float64, device=device)
        for t in tables:
            _kernels.grad_sumsq_cuda(t, sumsq)
        norm = torch.empty((), dtype=torch.float32, device=device)
        if skip is None:
            skip = torch.zeros((), dtype=torch.float32, device=device)
        grad_mul = torch.empty((), dtype=torch.float32, device=device)
        inv_dev = (None if scaling.inv_scale is None
                   else scaling.inv_scale.to(device=device, dtype=torch.float32).reshape(()))
        _kernels.finish_grad_control_cuda(sumsq, inv_dev, max_grad_norm or 0.0, norm, skip, grad_mul)
        self.last_norm = norm
        if scaling.records_found_inf:
            scaling.state["found_inf_per_device"] = {device: skip}
            return _kernels.grad_control(1.0, grad_mul_dev=grad_mul, skip_dev=skip)
        # No scaler: like clip_grad_norm_ + step, a non-finite norm is not a reason to skip.
        return _kernels.grad_control(1.0, grad_mul_dev=grad_mul, skip_dev=skip if scaling.already_found else None)
