"""The optimizers' per-step check that their cached pointer tables are still valid
(csrc/common/tensor_watch.h), and how the native side reads tensor metadata for it.

The native reader calls the C functions torch exports for code built without its headers
(AOTInductor's shim: ``aoti_torch_get_numel``, ``aoti_torch_get_storage_size``, ...), found here
with ctypes; the native side locates a tensor's ``at::Tensor`` in its Python object with handles
``torch._C._aoti`` makes for a few sample tensors, and uses the functions only once they agree with
:func:`tensor_facts` on every sample. Where torch lacks any of it, :func:`tensor_facts` itself
answers (the same values, slower). Importing this module installs the reader; tests switch between
the two with :func:`set_tensor_reader`.
"""
from __future__ import annotations

import ctypes
import glob
import os
from typing import Optional

import numpy as np
import torch

from .. import _C
from ._checks import storage_holds

# What TensorWatch.check returns.
WATCH_UNCHANGED, WATCH_NEW_GRADS, WATCH_CHANGED = 0, 1, 2

# torch's ScalarType and DeviceType codes, what the aoti_torch_* functions report (fixed by the
# AOTInductor ABI); the Python reader gives the same numbers.
_SCALAR_TYPE = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4, torch.float16: 5,
                torch.float32: 6, torch.float64: 7, torch.complex64: 9, torch.complex128: 10, torch.bool: 11,
                torch.bfloat16: 15}
_DEVICE_TYPE = {"cpu": 0, "cuda": 1}
# name the native side knows -> exported symbol
_AOTI = {name: f"aoti_torch_get_{name}" for name in (
    "data_ptr", "numel", "storage_size", "storage_offset", "dtype", "dim", "sizes", "strides", "device_type",
    "device_index")}
_AOTI.update(is_contiguous="aoti_torch_is_contiguous", delete_tensor_object="aoti_torch_delete_tensor_object")
_TENSOR_BASE = getattr(torch._C, "TensorBase", None) or torch._C._TensorBase


def tensor_facts(t: torch.Tensor) -> tuple:
    """(data address, numel, ScalarType code, contiguous, storage holds it, DeviceType code, device
    index, lazy view): what the native reader reads of a tensor, computed in Python."""
    return (t.data_ptr(), t.numel(), _SCALAR_TYPE.get(t.dtype, -1), t.is_contiguous(), storage_holds(t),
            _DEVICE_TYPE.get(t.device.type, -2), t.get_device(), t.is_neg() or t.is_conj())


def _aoti_functions() -> dict:
    """Addresses of the aoti_torch_* functions this torch exports, looked up through torch._C
    (whose dependencies hold them where symbols are searched that way) and then torch's own CPU
    library; empty when neither can be opened."""
    libs = []
    for path in (torch._C.__file__, *sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                                                     "*torch_cpu.*")))):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            pass
    found = {}
    for name, symbol in _AOTI.items():
        fn = next((f for f in (getattr(lib, symbol, None) for lib in libs) if f is not None), None)
        if fn is not None:
            found[name] = ctypes.cast(fn, ctypes.c_void_p).value
    return found


def _samples() -> list:
    """Tensors of every kind a table holds or refuses: plain, parameter, view with an offset,
    transposed, lazy negated, 0-d, empty, 16-bit, numpy-backed, and a parameter's gradient."""
    base = torch.arange(12, dtype=torch.float32)
    p = torch.nn.Parameter(torch.ones(3, 4))
    p.grad = torch.full((3, 4), 2.0)
    return [base, base[5:], base.view(3, 4).t(), torch._neg_view(base), p, p.grad, torch.zeros((), dtype=torch.float64),
            torch.empty(0), torch.zeros(5, dtype=torch.bfloat16), torch.from_numpy(np.zeros(4, np.int64))]


def set_tensor_reader(native: bool = True) -> bool:
    """Install how the native side reads tensors: torch's exported C functions where they are found
    and verified (``native``), else :func:`tensor_facts`. Returns whether the C functions are used."""
    functions, samples, handles = {}, [], []
    alloc = getattr(getattr(torch._C, "_aoti", None), "unsafe_alloc_void_ptrs_from_tensors", None)
    if native and alloc is not None:
        functions = _aoti_functions()
        if "delete_tensor_object" in functions:  # the handles below are freed with it
            samples = _samples()
            handles = list(alloc(samples))
    return _C.set_tensor_reader(functions, samples, handles, _TENSOR_BASE, tensor_facts, torch.Tensor.is_neg)


set_tensor_reader()


def read_tensor(t: object) -> Optional[tuple]:
    """What the installed native reader reads of ``t``, in :func:`tensor_facts`' layout; None when it
    cannot read it (not a tensor, no accessible storage)."""
    return _C.read_tensor(t)


def data_ptrs(tensors: list) -> list:
    """``[t.data_ptr() for t in tensors]`` in one native loop; TypeError for a non-tensor."""
    return _C.data_ptrs(tensors)


def tensor_watch(params: list, active: list, grads: list):
    """A native record of which of ``params`` have a gradient (positions ``active``, in table
    order, whose gradients are ``grads``) and of what the tables hold of them; ``check(params)``
    compares the live tensors with it in one pass and returns ``(status, picked, addrs)``: one of
    the ``WATCH_*`` codes and, for ``WATCH_NEW_GRADS``, the active gradients in table order and
    their addresses (None when one of them does not fit its slot). Gradients are held by weak
    reference only."""
    return _C.TensorWatch(params, active, grads)
