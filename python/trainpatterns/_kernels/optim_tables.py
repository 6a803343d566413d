"""The fused optimizers' side of the boundary: pointer tables of tensor lists and the calls of the
optimizer, gradient-control and gradient-norm kernels (csrc/optim).

A :class:`KernelTable` holds the addresses of one homogeneous tensor list in the int64 layout of
csrc/common/params.h; the step functions turn hyperparameters into the kernels' params structs and
launch on the tensors' device (the current stream on CUDA). These run once per table per step, so
they do no per-tensor Python work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .. import _C
from ._native import (DTYPE_TAGS, N_ROWS, ROW_GRAD, ROW_MASTER, ROW_NUMEL, ROW_PARAM, ROW_PREFIX, ROW_STATE0,
                      ROW_STATE1, ROW_STATE2, address, device_rows, launch_args)


@dataclass
class KernelTable:
    """A pointer table for one homogeneous tensor list (one device, one dtype, master or not).

    Invariants: every tensor is contiguous and lives on ``device``; grads match their params in
    dtype and shape; ``steps`` is a float32 tensor of ``n`` entries on ``device`` that the kernels
    increment. The table keeps references to everything it points to except the gradients, which
    the optimizer's TensorWatch revalidates (address, size, dtype, device, bounds) before every
    launch, rewriting the gradient row of ``host_rows`` in place when backward made new gradient
    tensors.
    """

    device: torch.device
    dtype: torch.dtype
    master: bool
    tensors: list  # [params, [], state0, state1, state2, masters]: what the addresses point to
    steps: torch.Tensor
    host_rows: torch.Tensor  # int64 [N_ROWS, n], CPU
    rows: torch.Tensor  # host_rows itself on CPU, a device copy on CUDA
    native: object = field(repr=False)

    @property
    def n(self) -> int:
        return self.host_rows.shape[1]

    def upload_rows(self) -> None:
        """After the host rows changed (TensorWatch.refresh rewrote gradient addresses): make the
        kernels see them. A CPU table reads its host rows directly; a CUDA table gets a new copy."""
        if self.device.type == "cuda":
            self._upload()

    def _upload(self) -> None:
        self.rows = device_rows(self.host_rows, self.device)
        self.native = _native_table(self.rows, self.host_rows, self.steps, self.dtype, self.master)


def _native_table(rows, host_rows, steps, dtype, master):
    n = host_rows.shape[1]
    total = int(host_rows[ROW_NUMEL].sum()) if n else 0
    return _C.TensorTable(
        rows=rows.data_ptr(), host_rows=host_rows.data_ptr(), n=n, total=total,
        steps=steps.data_ptr(), dtype=DTYPE_TAGS[dtype], master=master,
    )


def make_table(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[Sequence[Optional[torch.Tensor]]],
    masters: Sequence[Optional[torch.Tensor]],
    steps: torch.Tensor,
    master: bool,
) -> KernelTable:
    """Build the pointer table of one tensor list. ``states`` holds up to three per-tensor lists
    (missing rows or None entries become null addresses). Params and grads are already checked."""
    n = len(params)
    device = params[0].device
    dtype = params[0].dtype
    if steps.dtype != torch.float32 or steps.device != device or steps.numel() != n:
        raise ValueError("internal: steps must be float32 with one entry per tensor on the params' device")
    host = np.zeros((N_ROWS, n), dtype=np.int64)
    host[ROW_NUMEL] = [p.numel() for p in params]
    host[ROW_PARAM] = [p.data_ptr() for p in params]
    host[ROW_GRAD] = [g.data_ptr() for g in grads]
    state_lists = list(states) + [[None] * n] * (3 - len(states))
    for row, lst in zip((ROW_STATE0, ROW_STATE1, ROW_STATE2), state_lists):
        host[row] = [address(s) for s in lst]
    host[ROW_MASTER] = [address(m) for m in masters]
    if n:
        host[ROW_PREFIX, 1:] = np.cumsum(host[ROW_NUMEL])[:-1]
    host_rows = torch.from_numpy(host)
    # Gradients are not held: the optimizer checks before every launch that the gradients it was
    # given are alive at these addresses, so holding them would only keep freed grads in memory.
    tensors = [list(params), [], *[list(s) for s in state_lists], list(masters)]
    table = KernelTable(device, dtype, master, tensors, steps, host_rows, host_rows, None)
    if device.type == "cuda":
        table._upload()
    else:
        table.native = _native_table(host_rows, host_rows, steps, dtype, master)
    return table


def grad_control(grad_mul: float = 1.0, grad_mul_dev: Optional[torch.Tensor] = None,
                 skip_dev: Optional[torch.Tensor] = None):
    """Gradient multiplier (loss-scale reciprocal times clip factor) and optional device skip flag."""
    return _C.GradControl(grad_mul=grad_mul, grad_mul_dev=address(grad_mul_dev), skip_dev=address(skip_dev))


def _lr_args(lr) -> dict:
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cuda":
            if lr.dtype != torch.float32 or lr.numel() != 1:
                raise TypeError("a learning rate tensor on CUDA must be a float32 scalar")
            return {"lr": 0.0, "lr_dev": lr.data_ptr()}
        return {"lr": float(lr)}
    return {"lr": float(lr)}


def adam_step(table: KernelTable, control, *, lr, beta1: float, beta2: float, eps: float,
              weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool, num_threads: int) -> None:
    hp = _C.AdamParams(**_lr_args(lr), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
    dev, stream = launch_args(table.device)
    _C.adam_step(table.native, hp, control, num_threads, dev, stream)


def sgd_step(table: KernelTable, control, *, lr, momentum: float, dampening: float,
             weight_decay: float, nesterov: bool, maximize: bool, num_threads: int) -> None:
    hp = _C.SgdParams(**_lr_args(lr), momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=nesterov, maximize=maximize)
    dev, stream = launch_args(table.device)
    _C.sgd_step(table.native, hp, control, num_threads, dev, stream)


def adagrad_step(table: KernelTable, control, *, lr, lr_decay: float, weight_decay: float, eps: float,
                 maximize: bool, num_threads: int) -> None:
    hp = _C.AdagradParams(**_lr_args(lr), lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                          maximize=maximize)
    dev, stream = launch_args(table.device)
    _C.adagrad_step(table.native, hp, control, num_threads, dev, stream)


def prepared_adam_step(tables: Sequence[KernelTable], control, *, lr, beta1: float, beta2: float, eps: float,
                       weight_decay: float, decoupled: bool, amsgrad: bool, maximize: bool,
                       num_threads: int) -> Callable[[], None]:
    """A callable that runs the native Adam step over ``tables`` and nothing else: the params
    struct, launch arguments (the current streams, on CUDA) and tables are fixed when it is made.
    For benchmarks, where it measures the kernels without the optimizer's per-step Python work."""
    hp = _C.AdamParams(**_lr_args(lr), beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                       decoupled=decoupled, amsgrad=amsgrad, maximize=maximize)
    launches = [(t.native, *launch_args(t.device)) for t in tables]
    step = _C.adam_step

    def run() -> None:
        for native, dev, stream in launches:
            step(native, hp, control, num_threads, dev, stream)

    return run


