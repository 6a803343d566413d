"""The checks a tensor passes before its address reaches a kernel, with errors that name it.

One message for an unsupported dtype and one check for dense, contiguous, eagerly evaluated memory
that its storage really holds serve every kernel family (optimizers, gradient buckets, the
loader); the optimizer's parameter and gradient checks are built from them. A bad tensor is an
exception here, never a crash in native code.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ._native import DTYPE_TAGS, SUPPORTED_PARAM_DTYPES, cuda_compiled


def unsupported_dtype(who: str, dtype: object, supported: Iterable = SUPPORTED_PARAM_DTYPES, *,
                      by: str = "", note: str = "") -> TypeError:
    """The error for ``who`` having a dtype (torch or numpy) outside ``supported``; ``by`` names the
    kernels that refuse it, ``note`` is appended to the list of supported dtypes."""
    names = ", ".join(str(d).replace("torch.", "") for d in supported)
    return TypeError(f"{who}: dtype {dtype} is not supported{' by ' + by if by else ''} "
                     f"(supported: {names}{note})")


def check_dense(t: torch.Tensor, name: str, need: str, *, role: str = "", what: str = "storage") -> None:
    """Raise a clear error unless ``t`` is a strided (not sparse), contiguous tensor whose memory
    holds its values (not a lazy negated/conjugated view) and whose storage holds all of it. The
    message names ``t`` as ``role name`` (e.g. "parameter 'fc.weight'"), says why the caller needs
    contiguous memory (``need``) and what is not contiguous (``what``); it is only built when a
    check fails."""
    if t.layout is not torch.strided:
        raise TypeError(f"{_who(role, name)}: layout {t.layout} is not supported (dense tensors only)")
    if not t.is_contiguous():
        raise ValueError(f"{_who(role, name)}: {what} is not contiguous (strides {tuple(t.stride())} for "
                         f"shape {tuple(t.shape)}); {need}")
    if t.is_neg() or t.is_conj():
        kind = "negated" if t.is_neg() else "conjugated"
        raise ValueError(f"{_who(role, name)}: is a lazy {kind} view, whose memory does not hold its values; "
                         f"call .resolve_neg() / .resolve_conj() first")
    check_storage(t, _who(role, name))


def storage_holds(t: torch.Tensor) -> bool:
    """Whether the storage of a contiguous tensor holds its storage offset plus its elements (False
    for a tensor without accessible storage)."""
    n = t.numel()
    if n == 0:
        return True
    try:
        nbytes = t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return (t.storage_offset() + n) * t.element_size() <= nbytes


def check_storage(t: torch.Tensor, who: str) -> None:
    """Raise a clear error unless ``t``'s storage holds it (see :func:`storage_holds`): a storage
    resized under a tensor (``untyped_storage().resize_()``) leaves the tensor claiming memory that
    is gone."""
    if storage_holds(t):
        return
    try:
        have = f"{t.untyped_storage().nbytes()} bytes"
    except (RuntimeError, NotImplementedError, TypeError):
        raise TypeError(f"{who}: has no accessible storage (a tensor subclass or a fake tensor?); the "
                        f"kernels need plain tensors") from None
    raise ValueError(f"{who}: its storage holds {have} but the tensor needs "
                     f"{(t.storage_offset() + t.numel()) * t.element_size()} (storage offset "
                     f"{t.storage_offset()} + {t.numel()} elements of {t.element_size()} bytes): was the "
                     f"storage resized (untyped_storage().resize_())?")


def _who(role: str, name: str) -> str:
    return f"{role} {name}" if role else name


_PARAM_NEED = "the fused kernels need contiguous parameters, call .contiguous() before creating the optimizer"


def check_param(p: torch.Tensor, name: str) -> None:
    """Raise a clear error if a parameter cannot be updated by a fused kernel."""
    if p.dtype not in DTYPE_TAGS:
        raise unsupported_dtype(f"parameter {name}", p.dtype, by="the fused optimizers")
    check_dense(p, name, _PARAM_NEED, role="parameter")
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"parameter {name}: device {p.device} is not supported (cpu or cuda)")
    if p.device.type == "cuda" and not cuda_compiled():
        raise RuntimeError(
            f"parameter {name} is on {p.device} but trainpatterns was built without CUDA kernels "
            f"(nvcc was not found at build time); reinstall with nvcc on PATH"
        )


def check_grad(g: torch.Tensor, p: torch.Tensor, name: str) -> None:
    """Raise a clear error if a gradient does not match its parameter."""
    if g.is_sparse or g.layout is not torch.strided:
        raise RuntimeError(
            f"parameter {name}: sparse gradients are not supported by the fused optimizers "
            f"(use torch.optim.SparseAdam or a dense embedding)"
        )
    if g.dtype != p.dtype:
        raise TypeError(f"parameter {name}: gradient dtype {g.dtype} does not match parameter dtype {p.dtype}")
    if g.shape != p.shape:
        raise ValueError(f"parameter {name}: gradient shape {tuple(g.shape)} does not match parameter shape "
                         f"{tuple(p.shape)}")
    if g.device != p.device:
        raise ValueError(f"parameter {name}: gradient is on {g.device} but the parameter is on {p.device}")
    check_dense(g, name, "the fused kernels need contiguous gradients", role="gradient of parameter",
                what="gradient storage")
