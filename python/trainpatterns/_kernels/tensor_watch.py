"""The optimizers' per-step check that their cached pointer tables are still valid
(csrc/common/tensor_watch.h), and how the native side reads tensor metadata for it.

The native reader calls the C functions torch exports for code built without its headers
(AOTInductor's shim: ``aoti_torch_get_numel``, ``aoti_torch_get_storage_size``, ...), found here
with ctypes; the native side locates a tensor's ``at::Tensor`` in its Python object with handles
``torch._C._aoti`` makes for a few sample tensors, and the dispatch key set in its TensorImpl with
the raw values ``torch._C._dispatch_keys`` reports for them (the lazy-view bits, which no C function
returns), and uses them only once they agree with :func:`tensor_facts` on every sample. Where torch
lacks any of it, :func:`tensor_facts` (or ``Tensor.is_neg``, for the lazy-view bits) answers (the
same values, slower). Importing this module installs the reader; tests switch between the ways
of reading with :func:`set_tensor_reader`.
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

# What TensorWatch.refresh returns: the tables are valid as they are; new gradient addresses were
# written into the tables' host rows (device copies must be uploaded); changed, nothing written.
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
    transposed, lazy negated (two), 0-d, empty, 16-bit, numpy-backed, and a parameter's gradient."""
    base = torch.arange(12, dtype=torch.float32)
    p = torch.nn.Parameter(torch.ones(3, 4))
    p.grad = torch.full((3, 4), 2.0)
    return [base, base[5:], base.view(3, 4).t(), torch._neg_view(base), p, p.grad, torch.zeros((), dtype=torch.float64),
            torch.empty(0), torch._neg_view(p.grad), torch.zeros(5, dtype=torch.bfloat16),
            torch.from_numpy(np.zeros(4, np.int64))]


def _key_sets(samples: list) -> tuple[list, int]:
    """The raw dispatch key set of each sample and the bits of its lazy-view keys (Negative,
    Conjugate); None and 0 where this torch does not report them."""
    try:
        keys = [torch._C._dispatch_keys(t).raw_repr() for t in samples]
        lazy = 0
        for key in (torch._C.DispatchKey.Negative, torch._C.DispatchKey.Conjugate):
            lazy |= torch._C.DispatchKeySet(key).raw_repr()
        return keys, lazy
    except (AttributeError, RuntimeError, TypeError):
        return [None] * len(samples), 0


def set_tensor_reader(native: bool = True, key_bits: bool = True) -> bool:
    """Install how the native side reads tensors: torch's exported C functions where they are found
    and verified (``native``), else :func:`tensor_facts`; the lazy-view bits from the dispatch key
    set where it is found and verified (``key_bits``), else through ``Tensor.is_neg``. Returns
    whether the C functions are used (``build_info()["lazy_view_reader"]`` says how the bits are
    read)."""
    functions, samples, handles = {}, [], []
    alloc = getattr(getattr(torch._C, "_aoti", None), "unsafe_alloc_void_ptrs_from_tensors", None)
    if native and alloc is not None:
        functions = _aoti_functions()
        if "delete_tensor_object" in functions:  # the handles below are freed with it
            samples = _samples()
            handles = list(alloc(samples))
    key_sets, lazy_keys = _key_sets(samples) if key_bits else ([None] * len(samples), 0)
    return _C.set_tensor_reader(functions, samples, handles, _TENSOR_BASE, tensor_facts, torch.Tensor.is_neg,
                                key_sets, lazy_keys)


set_tensor_reader()


def read_tensor(t: object) -> Optional[tuple]:
    """What the installed native reader reads of ``t``, in :func:`tensor_facts`' layout; None when it
    cannot read it (not a tensor, no accessible storage)."""
    return _C.read_tensor(t)


def data_ptrs(tensors: list) -> list:
    """``[t.data_ptr() for t in tensors]`` in one native loop; TypeError for a non-tensor."""
    return _C.data_ptrs(tensors)


def tensor_watch(params: list, active: list, grads: list, rows: list):
    """A native record of which of ``params`` have a gradient (positions ``active``, in table
    order, whose gradients are ``grads``) and of what the tables hold of them; ``rows`` are the
    tables' host rows (int64 CPU tensors, csrc/common/params.h), in table order. ``refresh(params,
    grads=None)`` compares the live tensors with it in one pass and, when only the gradient tensors
    changed and each new one fits its slot, writes their addresses into the tables' gradient row;
    it returns one of the ``WATCH_*`` codes. Gradients are not held: each is judged by what it is
    (address, size, dtype, device, bounds, lazy view), whichever object it is."""
    return _C.TensorWatch(params, active, grads, rows)
