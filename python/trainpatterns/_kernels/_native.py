"""What every kernel family shares at the boundary with the native module ``trainpatterns._C``.

The dtype tags the kernels understand, what the module was compiled with, the row layout of the
int64 pointer tables that optimizer and bucket kernels both walk (csrc/common/params.h), and how a
launch names its device and stream. Kept apart so that the optimizer, bucket and loader modules of
this package share one copy of each.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .. import _C

# torch dtype -> the kernels' dtype tag (csrc/common/params.h, enum DType).
DTYPE_TAGS = {
    torch.float32: _C.DType.float32,
    torch.float16: _C.DType.float16,
    torch.bfloat16: _C.DType.bfloat16,
    torch.float64: _C.DType.float64,
}
SUPPORTED_PARAM_DTYPES = tuple(DTYPE_TAGS)

# Row indices of a tensor table (csrc/common/params.h, enum TableRow).
ROW_NUMEL, ROW_PARAM, ROW_GRAD, ROW_STATE0, ROW_STATE1, ROW_STATE2, ROW_MASTER, ROW_PREFIX = range(8)
N_ROWS = 8


def build_info() -> dict:
    """What the native module was compiled with: CUDA and its archs, SIMD level in use, OpenMP."""
    return dict(_C.build_info())


def cuda_compiled() -> bool:
    """Whether the native module holds CUDA kernels (nvcc was found at build time)."""
    return bool(_C.build_info()["cuda"])


def address(t: Optional[torch.Tensor]) -> int:
    """The data address of ``t``, 0 for None (a null row entry)."""
    return 0 if t is None else t.data_ptr()


def launch_args(device: torch.device) -> tuple[int, int]:
    """(device index, stream handle) for a kernel call: -1 and 0 on the CPU, else the device's
    current stream, on which the kernel is queued."""
    if device.type != "cuda":
        return -1, 0
    return device.index, torch.cuda.current_stream(device).cuda_stream


def rewrite_row(host_rows: torch.Tensor, row: int, addrs: Sequence[int]) -> bool:
    """Write ``addrs`` into one address row of a host table; False when they were already there
    (the caching allocator often hands back the same blocks), so nothing needs uploading."""
    addrs = np.asarray(addrs, dtype=np.int64)
    host = host_rows.numpy()
    if np.array_equal(host[row], addrs):
        return False
    host[row] = addrs
    return True


def device_rows(host_rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of a host table, copied asynchronously. The copy goes through a fresh pinned
    buffer each time: the caching host allocator keeps it alive until the copy has run, so the host
    table can change again right away."""
    return host_rows.clone().pin_memory().to(device, non_blocking=True)
