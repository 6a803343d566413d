"""Fused optimizers: FusedAdamW, FusedAdam, FusedSGD and FusedAdagrad.

Drop-in subclasses of ``torch.optim.Optimizer`` with torch's hyperparameters, defaults, param-group
behaviour and ``state_dict`` layout, whose step is one native pass over memory per tensor list
(csrc/optim). Optional in the same update pass: gradient unscaling for ``torch.amp.GradScaler`` (a
finite check skips the step), and clipping by the global gradient norm (``max_grad_norm``), where
the norm is computed once, by a read-only pre-pass over the gradients, and the clip factor is
applied inside the update.

This module holds what differs between the algorithms (hyperparameters, their checks, which state
tensors exist, which kernel runs) and ``SupportsStepSubset``, the protocol by which a data-parallel
wrapper steps them bucket by bucket. The shared machinery (state layout, cached pointer tables, the
step) is in _fused_optimizer.py; unscaling and clipping in _grad_control.py.

Invariants: parameters of one group share a device; parameters and gradients are dense and
contiguous; states have the parameter dtype, or float32 with ``master_weights=True``.
"""
from __future__ import annotations

from typing import Iterable, Optional, Protocol, runtime_checkable

import torch

from . import _kernels
from ._fused_optimizer import FusedOptimizer

__all__ = ["FusedAdamW", "FusedAdam", "FusedSGD", "FusedAdagrad", "SupportsStepSubset"]


@runtime_checkable
class SupportsStepSubset(Protocol):
    """An optimizer that can update part of its parameters at a time.

    ``SyncDataParallel(optimizer=...)`` needs it to step each gradient bucket as soon as that
    bucket's all-reduce completes, while later buckets are still in flight. The fused optimizers
    satisfy it; ``isinstance(opt, SupportsStepSubset)`` checks that the members exist.

    * ``param_groups``: torch's param groups; a parameter is stepped only if one of them holds it.
    * ``max_grad_norm``: None, or the global norm to clip to. Clipping needs every gradient before
      the first update, so a caller steps by subsets only when it is None.
    * ``step_subset(params)``: give ``params`` the update ``step()`` would give them, with their
      groups' current hyperparameters; every other parameter keeps its value and state, and a
      parameter without a gradient is skipped. Raises ValueError for a tensor that is not a
      parameter of the optimizer.
    """

    param_groups: list
    max_grad_norm: Optional[float]

    def step_subset(self, params: Iterable[torch.Tensor]) -> None: ...


def _check_common(lr, eps: Optional[float] = None, weight_decay: float = 0.0) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("a tensor lr must have one element")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if eps is not None and not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class _AdamBase(FusedOptimizer):
    _state_names = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def _decoupled(self, group: dict) -> bool:
        return True

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 max_grad_norm: Optional[float] = None, master_weights: bool = False) -> None:
        _check_common(lr, eps, weight_decay)
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, master_weights=master_weights)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    def _structure_key(self, group: dict) -> tuple:
        return (bool(group["amsgrad"]),)

    def _state_tensor_names(self, group: dict) -> tuple:
        return self._state_names if group["amsgrad"] else self._state_names[:2]

    def _kernel(self, table, group, control, threads):
        beta1, beta2 = group["betas"]
        _kernels.adam_step(table, control, lr=group["lr"], beta1=float(beta1), beta2=float(beta2),
                           eps=group["eps"], weight_decay=group["weight_decay"], decoupled=self._decoupled(group),
                           amsgrad=group["amsgrad"], maximize=group["maximize"], num_threads=threads)


class FusedAdamW(_AdamBase):
    """AdamW (decoupled weight decay) with a fused native step. Same arguments and defaults as
    ``torch.optim.AdamW`` (lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2), plus:

    * ``max_grad_norm``: clip by the global L2 norm of all gradients (as ``clip_grad_norm_``) inside
      the update; the norm of the last step is ``last_grad_norm``.
    * ``master_weights``: for float16/bfloat16 parameters keep an fp32 master copy
      (``state["master_param"]``) and fp32 states; the 16-bit parameter is rewritten in the same pass.
    """


class FusedAdam(_AdamBase):
    """Adam (L2 weight decay added to the gradient) with a fused native step. Same arguments and
    defaults as ``torch.optim.Adam`` (weight_decay=0), plus ``max_grad_norm`` and ``master_weights``
    as in :class:`FusedAdamW`. ``decoupled_weight_decay=True`` makes it AdamW, as in torch."""

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False, max_grad_norm: Optional[float] = None,
                 master_weights: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         max_grad_norm=max_grad_norm, master_weights=master_weights)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", decoupled_weight_decay)
        self.defaults["decoupled_weight_decay"] = decoupled_weight_decay

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", False)

    def _decoupled(self, group: dict) -> bool:
        return bool(group.get("decoupled_weight_decay", False))


class FusedSGD(FusedOptimizer):
    """SGD with momentum, dampening, Nesterov, weight decay and maximize, fused. Same arguments and
    defaults as ``torch.optim.SGD`` (lr=1e-3), plus ``max_grad_norm`` and ``master_weights``.
    ``state["momentum_buffer"]`` exists only when momentum is nonzero, as in torch."""

    _state_names = ("momentum_buffer",)
    _public_step = False

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, max_grad_norm: Optional[float] = None, master_weights: bool = False) -> None:
        _check_common(lr, None, weight_decay)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, master_weights=master_weights)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def _structure_key(self, group: dict) -> tuple:
        return (group["momentum"] != 0,)

    def _state_tensor_names(self, group: dict) -> tuple:
        return self._state_names if group["momentum"] != 0 else ()

    def _has_no_history(self, state: dict) -> bool:
        # torch starts the momentum buffer from the gradient when there is none yet.
        return state.get("momentum_buffer") is None

    def _kernel(self, table, group, control, threads):
        _kernels.sgd_step(table, control, lr=group["lr"], momentum=group["momentum"],
                          dampening=group["dampening"], weight_decay=group["weight_decay"],
                          nesterov=group["nesterov"], maximize=group["maximize"], num_threads=threads)


class FusedAdagrad(FusedOptimizer):
    """Adagrad with lr_decay, weight decay, initial_accumulator_value, eps and maximize, fused. Same
    arguments and defaults as ``torch.optim.Adagrad`` (lr=1e-2, eps=1e-10), plus ``max_grad_norm``
    and ``master_weights``."""

    _state_names = ("sum",)

    def __init__(self, params: Iterable, lr: float | torch.Tensor = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0, eps: float = 1e-10, *,
                 maximize: bool = False, max_grad_norm: Optional[float] = None, master_weights: bool = False) -> None:
        _check_common(lr, eps, weight_decay)
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, maximize=maximize)
        super().__init__(params, defaults, max_grad_norm=max_grad_norm, master_weights=master_weights)
        # torch creates Adagrad's state at construction, not at the first step.
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, group, self.state[p])

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def _fresh_state(self, p, name, group):
        return torch.full_like(p, group["initial_accumulator_value"], dtype=self._state_dtype(p),
                               memory_format=torch.contiguous_format)

    def _kernel(self, table, group, control, threads):
        _kernels.adagrad_step(table, control, lr=group["lr"], lr_decay=group["lr_decay"],
                              weight_decay=group["weight_decay"], eps=group["eps"],
                              maximize=group["maximize"], num_threads=threads)
