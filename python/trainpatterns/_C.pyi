"""Type stub of the native module trainpatterns._C (csrc/bindings.cpp). Only _kernels.py calls it."""
from enum import Enum

class DType(Enum):
    float32 = 0
    float16 = 1
    bfloat16 = 2
    float64 = 3

class TensorTable:
    n: int
    total: int
    def __init__(self, *, rows: int, host_rows: int, n: int, total: int, steps: int, dtype: DType,
                 master: bool = False) -> None: ...

class GradControl:
    def __init__(self, *, grad_mul: float = 1.0, grad_mul_dev: int = 0, skip_dev: int = 0) -> None: ...

class AdamParams:
    def __init__(self, *, lr: float, lr_dev: int = 0, beta1: float, beta2: float, eps: float,
                 weight_decay: float, decoupled: bool, amsgrad: bool = False, maximize: bool = False) -> None: ...

class SgdParams:
    def __init__(self, *, lr: float, lr_dev: int = 0, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False) -> None: ...

class AdagradParams:
    def __init__(self, *, lr: float, lr_dev: int = 0, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 eps: float = 1e-10, maximize: bool = False) -> None: ...

def build_info() -> dict: ...
def adam_step(table: TensorTable, params: AdamParams, grad_control: GradControl, num_threads: int,
              device: int = -1, stream: int = 0) -> None: ...
def sgd_step(table: TensorTable, params: SgdParams, grad_control: GradControl, num_threads: int,
             device: int = -1, stream: int = 0) -> None: ...
def adagrad_step(table: TensorTable, params: AdagradParams, grad_control: GradControl, num_threads: int,
                 device: int = -1, stream: int = 0) -> None: ...
def grad_sumsq(table: TensorTable, num_threads: int) -> float: ...
def grad_sumsq_cuda(table: TensorTable, sumsq_dev: int, device: int, stream: int) -> None: ...
def finish_grad_control(sumsq_dev: int, inv_scale: float, inv_scale_dev: int, max_norm: float, norm_dev: int,
                        skip_dev: int, grad_mul_dev: int, device: int, stream: int) -> None: ...

# distributed (issue 5): gradient-bucket kernels (csrc/comm)
class BucketParams:
    scale: float
    def __init__(self, *, rows: int, host_rows: int, n: int, total: int, dtype: DType, bucket: int,
                 wire_dtype: DType, scale: float = 1.0) -> None: ...

def bucket_pack(params: BucketParams, num_threads: int, device: int = -1, stream: int = 0) -> None: ...
def bucket_unpack(params: BucketParams, num_threads: int, device: int = -1, stream: int = 0) -> None: ...
