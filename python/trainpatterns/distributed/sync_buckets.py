"""The gradient buckets of SyncDataParallel: which parameters share one, and each one's buffer layout.

Every rank must all-reduce the same buckets in the same order, so the split depends only on the
model (parameter order, dtypes, sizes) and the caps: reverse registration order (the order backward
produces gradients), a new bucket at each dtype change or once the current one reaches its cap (the
first cap smaller, as in DDP, so communication starts early in backward).

A bucket's flat buffer holds one slot per parameter, then one "has a gradient" flag per parameter,
all in the parameter dtype, so the flags are scaled and summed with the gradients in the same
all-reduce. The pointer tables of the native pack/unpack kernels are built here once.

The caps come from SyncDataParallel's arguments or from DDP's names for them (``bucket_caps``);
the other arguments of torch's DDP are mapped here too: ``ddp_device`` checks ``device_ids`` and
``output_device``, and ``check_ddp_options`` accepts the rest where they mean what SyncDataParallel
does anyway and refuses them, with the reason, where they do not.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from .. import _kernels

# ``compress`` argument -> the dtype on the wire (None: the gradient dtype).
WIRE_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 1024 * 1024
# Slots start on multiples of this many elements (64 bytes of float32), so the kernels' vector loads
# line up; the gaps stay zero and cost nothing in the sum.
_SLOT_ALIGN = 16


def _align(n: int) -> int:
    return (n + _SLOT_ALIGN - 1) // _SLOT_ALIGN * _SLOT_ALIGN


@dataclass
class GradBucket:
    """One all-reduce unit: parameters of one dtype, their slots in a flat buffer, a flag per
    parameter after the slots. ``wire`` is what is all-reduced: ``flat`` itself, or a 16-bit copy.
    The fields from ``ready`` on are the state of the current backward."""

    index: int
    params: list
    names: list
    flat: torch.Tensor  # parameter dtype: [slots | flags]; grads are views into the slots
    wire: torch.Tensor  # flat, or a bfloat16/float16 buffer of the same length
    views: list  # per parameter, its slot viewed with the parameter's shape
    flags: torch.Tensor  # view of flat's tail: 1 where this rank had a gradient (scaled with the rest)
    pack_table: _kernels.BucketTable  # params' gradients (or absent) + the flags -> wire
    unpack_table: Optional[_kernels.BucketTable]  # wire -> flat (compression only)
    ready: list = field(default_factory=list)
    n_ready: int = 0
    had_grad: list = field(default_factory=list)  # per parameter, for this round
    work: Optional[object] = None


def make_buckets(trainable: list, first_cap_bytes: int, cap_bytes: int,
                 wire_dtype: Optional[torch.dtype]) -> list:
    """The buckets of ``trainable`` ((name, parameter) pairs in registration order), in all-reduce
    order: the same on every rank that wraps the same model. ``wire_dtype``: None, or the 16-bit
    dtype that buckets of other dtypes are cast to for the wire."""
    groups: list = []
    size, full = 0, False
    for name, p in reversed(trainable):
        # As DDP: a bucket closes once it reaches its cap (the parameter that crosses it stays in).
        if not groups or full or groups[-1][0][1].dtype != p.dtype:
            groups.append([])
            size, full = 0, False
        groups[-1].append((name, p))
        size += p.numel() * p.element_size()
        full = size >= (first_cap_bytes if len(groups) == 1 else cap_bytes)
    return [_make_bucket(i, g, wire_dtype) for i, g in enumerate(groups)]


def _make_bucket(index: int, members: list, wire_dtype: Optional[torch.dtype]) -> GradBucket:
    names = [n for n, _ in members]
    params = [p for _, p in members]
    offsets, off = [], 0
    for p in params:
        offsets.append(off)
        off = _align(off + p.numel())
    flag_off = off
    n = len(params)
    dtype, device = params[0].dtype, params[0].device
    flat = torch.zeros(flag_off + n, dtype=dtype, device=device)
    on_wire = wire_dtype or dtype
    wire = flat if on_wire == dtype else torch.zeros(flat.numel(), dtype=on_wire, device=device)
    views = [flat[o:o + p.numel()].view(p.shape) for o, p in zip(offsets, params)]
    flags = flat[flag_off:]
    numels = [p.numel() for p in params] + [n]
    pack_table = _kernels.make_bucket_table(numels, offsets + [flag_off], dtype, device)
    unpack_table = None
    if wire is not flat:
        unpack_table = _kernels.make_bucket_table([flat.numel()], [0], dtype, device, [flat])
    return GradBucket(index, params, names, flat, wire, views, flags, pack_table, unpack_table,
                      [False] * n, 0, [False] * n)


def chunks(tensors: list, cap_bytes: int) -> Iterator[list]:
    """``tensors`` in consecutive groups of at most ``cap_bytes`` (a larger tensor alone)."""
    chunk, size = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if chunk and size + nbytes > cap_bytes:
            yield chunk
            chunk, size = [], 0
        chunk.append(t)
        size += nbytes
    if chunk:
        yield chunk


# ----- DDP's argument names ---------------------------------------------------------------------

def bucket_caps(bucket_mb: Optional[float], first_bucket_mb: Optional[float],
                bucket_cap_mb: Optional[float]) -> tuple[float, float]:
    """(first bucket's cap, the others' cap) in MiB. ``bucket_cap_mb`` is DDP's name for
    ``bucket_mb``; DDP given it caps its first bucket there too, so ``first_bucket_mb`` then defaults
    to it, else to 1 MiB (DDP's default first bucket). The first cap never exceeds the others'."""
    if bucket_cap_mb is not None and bucket_mb is not None and bucket_cap_mb != bucket_mb:
        raise ValueError(f"bucket_mb={bucket_mb!r} and bucket_cap_mb={bucket_cap_mb!r} name one setting (ours and "
                         "DDP's): give one")
    cap = bucket_mb if bucket_mb is not None else bucket_cap_mb if bucket_cap_mb is not None else 25.0
    first = first_bucket_mb if first_bucket_mb is not None else bucket_cap_mb if bucket_cap_mb is not None else 1.0
    for name, v in (("bucket_mb", cap), ("first_bucket_mb", first)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise ValueError(f"{name} (or bucket_cap_mb) must be a number of MiB > 0, got {v!r}")
    return float(min(first, cap)), float(cap)


def ddp_device(device_ids: Any, output_device: Any, devices: set) -> Optional[torch.device]:
    """DDP's ``device_ids`` and ``output_device`` for a module on ``devices``: each None or the one
    device the module is on (an int is an index of its accelerator, as in DDP). Returns the device
    a forward's inputs are moved to (DDP moves them to ``device_ids[0]``), or None."""
    here = next(iter(devices)) if len(devices) == 1 else None

    def is_here(spec: Any, arg: str) -> bool:
        try:
            if isinstance(spec, int) and not isinstance(spec, bool):
                d = torch.device("cuda" if here is None or here.type == "cpu" else here.type, spec)
            else:
                d = torch.device(spec)
        except (RuntimeError, TypeError, ValueError) as e:
            raise ValueError(f"{arg}: {spec!r} is not a device ({e})") from e
        return here is not None and d.type == here.type and d.index in (None, here.index)

    where = f"the module is on {here}" if here is not None else f"the module is on {sorted(map(str, devices))}"
    if output_device is not None and not is_here(output_device, "output_device"):
        raise ValueError(f"output_device={output_device!r}, but {where}: SyncDataParallel leaves the output where "
                         "the module puts it (pass no output_device)")
    if device_ids is None:
        return None
    if not isinstance(device_ids, (list, tuple)):
        raise TypeError(f"device_ids must be None or a list of one device, got {type(device_ids).__name__}")
    if len(device_ids) != 1 or not is_here(device_ids[0], "device_ids"):
        raise ValueError(f"device_ids={list(device_ids)!r}, but {where}: one process drives one device, and "
                         "SyncDataParallel never moves the module; move it first (model.to(device)) and pass that "
                         "device or no device_ids")
    return here


_NO_DELAY = ("every trainable parameter is all-reduced in its bucket during backward; freeze one (requires_grad="
             "False before wrapping) to leave it out of the all-reduce")
# DDP's arguments SyncDataParallel has no setting for: the values that mean what it does anyway,
# and why it cannot honour the others.
_DDP_ONLY: dict = {
    "find_unused_parameters": ((False, True), ""),
    "batched_grad_copy": ((False, True), ""),
    "gradient_as_bucket_view": ((True,), "gradients are always views into the buckets after the first step (that "
                                "is how backward avoids a copy); clone p.grad where a gradient of its own is needed"),
    "static_graph": ((False,), "there is no static-graph mode: unused parameters need none (they count as zeros), "
                     "and reentrant activation checkpointing, which static_graph=True allows in DDP, is an error "
                     "here; use torch.utils.checkpoint(..., use_reentrant=False)"),
    "dim": ((0,), "it chose how to split inputs across the devices of one process; one process drives one device"),
    "check_reduction": ((False,), "DDP ignores it (deprecated): drop it"),
    "delay_all_reduce_named_params": ((None,), _NO_DELAY),
    "param_to_hook_all_reduce": ((None,), _NO_DELAY),
    "mixed_precision": ((None,), "use compress='bf16' or 'fp16' for a 16-bit wire and torch.autocast for 16-bit "
                        "compute"),
    "device_mesh": ((None,), "pass process_group= (device_mesh.get_group() of a 1-D mesh)"),
    "skip_all_reduce_unused_params": ((False,), "unused parameters travel as zeros inside their bucket, which is "
                                      "all-reduced whole"),
    "bucket_cap_mb_list": ((None,), "there is one cap for the first bucket and one for the rest: first_bucket_mb= "
                           "and bucket_mb="),
}


def _one_of(value: Any, accepted: tuple) -> bool:
    return any(value is a or (type(value) in (bool, int) and type(a) in (bool, int) and value == a) for a in accepted)


def check_ddp_options(options: dict) -> None:
    """Accept DDP arguments whose values mean what SyncDataParallel does anyway; ValueError with the
    reason for the others, TypeError for a name DDP does not have either."""
    for name, value in options.items():
        if name not in _DDP_ONLY:
            raise TypeError(f"SyncDataParallel() got an unexpected keyword argument {name!r}")
        accepted, reason = _DDP_ONLY[name]
        if not _one_of(value, accepted):
            raise ValueError(f"SyncDataParallel cannot honour DDP's {name}={value!r}: {reason}" if reason else
                             f"{name} must be one of {accepted}, got {value!r}")
