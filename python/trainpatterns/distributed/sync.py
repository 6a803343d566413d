"""SyncDataParallel: synchronous data parallelism with bucketed, overlapped gradient all-reduce.

Every rank holds the whole model and trains on its own slice of each batch; after each backward the
gradients are averaged over the ranks, so every rank takes the same optimizer step and the
parameters stay identical. How (the design of torch DDP, with fused native bucket kernels):

* At wrap time the trainable parameters are split into buckets in reverse registration order (the
  order backward produces gradients), by dtype, about ``bucket_mb`` each (the first one smaller, as
  in DDP, so communication starts early); identical on every rank (sync_buckets.py). Each bucket
  owns a flat buffer; after the first step every ``.grad`` is a view into it, so autograd
  accumulates straight into the bucket and no copy is needed.
* A post-accumulate-grad hook marks a parameter ready; when all parameters of a bucket (and of every
  bucket before it: all ranks launch in the same order) are ready, one native pass packs the bucket
  (gradients that are not yet views are copied in, absent ones count as zeros), scales it by
  1/world_size and, with ``compress``, casts it to bfloat16/float16; a gradient that was copied in
  is replaced by its slot right away (so its memory is reused by the rest of backward instead of
  being returned to the OS and faulted back in next step); then an asynchronous ``all_reduce``
  starts while backward goes on. A 16-bit wire on CPU/gloo goes through our ring of point-to-point
  sends instead (``ring.py``), because gloo's own 16-bit all-reduce is slow. At the end of backward
  (a queued autograd callback) the remaining buckets are launched, each is waited for in order,
  unpacked (cast back) and, with ``optimizer=``, that bucket's parameters are stepped while later
  buckets are still in flight.
* Each bucket also carries one "has a gradient" flag per parameter, so a parameter that got no
  gradient on a rank counts as zeros there, and one that got none on any rank keeps ``.grad = None``
  (exactly what a single process on the whole batch would see). No extra collective is needed.

Invariants: all trainable parameters are dense and on one device, and every rank wraps the same
architecture (checked at wrap time). Frozen parameters (``requires_grad=False`` at wrap time) are
never communicated. Collectives inherit the process group's timeout; a failed or timed-out
all-reduce raises a RuntimeError naming the bucket and the rank from ``backward()``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .. import _kernels
from ..optim import SupportsStepSubset
from .ring import ring_for
from .sync_buckets import MIB, WIRE_DTYPES, GradBucket, bucket_caps, check_ddp_options, chunks, ddp_device, make_buckets

__all__ = ["SyncDataParallel"]

class SyncDataParallel(nn.Module):
    """Wrap ``module`` for synchronous data-parallel training over ``torch.distributed``.

    Args:
        module: the model; its parameters and buffers are broadcast from rank 0 here.
        bucket_mb: bucket size in MiB of gradients (default 25). A parameter larger than this gets
            a bucket of its own.
        compress: ``None`` (all-reduce in the gradient dtype), ``"bf16"`` or ``"fp16"``: gradients
            are cast for the wire and back, halving the bytes moved (works on CPU/gloo too).
        process_group: the group to average over (default: the world).
        first_bucket_mb: cap of the first bucket (the last layers' gradients), so that the first
            all-reduce starts early in backward, as DDP does (default 1).
        broadcast_buffers: broadcast buffers (e.g. BatchNorm statistics) from rank 0 here and before
            every training-mode forward, as DDP does; False: neither (buffers stay per rank).
        optimizer: a trainpatterns fused optimizer over these parameters (any optimizer with the
            ``trainpatterns.optim.SupportsStepSubset`` protocol). When given, ``backward()``
            also steps it, bucket by bucket, as soon as each bucket's all-reduce completes (the
            update overlaps the remaining communication): do not call ``optimizer.step()`` yourself.
            Not with ``max_grad_norm`` (it needs every gradient first).
        p2p_ring: how a compressed bucket is summed. ``True``: a ring of point-to-point sends
            on a background thread (``distributed/ring.py``). ``False``: ``dist.all_reduce``.
            ``None`` (the default): the ring on CPU over gloo, where gloo's own 16-bit all-reduce
            is slow (scalar sums, small transfers), and ``dist.all_reduce`` elsewhere (NCCL sums
            16-bit values natively). Without ``compress`` the wire is always ``dist.all_reduce``.

    DDP's argument names work where they mean the same, so switching from
    ``DistributedDataParallel`` is a one-line change: ``bucket_cap_mb`` (``bucket_mb``; the first
    bucket capped there too unless ``first_bucket_mb`` is given, as DDP caps it),
    ``find_unused_parameters`` (True or False: unused parameters always work, at no cost),
    ``gradient_as_bucket_view=True`` (always so), ``broadcast_buffers``, ``forward_sync_buffers``
    (buffers broadcast here always, before training-mode forwards when True), ``init_sync=False``
    (nothing broadcast here: every rank holds the same values already), ``device_ids`` and
    ``output_device`` (None or the module's own device; with ``device_ids`` a forward's tensor
    inputs are moved there, as DDP does). DDP's other arguments are accepted at their defaults; a
    value SyncDataParallel cannot honour (``static_graph=True``, ``gradient_as_bucket_view=False``,
    ``mixed_precision``, another device...) is a ValueError that says why, an unknown name a TypeError.

    Without an initialised process group (a single process) nothing is communicated but the
    behaviour is the same (``optimizer=`` and the ``compress`` rounding included), so one script runs
    with and without torchrun.
    """

    def __init__(self, module: nn.Module, bucket_mb: Optional[float] = None, compress: Optional[str] = None, *,
                 process_group: Optional[dist.ProcessGroup] = None, first_bucket_mb: Optional[float] = None,
                 broadcast_buffers: Optional[bool] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                 p2p_ring: Optional[bool] = None, bucket_cap_mb: Optional[float] = None,
                 find_unused_parameters: bool = False, gradient_as_bucket_view: bool = True,
                 forward_sync_buffers: Optional[bool] = None, init_sync: bool = True,
                 device_ids: Optional[Sequence[Any]] = None, output_device: Any = None, **ddp_options: Any) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"SyncDataParallel wraps an nn.Module, got {type(module).__name__}")
        check_ddp_options(dict(ddp_options, find_unused_parameters=find_unused_parameters,
                               gradient_as_bucket_view=gradient_as_bucket_view))
        self.first_bucket_mb, self.bucket_mb = bucket_caps(bucket_mb, first_bucket_mb, bucket_cap_mb)
        if compress not in WIRE_DTYPES:
            raise ValueError(f"compress must be None, 'bf16' or 'fp16', got {compress!r}")
        if broadcast_buffers is not None and forward_sync_buffers is not None:
            raise ValueError("broadcast_buffers and forward_sync_buffers name one setting (DDP's old name and its "
                             "new one): give one")
        self.module = module
        self.compress = compress
        self.broadcast_buffers = bool(forward_sync_buffers if forward_sync_buffers is not None else
                                      broadcast_buffers is not False)
        self._group = process_group
        self._distributed = dist.is_available() and dist.is_initialized()
        if process_group is not None and not self._distributed:
            raise RuntimeError("SyncDataParallel: a process_group was given but torch.distributed is not initialised")
        self.world_size = dist.get_world_size(process_group) if self._distributed else 1
        self.rank = dist.get_rank(process_group) if self._distributed else 0
        self._src = dist.get_global_rank(process_group, 0) if self._distributed and process_group else 0

        named = [(n, p) for n, p in module.named_parameters()]
        self._frozen = [(n, p) for n, p in named if not p.requires_grad]
        trainable = [(n, p) for n, p in named if p.requires_grad]
        devices = {p.device for _, p in named} | {b.device for b in module.buffers()}
        if len(devices) > 1:
            raise ValueError(f"SyncDataParallel needs the module on one device, found {sorted(map(str, devices))}")
        for n, p in trainable:
            if p.dtype not in _kernels.BUCKET_DTYPES:
                raise TypeError(f"parameter {n!r}: dtype {p.dtype} cannot be all-reduced by the bucket kernels "
                                f"(float32, float16, bfloat16, float64)")
            if p.layout is not torch.strided:
                raise TypeError(f"parameter {n!r}: layout {p.layout} is not supported (dense parameters only)")

        self._input_device = ddp_device(device_ids, output_device, devices)
        self._ring = self._pick_ring(p2p_ring, devices)
        self._check_same_model(named)
        if init_sync:
            self._broadcast([p.detach() for _, p in named] + (list(module.buffers()) if broadcast_buffers is not False
                                                              else []))
        self._buckets = make_buckets(trainable, int(self.first_bucket_mb * MIB), int(self.bucket_mb * MIB),
                                     WIRE_DTYPES[compress])
        self._sync = True
        self._sync_backward = True  # what the last forward decided
        self._round_open = False  # a backward with synchronisation is in progress
        self._last_round_task = -1  # autograd graph-task id of the last round (nested backward check)
        self._next_launch = 0
        self._optimizer = None
        if optimizer is not None:
            self._attach_optimizer(optimizer)
        self._hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, b.index, k))
                       for b in self._buckets for k, p in enumerate(b.params)]

    # ----- wrap time -----------------------------------------------------------------------------

    def _check_same_model(self, named: list) -> None:
        """Raise on every rank if the ranks do not wrap the same architecture (a mismatch would
        otherwise hang or silently mix unrelated tensors)."""
        if not self._distributed:
            return
        sig = torch.zeros(3, dtype=torch.int64)
        for i, (_, p) in enumerate(named):
            sig[0] += 1
            sig[1] += p.numel()
            sig[2] += (i + 1) * (p.numel() + 7 * int(p.requires_grad) + 131 * _dtype_code(p.dtype))
        both = torch.cat([sig, -sig])
        dev = named[0][1].device if named else torch.device("cpu")
        both = both.to(dev)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self._group)
        both = both.cpu()
        if not torch.equal(both[:3], -both[3:]):
            raise RuntimeError(
                f"SyncDataParallel: rank {self.rank} wraps a model that differs from another rank's "
                f"(parameter count, sizes, dtypes or requires_grad); every rank must wrap the same architecture")

    def _broadcast(self, tensors: list) -> None:
        """Copy rank 0's values into ``tensors`` on every rank, a few coalesced broadcasts."""
        if not self._distributed or self.world_size == 1 or not tensors:
            return
        cap = max(1, int(self.bucket_mb * MIB))
        groups: dict = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        with torch.no_grad():
            for chunk in (c for ts in groups.values() for c in chunks(ts, cap)):
                flat = torch.cat([t.reshape(-1) for t in chunk])
                dist.broadcast(flat, src=self._src, group=self._group)
                for t, piece in zip(chunk, flat.split([t.numel() for t in chunk])):
                    t.copy_(piece.view_as(t))

    def _pick_ring(self, p2p_ring: Optional[bool], devices: set):
        """The ring that sums compressed buckets, or None for ``dist.all_reduce`` (see ``p2p_ring``)."""
        if p2p_ring not in (None, True, False):
            raise ValueError(f"p2p_ring must be None, True or False, got {p2p_ring!r}")
        on_cpu = all(d.type == "cpu" for d in devices)
        if p2p_ring and not on_cpu:
            raise ValueError("p2p_ring=True needs the module on the CPU (on a GPU, NCCL's all-reduce sums 16-bit "
                             "values natively)")
        if p2p_ring is None:
            p2p_ring = on_cpu and self._distributed and "gloo" in str(dist.get_backend(self._group))
        if not p2p_ring or self.compress is None or not self._distributed or self.world_size == 1:
            return None
        return ring_for(self._group)

    def _attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, SupportsStepSubset):
            raise TypeError(f"optimizer= needs a trainpatterns fused optimizer (FusedAdamW, FusedAdam, FusedSGD, "
                            f"FusedAdagrad), got {type(optimizer).__name__}")
        if optimizer.max_grad_norm is not None:
            raise ValueError("optimizer= cannot step bucket by bucket with max_grad_norm set: clipping by the global "
                             "norm needs every gradient first; call optimizer.step() after backward instead")
        known = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for b in self._buckets:
            for name, p in zip(b.names, b.params):
                if id(p) not in known:
                    raise ValueError(f"optimizer= does not hold parameter {name!r}: it would never be updated")
        self._optimizer = optimizer

    # ----- training ------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        if self._frozen:
            for name, p in self._frozen:
                if p.requires_grad:
                    raise RuntimeError(f"parameter {name!r} was frozen when the model was wrapped and now requires "
                                       f"grad: its gradient would never be averaged; wrap the model again")
        if self._round_open:
            # The last backward stopped before its end (an exception): drop its half-done round, once
            # its all-reduces are over (they still write into the wire buffers this round packs into).
            self._round_open = False
            for b in self._buckets:
                self._wait(b)
        # As in DDP, the forward decides whether its backward synchronises (no_sync around it or not).
        self._sync_backward = self._sync
        if self.broadcast_buffers and self.training and self._distributed:
            self._broadcast(list(self.module.buffers()))
        if self._input_device is not None:
            args, kwargs = _moved(args, self._input_device), _moved(kwargs, self._input_device)
        return self.module(*args, **kwargs)

    def sync_buffers(self) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics...) into every rank's module: what
        the forward does in training mode, for callers that evaluate (every rank then scores with
        the same statistics). Every rank must call it; a no-op in a single process."""
        self._broadcast(list(self.module.buffers()))

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """The backward of a forward run inside accumulates gradients locally (as in DDP, the forward
        decides: put the forward, or forward and backward, inside); the next synchronised backward
        averages the accumulated sums. Gradient accumulation without communication."""
        previous = self._sync
        self._sync = False
        try:
            yield
        finally:
            self._sync = previous

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``nn.Module.zero_grad``. With ``set_to_none=False`` each bucket is zeroed in one fill and
        the gradients stay bucket views (the next backward needs no copy at all)."""
        if set_to_none:
            super().zero_grad(set_to_none=True)
            return
        for b in self._buckets:
            b.flat.zero_()
            for p, view in zip(b.params, b.views):
                if p.grad is not None and p.grad is not view:
                    p.grad.zero_()

    # ----- the reduction -------------------------------------------------------------------------

    def _grad_ready(self, bi: int, k: int, param: torch.Tensor) -> None:
        """Post-accumulate-grad hook of parameter k of bucket bi."""
        if not self._sync_backward:
            return
        if not self._round_open:
            self._open_round()
        b = self._buckets[bi]
        if b.ready[k]:
            return
        b.ready[k] = True
        b.n_ready += 1
        while self._next_launch < len(self._buckets):
            nb = self._buckets[self._next_launch]
            if nb.n_ready < len(nb.params):
                break
            self._launch(nb)
            self._next_launch += 1

    def sync_gradients(self) -> None:
        """Average the gradients accumulated so far over the group now, through the buckets (and,
        with ``optimizer=``, step it bucket by bucket): for backward passes that ran without a
        synchronising forward, such as those a pipeline schedule drives inside :meth:`no_sync`.
        Every rank of the group calls it."""
        if self._round_open:  # a backward that stopped half-way: its all-reduces end first
            self._round_open = False
            for b in self._buckets:
                self._wait(b)
        self._reset_round()
        self._finish_round()

    def _reset_round(self) -> None:
        self._round_open = True
        self._next_launch = 0
        for b in self._buckets:
            b.ready = [False] * len(b.params)
            b.n_ready = 0
            b.work = None

    def _open_round(self) -> None:
        # Graph-task ids grow as backward passes start, so a round opening in a task older than the
        # last round's was running around it: the last round was a nested backward (reentrant
        # activation checkpointing) and ended, all-reduced and (with optimizer=) stepped while the
        # enclosing backward still had gradients to produce.
        task = torch._C._current_graph_task_id() if hasattr(torch._C, "_current_graph_task_id") else -1
        if 0 <= task < self._last_round_task:
            self._last_round_task = -1
            raise RuntimeError(
                "SyncDataParallel: a backward ran inside another backward (reentrant activation checkpointing, "
                "torch.utils.checkpoint(..., use_reentrant=True)); the gradient average would end with the inner "
                "backward, before the outer one has produced its gradients. Use use_reentrant=False")
        self._last_round_task = task
        self._reset_round()
        torch.autograd.Variable._execution_engine.queue_callback(self._finish_round)

    def _launch(self, b: GradBucket) -> None:
        """Pack (copy what is not a view yet, zeros where absent, scale, cast) and start the all-reduce."""
        tensors = []
        for k, (p, view) in enumerate(zip(b.params, b.views)):
            g = p.grad
            if g is None:
                b.had_grad[k] = False
            else:
                b.had_grad[k] = True
                if g is not view:
                    g = self._checked_stray(b, k, g)
            tensors.append(g)
        if all(b.had_grad):
            b.flags.fill_(1)
        else:
            b.flags.copy_(torch.tensor(b.had_grad, dtype=b.flags.dtype))
        tensors.append(b.flags)
        b.pack_table.set_tensors(tensors)
        _kernels.bucket_pack(b.pack_table, b.wire, 1.0 / self.world_size)
        b.pack_table.release()
        # A gradient that was copied in gives way to its slot now, not after the all-reduce: it is freed
        # while backward runs and the next layers' gradients reuse its memory. Held to the end of
        # backward, they would let the allocator return about the model's size to the OS and fault it
        # back in every step.
        for k, (p, view) in enumerate(zip(b.params, b.views)):
            if b.had_grad[k] and p.grad is not view:
                p.grad = view
        if self._distributed:
            try:
                if self._ring is not None:
                    b.work = self._ring.submit(b.wire)
                else:
                    b.work = dist.all_reduce(b.wire, group=self._group, async_op=True)
            except Exception as e:
                raise self._comm_error(b, e) from e

    def _checked_stray(self, b: GradBucket, k: int, g: torch.Tensor) -> torch.Tensor:
        """A gradient that is not the bucket view (first step, or after zero_grad(set_to_none=True))."""
        if g.layout is not torch.strided:
            raise RuntimeError(f"parameter {b.names[k]!r}: sparse gradients cannot be all-reduced by SyncDataParallel "
                               f"(use a dense embedding)")
        p = b.params[k]
        if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
            raise RuntimeError(f"parameter {b.names[k]!r}: gradient {tuple(g.shape)} {g.dtype} on {g.device} does not "
                               f"match the parameter {tuple(p.shape)} {p.dtype} on {p.device}")
        return g if g.is_contiguous() else g.contiguous()

    def _finish_round(self) -> None:
        """End of backward: launch what is left, in order, then wait, unpack and install the grads."""
        # On an exception the round stays open: the next forward waits for the all-reduces still in
        # flight before anything packs into their buffers again.
        while self._next_launch < len(self._buckets):
            self._launch(self._buckets[self._next_launch])
            self._next_launch += 1
        for b in self._buckets:
            self._complete(b)
        self._round_open = False

    def _wait(self, b: GradBucket) -> None:
        """Wait for bucket b's all-reduce, if one is in flight (it is forgotten either way)."""
        work, b.work = b.work, None
        if work is not None:
            try:
                work.wait()
            except Exception as e:
                raise self._comm_error(b, e) from e

    def _complete(self, b: GradBucket) -> None:
        self._wait(b)
        if b.unpack_table is not None:
            _kernels.bucket_unpack(b.unpack_table, b.wire, 1.0)
        if all(b.had_grad):
            for p, view in zip(b.params, b.views):
                if p.grad is not view:
                    p.grad = view
        else:
            # Sums of the flags (each 1/world where a rank had a gradient): > 0 iff some rank had one.
            somewhere = b.flags.tolist()
            for k, (p, view) in enumerate(zip(b.params, b.views)):
                if b.had_grad[k] or somewhere[k] > 0:
                    if p.grad is not view:
                        p.grad = view
        if self._optimizer is not None:
            self._optimizer.step_subset(b.params)

    def _comm_error(self, b: GradBucket, e: Exception) -> RuntimeError:
        return RuntimeError(
            f"SyncDataParallel: the all-reduce of gradient bucket {b.index} ({len(b.params)} parameters, first "
            f"{b.names[0]!r}) failed on rank {self.rank} of {self.world_size}: {type(e).__name__}: {e}. Another rank "
            f"probably died or stalled (collectives give up after the process group's timeout, "
            f"init_from_env(timeout=...)); restart the job from the last checkpoint (torchrun --max-restarts)")

    # ----- introspection -------------------------------------------------------------------------

    @property
    def bucket_params(self) -> list:
        """The parameter names of each bucket, in all-reduce order (the same on every rank)."""
        return [list(b.names) for b in self._buckets]


def _moved(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor in it (through tuples, named tuples, lists and dicts) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        items = [_moved(v, device) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, list):
        return type(value)(_moved(v, device) for v in value)
    if isinstance(value, dict):
        out = copy.copy(value)  # keeps the type (and a defaultdict's factory)
        for k, v in value.items():
            out[k] = _moved(v, device)
        return out
    return value


def _dtype_code(dtype: torch.dtype) -> int:
    return {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}.get(dtype, 5)
