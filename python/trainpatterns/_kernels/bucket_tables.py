"""The gradient-bucket kernels' side of the boundary (csrc/comm): where each tensor of an
all-reduce bucket lives in the flat buffer, and the fused pack (scale + cast into the bucket) and
unpack (scale + cast back) calls that trainpatterns.distributed runs around every all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .. import _C
from ._checks import check_dense, unsupported_dtype
from ._native import (DTYPE_TAGS, N_ROWS, ROW_GRAD, ROW_NUMEL, ROW_PREFIX, SUPPORTED_PARAM_DTYPES, device_rows,
                      launch_args, rewrite_row)

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
        if rewrite_row(self.host_rows, ROW_GRAD, addrs) and self.device.type == "cuda":
            self.rows = device_rows(self.host_rows, self.device)

    def release(self) -> None:
        """Drop the references to the tensors once the launch that used them is queued (the caching
        allocator orders any reuse of their memory after it on the stream); the next launch must
        call :meth:`set_tensors` first."""
        self.tensors = [None] * self.n


def make_bucket_table(numels: Sequence[int], offsets: Sequence[int], dtype: torch.dtype,
                      device: torch.device, tensors: Optional[Sequence[Optional[torch.Tensor]]] = None) -> BucketTable:
    """A bucket table for tensors of ``numels`` elements placed at ``offsets`` (checked here)."""
    if dtype not in DTYPE_TAGS:
        raise unsupported_dtype("bucket tensors", dtype)
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
        table.rows = device_rows(host_rows, table.device)
    return table


def check_bucket_tensor(t: torch.Tensor, table: BucketTable, k: int, name: Optional[str] = None) -> None:
    """Raise a clear error if ``t`` cannot fill slot ``k`` of ``table``."""
    name = name or f"tensor {k}"
    want = int(table.host_rows[ROW_NUMEL, k])
    if t.dtype != table.dtype:
        raise TypeError(f"{name}: dtype {t.dtype} does not match the bucket's {table.dtype}")
    if t.device != table.device:
        raise ValueError(f"{name}: on {t.device} but the bucket is on {table.device}")
    if t.numel() != want:
        raise ValueError(f"{name}: {t.numel()} elements but its bucket slot holds {want}")
    check_dense(t, name, "the bucket kernels need contiguous tensors")


def _bucket_params(table: BucketTable, bucket: torch.Tensor, scale: float):
    if bucket.dtype not in DTYPE_TAGS:
        raise unsupported_dtype("bucket", bucket.dtype)
    if bucket.device != table.device:
        raise ValueError(f"bucket: on {bucket.device} but its tensors are on {table.device}")
    if not bucket.is_contiguous() or bucket.numel() < table.span:
        raise ValueError(f"bucket: needs a contiguous buffer of at least {table.span} elements, got "
                         f"{bucket.numel()} (contiguous: {bucket.is_contiguous()})")
    return _C.BucketParams(rows=table.rows.data_ptr(), host_rows=table.host_rows.data_ptr(), n=table.n,
                           total=table.span, dtype=DTYPE_TAGS[table.dtype], bucket=bucket.data_ptr(),
                           wire_dtype=DTYPE_TAGS[bucket.dtype], scale=float(scale))


def bucket_pack(table: BucketTable, bucket: torch.Tensor, scale: float = 1.0, num_threads: int = 1) -> None:
    """``bucket[off_i:off_i + n_i] = (tensor_i * scale).to(bucket.dtype)``, absent tensors as zeros;
    one fused pass (a tensor may be a view of its own slot). Asynchronous on CUDA (current stream)."""
    dev, stream = launch_args(table.device)
    _C.bucket_pack(_bucket_params(table, bucket, scale), num_threads, dev, stream)


def bucket_unpack(table: BucketTable, bucket: torch.Tensor, scale: float = 1.0, num_threads: int = 1) -> None:
    """``tensor_i[:] = (bucket[off_i:off_i + n_i] * scale).to(tensor_i.dtype)`` for present tensors;
    one fused pass. Asynchronous on CUDA (current stream)."""
    dev, stream = launch_args(table.device)
    _C.bucket_unpack(_bucket_params(table, bucket, scale), num_threads, dev, stream)
