"""The only module that calls the native extension ``trainpatterns._C``.

It turns tensors into what the kernels take (addresses, element counts, dtype tags, a CUDA stream as
an integer) and checks them first: device, dtype, layout, contiguity, sizes. Every error raised here
names the offending tensor, so a user sees ``parameter 'encoder.weight': ...`` instead of a crash.
Kernels never see torch objects, which is why the extension does not link libtorch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from . import _C

_DTYPE_TAGS = {
    torch.float32: _C.DType.float32,
    torch.float16: _C.DType.float16,
    torch.bfloat16: _C.DType.bfloat16,
    torch.float64: _C.DType.float64,
}
SUPPORTED_PARAM_DTYPES = tuple(_DTYPE_TAGS)

# Row indices of a tensor table (csrc/common/params.h, enum TableRow).
ROW_NUMEL, ROW_PARAM, ROW_GRAD, ROW_STATE0, ROW_STATE1, ROW_STATE2, ROW_MASTER, ROW_PREFIX = range(8)
N_ROWS = 8


def build_info() -> dict:
    """What the native module was compiled with: CUDA and its archs, SIMD level in use, OpenMP."""
    return dict(_C.build_info())


def cuda_compiled() -> bool:
    return bool(_C.build_info()["cuda"])


def check_param(p: torch.Tensor, name: str) -> None:
    """Raise a clear error if a parameter cannot be updated by a fused kernel."""
    if p.dtype not in _DTYPE_TAGS:
        raise TypeError(
            f"parameter {name}: dtype {p.dtype} is not supported by the fused optimizers "
            f"(supported: float32, float16, bfloat16, float64)"
        )
    if p.layout is not torch.strided:
        raise TypeError(f"parameter {name}: layout {p.layout} is not supported (dense tensors only)")
    if not p.is_contiguous():
        raise ValueError(
            f"parameter {name}: storage is not contiguous (strides {tuple(p.stride())} for shape "
            f"{tuple(p.shape)}); the fused kernels need contiguous parameters, call .contiguous() "
            f"before creating the optimizer"
        )
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
        raise ValueError(
            f"parameter {name}: gradient shape {tuple(g.shape)} does not match parameter shape {tuple(p.shape)}"
        )
    if g.device != p.device:
        raise ValueError(f"parameter {name}: gradient is on {g.device} but the parameter is on {p.device}")
    if not g.is_contiguous():
        raise ValueError(
            f"parameter {name}: gradient storage is not contiguous (strides {tuple(g.stride())}); "
            f"the fused kernels need contiguous gradients"
        )


# ----- per-step plan checks (csrc/common/tensor_watch.h) -----------------------------------------

def _torch_data_ptr_reader() -> int:
    """The address of the C function torch exports to read a tensor's data address from its Python
    object (what inductor's generated C code uses); 0 where this torch has none, and the native
    side then calls ``Tensor.data_ptr`` instead (same result, slower)."""
    guards = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
    addr = getattr(guards, "_torchinductor_pyobject_tensor_data_ptr", 0)
    return addr if isinstance(addr, int) else 0


_C.set_data_ptr_reader(_torch_data_ptr_reader(), torch.Tensor.data_ptr)

# What TensorWatch.check returns.
WATCH_UNCHANGED, WATCH_NEW_GRADS, WATCH_CHANGED = 0, 1, 2


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


def _addr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _rewrite_row(host_rows: torch.Tensor, row: int, addrs: Sequence[int]) -> bool:
    """Write ``addrs`` into one address row of a host table; False when they were already there
    (the caching allocator often hands back the same blocks), so nothing needs uploading."""
    addrs = np.asarray(addrs, dtype=np.int64)
    host = host_rows.numpy()
    if np.array_equal(host[row], addrs):
        return False
    host[row] = addrs
    return True


def _device_rows(host_rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of a host table, copied asynchronously. The copy goes through a fresh pinned
    buffer each time: the caching host allocator keeps it alive until the copy has run, so the host
    table can change again right away."""
    return host_rows.clone().pin_memory().to(device, non_blocking=True)


@dataclass
class KernelTable:
    """A pointer table for one homogeneous tensor list (one device, one dtype, master or not).

    Invariants: every tensor is contiguous and lives on ``device``; grads match their params in
    dtype and shape; ``steps`` is a float32 tensor of ``n`` entries on ``device`` that the kernels
    increment. The table keeps references to everything it points to except the gradients, which
    the optimizer revalidates (identity and address) before every launch.
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

    def replace_grad_addresses(self, addrs: list) -> None:
        """Point the table at new gradient tensors, given their addresses (the caller has checked
        the tensors and keeps them alive for the launch)."""
        if _rewrite_row(self.host_rows, ROW_GRAD, addrs) and self.device.type == "cuda":
            self._upload()

    def _upload(self) -> None:
        self.rows = _device_rows(self.host_rows, self.device)
        self.native = _native_table(self.rows, self.host_rows, self.steps, self.dtype, self.master)


def _native_table(rows, host_rows, steps, dtype, master):
    n = host_rows.shape[1]
    total = int(host_rows[ROW_NUMEL].sum()) if n else 0
    return _C.TensorTable(
        rows=rows.data_ptr(), host_rows=host_rows.data_ptr(), n=n, total=total,
        steps=steps.data_ptr(), dtype=_DTYPE_TAGS[dtype], master=master,
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
        host[row] = [_addr(s) for s in lst]
    host[ROW_MASTER] = [_addr(m) for m in masters]
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


def _launch(device: torch.device) -> tuple[int, int]:
    """(device index, stream handle) for a kernel call: -1 and 0 on the CPU."""
    if device.type != "cuda":
        return -1, 0
    return device.index, torch.cuda.current_stream(device).cuda_stream


def grad_control(grad_mul: float = 1.0, grad_mul_dev: Optional[torch.Tensor] = None,
                 skip_dev: Optional[torch.Tensor] = None):
    """Gradient multiplier (loss-scale reciprocal times clip factor) and optional device skip flag."""
    return _C.GradControl(grad_mul=grad_mul, grad_mul_dev=_addr(grad_mul_dev), skip_dev=_addr(skip_dev))


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
    dev, stream = _launch(table.device)
    _C.adam_step(table.native, hp, control, num_threads, dev, stream)


def sgd_step(table: KernelTable, control, *, lr, momentum: float, dampening: float,
             weight_decay: float, nesterov: bool, maximize: bool, num_threads: int) -> None:
    hp = _C.SgdParams(**_lr_args(lr), momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                      nesterov=nesterov, maximize=maximize)
    dev, stream = _launch(table.device)
    _C.sgd_step(table.native, hp, control, num_threads, dev, stream)


def adagrad_step(table: KernelTable, control, *, lr, lr_decay: float, weight_decay: float, eps: float,
                 maximize: bool, num_threads: int) -> None:
    hp = _C.AdagradParams(**_lr_args(lr), lr_decay=lr_decay, weight_decay=weight_decay, eps=eps,
                          maximize=maximize)
    dev, stream = _launch(table.device)
    _C.adagrad_step(table.native, hp, control, num_threads, dev, stream)


def grad_sumsq_cpu(table: KernelTable, num_threads: int) -> float:
    """Sum of squares of the table's gradients (double precision); not finite iff a grad is not."""
    return _C.grad_sumsq(table.native, num_threads)


def grad_sumsq_cuda(table: KernelTable, sumsq: torch.Tensor) -> None:
    """Adds the table's gradient sum of squares to ``sumsq`` (float64 scalar on the device), async."""
    dev, stream = _launch(table.device)
    _C.grad_sumsq_cuda(table.native, sumsq.data_ptr(), dev, stream)


def finish_grad_control_cuda(sumsq: torch.Tensor, inv_scale: Optional[torch.Tensor], max_norm: float,
                             norm: torch.Tensor, skip: torch.Tensor, grad_mul: torch.Tensor) -> None:
    """On the device: norm = sqrt(sumsq) * inv_scale, skip |= !finite(norm), grad_mul = inv_scale *
    clip factor (max_norm <= 0: no clipping). No host synchronisation."""
    dev, stream = _launch(sumsq.device)
    _C.finish_grad_control(sumsq.data_ptr(), 1.0, _addr(inv_scale), max_norm, norm.data_ptr(),
                           skip.data_ptr(), grad_mul.data_ptr(), dev, stream)


# ---- distributed (issue 5): gradient-bucket kernels (csrc/comm) ------------------------------------

BUCKET_DTYPES = SUPPORTED_PARAM_DTYPES


@dataclass
class BucketTable:
    """The pointer table of one all-reduce bucket: which tensors live where in a flat buffer.

    Invariants: ``offsets[i]`` (elements) places tensor i in the bucket, slots do not overlap and
    ``span = max(offset + numel)``; every present tensor is contiguous, on ``device``, of ``dtype``;
    an absent tensor (address 0) packs as zeros and is skipped by unpack. The table keeps references
    to the tensors it points to, so no address dangles.
    """

    device: torch.device
    dtype: torch.dtype
    span: int
    tensors: list  # what the address row points to (None where absent)
    host_rows: torch.Tensor  # int64 [N_ROWS, n], CPU
    rows: torch.Tensor  # host_rows itself on CPU, a device copy on CUDA

    @property
    def n(self) -> int:
        return self.host_rows.shape[1]

    def set_tensors(self, tensors: Sequence[Optional[torch.Tensor]]) -> None:
        """Point the table at new tensors (same count; the caller has checked them), uploading the
        address row to the device only when it changed."""
        addrs = [0 if t is None else t.data_ptr() for t in tensors]
        self.tensors = list(tensors)
        if _rewrite_row(self.host_rows, ROW_GRAD, addrs) and self.device.type == "cuda":
            self.rows = _device_rows(self.host_rows, self.device)

    def release(self) -> None:
        """Drop the references to the tensors once the launch that used them is queued (the caching
        allocator orders any reuse of their memory after it on the stream); the next launch must
        call :meth:`set_tensors` first."""
        self.tensors = [None] * self.n


def make_bucket_table(numels: Sequence[int], offsets: Sequence[int], dtype: torch.dtype,
                      device: torch.device, tensors: Optional[Sequence[Optional[torch.Tensor]]] = None) -> BucketTable:
    """A bucket table for tensors of ``numels`` elements placed at ``offsets`` (checked here)."""
    if dtype not in _DTYPE_TAGS:
        raise TypeError(f"bucket tensors: dtype {dtype} is not supported (float32, float16, bfloat16, float64)")
    n = len(numels)
    if len(offsets) != n:
        raise ValueError(f"bucket table: {n} sizes but {len(offsets)} offsets")
    order = sorted(range(n), key=lambda i: offsets[i])
    end = 0
    for i in order:
        if numels[i] < 0 or offsets[i] < end:
            raise ValueError(f"bucket table: slot {i} (offset {offsets[i]}, {numels[i]} elements) overlaps "
                             f"the previous slot or is negative")
        end = offsets[i] + numels[i]
    host = np.zeros((N_ROWS, n), dtype=np.int64)
    host[ROW_NUMEL] = numels
    host[ROW_PREFIX] = offsets
    host_rows = torch.from_numpy(host)
    table = BucketTable(torch.device(device), dtype, end, [None] * n, host_rows, host_rows)
    if tensors is not None:
        for k, t in enumerate(tensors):
            if t is not None:
                check_bucket_tensor(t, table, k)
        table.set_tensors(tensors)
    elif table.device.type == "cuda":
        table.rows = _device_rows(host_rows, table.device)
    return table


def check_bucket_tensor(t: torch.Tensor, table: BucketTable, k: int, name: Optional[str] = None) -> None:
    """Raise a clear error if ``t`` cannot fill slot ``k`` of ``table``."""
    name = name or f"tensor {k}"
    want = int(table.host_rows[ROW_NUMEL, k])
    if t.layout is not torch.strided:
        raise TypeError(f"{name}: layout {t.layout} is not supported (dense tensors only)")
    if t.dtype != table.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} does not match the bucket's {table.dtype}")
    if t.device != table.device:
        raise ValueError(f"{name}: on {t.device} but the bucket is on {table.device}")
    if t.numel() != want:
        raise ValueError(f"{name}: {t.numel()} elements but its bucket slot holds {want}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: storage is not contiguous (strides {tuple(t.stride())}); the bucket "
                         f"kernels need contiguous tensors")


