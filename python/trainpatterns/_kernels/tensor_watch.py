"""The optimizers' per-step check that their cached pointer tables are still valid
(csrc/common/tensor_watch.h), and how the native side reads tensor addresses for it.

Importing this module installs the address reader once; tests switch between the two readers
with :func:`set_address_reader`.
"""
from __future__ import annotations

import torch

from .. import _C

# What TensorWatch.check returns.
WATCH_UNCHANGED, WATCH_NEW_GRADS, WATCH_CHANGED = 0, 1, 2


def _torch_data_ptr_reader() -> int:
    """The address of the C function torch exports to read a tensor's data address from its Python
    object (what inductor's generated C code uses); 0 where this torch has none, and the native
    side then calls ``Tensor.data_ptr`` instead (same result, slower)."""
    guards = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
    addr = getattr(guards, "_torchinductor_pyobject_tensor_data_ptr", 0)
    return addr if isinstance(addr, int) else 0


def set_address_reader(torch_c_reader: bool = True) -> None:
    """Install how the native side reads tensor addresses: torch's exported C reader where this
    torch has one (``torch_c_reader``), else calls of ``Tensor.data_ptr`` (same result, slower)."""
    _C.set_data_ptr_reader(_torch_data_ptr_reader() if torch_c_reader else 0, torch.Tensor.data_ptr)


set_address_reader()


def data_ptrs(tensors: list) -> list:
    """``[t.data_ptr() for t in tensors]`` in one native loop; the tensors must be dense."""
    return _C.data_ptrs(tensors)


def tensor_watch(params: list, active: list, grads: list):
    """A native record of which of ``params`` have a gradient (positions ``active``, in table
    order, whose gradients are ``grads``) and of their addresses; ``check(params)`` then compares
    the live tensors with it in one pass and returns ``(status, picked)``: one of the ``WATCH_*``
    codes and, for ``WATCH_NEW_GRADS``, the active gradients in table order. Gradients are held by
    weak reference only."""
    return _C.TensorWatch(params, active, grads)