def grad_sumsq_cpu(table: KernelTable, num_threads: int) -> float:
    """Sum of squares of the table's gradients (double precision); not finite iff a grad is not."""
    return _C.grad_sumsq(table.native, num_threads)


def grad_sumsq_cuda(table: KernelTable, sumsq: torch.Tensor) -> None:
    """Adds the table's gradient sum of squares to ``sumsq`` (float64 scalar on the device), async."""
    dev, stream = launch_args(table.device)
    _C.grad_sumsq_cuda(table.native, sumsq.data_ptr(), dev, stream)


def finish_grad_control_cuda(sumsq: torch.Tensor, inv_scale: Optional[torch.Tensor], max_norm: float,
                             norm: torch.Tensor, skip: torch.Tensor, grad_mul: torch.Tensor) -> None:
    """On the device: norm = sqrt(sumsq) * inv_scale, skip |= !finite(norm), grad_mul = inv_scale *
    clip factor (max_norm <= 0: no clipping; inv_scale None: 1). No host synchronisation."""
    dev, stream = launch_args(sumsq.device)
    params = _C.FinishGradParams(sumsq=sumsq.data_ptr(), inv_scale=address(inv_scale), max_norm=max_norm,
                                 norm=norm.data_ptr(), skip=skip.data_ptr(), grad_mul=grad_mul.data_ptr())
    _C.finish_grad_control(params, dev, stream)