def _bucket_params(table: BucketTable, bucket: torch.Tensor, scale: float):
    if bucket.dtype not in _DTYPE_TAGS:
        raise TypeError(f"bucket: dtype {bucket.dtype} is not supported (float32, float16, bfloat16, float64)")
    if bucket.device != table.device:
        raise ValueError(f"bucket: on {bucket.device} but its tensors are on {table.device}")
    if not bucket.is_contiguous() or bucket.numel() < table.span:
        raise ValueError(f"bucket: needs a contiguous buffer of at least {table.span} elements, got "
                         f"{bucket.numel()} (contiguous: {bucket.is_contiguous()})")
    return _C.BucketParams(rows=table.rows.data_ptr(), host_rows=table.host_rows.data_ptr(), n=table.n,
                           total=table.span, dtype=_DTYPE_TAGS[table.dtype], bucket=bucket.data_ptr(),
                           wire_dtype=_DTYPE_TAGS[bucket.dtype], scale=float(scale))


def bucket_pack(table: BucketTable, bucket: torch.Tensor, scale: float = 1.0, num_threads: int = 1) -> None:
    """``bucket[off_i:off_i + n_i] = (tensor_i * scale).to(bucket.dtype)``, absent tensors as zeros;
    one fused pass (a tensor may be a view of its own slot). Asynchronous on CUDA (current stream)."""
    dev, stream = _launch(table.device)
    _C.bucket_pack(_bucket_params(table, bucket, scale), num_threads, dev, stream)


