"""The only package that calls the native extension ``trainpatterns._C``.

It turns tensors into what the kernels take (addresses, element counts, dtype tags, a CUDA stream as
an integer) and checks them first: device, dtype, layout, contiguity, sizes. Every error raised here
names the offending tensor, so a user sees ``parameter 'encoder.weight': ...`` instead of a crash.
Kernels never see torch objects, which is why the extension does not link libtorch.

Modules: ``_native`` (dtype tags, table rows, launch arguments, build report), ``_checks`` (the
tensor checks and their messages), ``tensor_watch`` (the optimizers' per-step check of addresses,
sizes and storage bounds, and the native tensor reader behind it),
``optim_tables`` (optimizer tables and steps, gradient control and norms), ``bucket_tables``
(gradient-bucket pack/unpack), ``loader`` (sources and the native prefetcher). Callers use the
names re-exported here.
"""
from __future__ import annotations

from ._checks import check_grad, check_param, check_storage
from ._native import SUPPORTED_PARAM_DTYPES, build_info, cuda_compiled
from .bucket_tables import (BUCKET_DTYPES, BucketTable, bucket_pack, bucket_unpack, check_bucket_tensor,
                            make_bucket_table)
from .loader import SUPPORTED_LOADER_DTYPES, LoaderSource, loader_source, make_prefetcher, next_batch, slot_rows
from .optim_tables import (KernelTable, adagrad_step, adam_step, finish_grad_control_cuda, grad_control,
                           grad_sumsq_cpu, grad_sumsq_cuda, make_table, prepared_adam_step, sgd_step)
from .tensor_watch import (WATCH_CHANGED, WATCH_NEW_GRADS, WATCH_UNCHANGED, data_ptrs, read_tensor,
                           set_tensor_reader, tensor_facts, tensor_watch)

__all__ = [
    "BUCKET_DTYPES", "SUPPORTED_LOADER_DTYPES", "SUPPORTED_PARAM_DTYPES", "WATCH_CHANGED", "WATCH_NEW_GRADS",
    "WATCH_UNCHANGED", "BucketTable", "KernelTable", "LoaderSource", "adagrad_step", "adam_step",
    "bucket_pack", "bucket_unpack", "build_info", "check_bucket_tensor", "check_grad", "check_param",
    "check_storage", "cuda_compiled", "data_ptrs", "finish_grad_control_cuda", "grad_control",
    "grad_sumsq_cpu", "grad_sumsq_cuda", "loader_source", "make_bucket_table", "make_prefetcher",
    "make_table", "next_batch", "prepared_adam_step", "read_tensor", "set_tensor_reader", "sgd_step",
    "slot_rows", "tensor_facts", "tensor_watch",
]