def bucket_unpack(table: BucketTable, bucket: torch.Tensor, scale: float = 1.0, num_threads: int = 1) -> None:
    """``tensor_i[:] = (bucket[off_i:off_i + n_i] * scale).to(tensor_i.dtype)`` for present tensors;
    one fused pass. Asynchronous on CUDA (current stream)."""
    dev, stream = _launch(table.device)
    _C.bucket_unpack(_bucket_params(table, bucket, scale), num_threads, dev, stream)
# ---- loader (issue 3): sources, the native prefetcher, and its batch views ----

# What the gather copies is bytes, so any fixed-size dtype would do; these are the ones torch and
# the loader's users need (numpy arrays of them map one to one; bfloat16 only exists in torch).
_LOADER_NUMPY_DTYPES = {
    np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
    np.dtype(np.float16): torch.float16, np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
    np.dtype(np.int16): torch.int16, np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8,
    np.dtype(np.bool_): torch.bool,
}
# (DLPack type code, bits) the native views are exported with: kDLInt 0, kDLUInt 1, kDLFloat 2,
# kDLBfloat 4, kDLBool 6 (csrc/loader/dlpack.h).
_LOADER_DLPACK = {
    torch.float32: (2, 32), torch.float64: (2, 64), torch.float16: (2, 16), torch.bfloat16: (4, 16),
    torch.int64: (0, 64), torch.int32: (0, 32), torch.int16: (0, 16), torch.int8: (0, 8), torch.uint8: (1, 8),
    torch.bool: (6, 8),
}
SUPPORTED_LOADER_DTYPES = tuple(_LOADER_DLPACK)


@dataclass(frozen=True)
class LoaderSource:
    """One checked source array: where its rows are and what a batch of them looks like.

    Invariants: rows are contiguous, ``row_bytes`` apart, starting at ``addr``; ``owner`` is the
    array or tensor that owns that memory (kept alive by the prefetcher)."""

    name: str
    dtype: torch.dtype
    trailing: tuple  # shape of one row
    num_rows: int
    row_bytes: int
    addr: int
    owner: object


def loader_source(name: str, a) -> LoaderSource:
    """Check one source (numpy array, np.memmap or CPU torch tensor) and describe it."""
    if isinstance(a, torch.Tensor):
        if a.device.type != "cpu":
            raise ValueError(f"source {name}: tensor is on {a.device}; sources must be CPU tensors or numpy "
                             f"arrays (the loader copies batches to `device` itself)")
        if a.layout is not torch.strided:
            raise TypeError(f"source {name}: layout {a.layout} is not supported (dense tensors only)")
        if a.dtype not in SUPPORTED_LOADER_DTYPES:
            raise TypeError(f"source {name}: dtype {a.dtype} is not supported (supported: "
                            f"{', '.join(str(d).replace('torch.', '') for d in SUPPORTED_LOADER_DTYPES)})")
        if a.is_neg() or a.is_conj():
            raise ValueError(f"source {name}: tensor is a lazy negated/conjugated view; call .resolve_neg() first")
        dtype, shape, contiguous, elem = a.dtype, tuple(a.shape), a.is_contiguous(), a.element_size()
        addr = a.data_ptr()
    elif isinstance(a, np.ndarray):
        if a.dtype not in _LOADER_NUMPY_DTYPES:
            raise TypeError(f"source {name}: numpy dtype {a.dtype} is not supported (supported: "
                            f"{', '.join(str(d) for d in _LOADER_NUMPY_DTYPES)}; bfloat16 as a torch tensor)")
        dtype, shape, contiguous, elem = _LOADER_NUMPY_DTYPES[a.dtype], a.shape, a.flags.c_contiguous, a.itemsize
        addr = a.__array_interface__["data"][0]
    else:
        raise TypeError(f"source {name}: expected a numpy array, np.memmap or CPU torch tensor, "
                        f"got {type(a).__name__}")
    if len(shape) == 0:
        raise ValueError(f"source {name}: a 0-d array has no rows; sources need a first (row) dimension")
    if not contiguous:
        raise ValueError(f"source {name}: array is not contiguous (shape {tuple(shape)}); the loader gathers "
                         f"whole rows from contiguous memory: pass np.ascontiguousarray(x) or x.contiguous()")
    trailing = tuple(int(s) for s in shape[1:])
    row_bytes = int(np.prod(trailing, dtype=np.int64)) * elem
    return LoaderSource(name, dtype, trailing, int(shape[0]), row_bytes, addr, a)


def make_prefetcher(sources: Sequence[LoaderSource], *, batch_size: int, prefetch: int, num_threads: int,
                    external: Sequence[Sequence[torch.Tensor]] = ()):
    """Start the native gather threads. ``external``: per slot, one buffer per source (pinned host
    tensors of at least ``batch_size * row_bytes`` bytes); empty: the pool allocates its own."""
    for slot in external:
        for s, buf in zip(sources, slot):
            if not buf.is_contiguous() or buf.numel() * buf.element_size() < batch_size * s.row_bytes:
                raise ValueError(f"internal: external buffer too small for source {s.name}")
    owners = (tuple(s.owner for s in sources), tuple(tuple(slot) for slot in external))
    return _C.Prefetcher(
        sources=[(s.addr, s.row_bytes, *_LOADER_DLPACK[s.dtype], list(s.trailing)) for s in sources], num_rows=sources[0].num_rows if sources else 0,
        batch_size=batch_size, prefetch=prefetch, num_threads=num_threads,
        external=[[b.data_ptr() for b in slot] for slot in external], owners=owners,
    )


def next_batch(prefetcher, poll_s: float = 0.05,
               on_wait: Optional[Callable[[], object]] = None) -> tuple[int, list]:
    """Wait for the prefetcher's next batch and view it as tensors, one per source (zero-copy).

    Waits in slices of ``poll_s`` seconds with the GIL released, so Ctrl-C (KeyboardInterrupt)
    is raised within one slice; ``on_wait()`` runs after every empty slice. A failed gather in a
    worker thread raises RuntimeError here. Returns (sequence number, tensors)."""
    while True:
        got = prefetcher.next(poll_s)
        if got is not None:
            break
        if on_wait is not None:
            on_wait()
    seq, _, capsules = got
    # Each capsule is a [rows, *trailing] view of the batch buffer in the source's dtype; the
    # tensor's storage releases the buffer when its last user is freed.
    return seq, [torch.from_dlpack(cap) for cap in capsules]
