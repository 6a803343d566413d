"""PipelineParallel: model parallelism by pipeline stages, on ``torch.distributed.pipelining``.

A model too large for one device is cut into stages at boundaries between its top-level blocks (an
``nn.Sequential``'s children): at the names given, or balanced by parameter bytes or by measured
time (``_pipeline_split.py``). A batch is cut into micro-batches that stream through the stages
under torch's schedules: GPipe (every forward, then every backward), 1F1B (one forward, one backward
once the pipeline is full, so a stage holds at most ``stages`` micro-batches' activations) or
interleaved 1F1B (each rank holds several stages, looped, which shrinks the bubble). Gradients are
those of the batch's mean loss, as in the unsplit model (the schedules scale each micro-batch's
gradient by ``1 / microbatches``).

Layout of ranks with ``data_parallel=r`` (world = r * P): replica ``d`` is the pipeline of global
ranks ``d*P .. d*P+P-1``, and pipeline rank ``p`` holds stages ``p, p+P, ...``; the ranks holding
the same stages in each replica form a data-parallel group whose gradients are averaged after the
schedule, once per batch, through ``SyncDataParallel``'s buckets.

A schedule that fails on one rank (an exception, a dead peer) closes the pipeline's process group,
so its neighbours fail at once instead of waiting for the process group's timeout.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint._format import write_safetensors
from . import _pipeline_checks as checks
from ._pipeline_eval import forward_only
from ._pipeline_split import BALANCES, block_costs, cut
from .sync import SyncDataParallel

__all__ = ["PipelineParallel"]

_SCHEDULES = ("1f1b", "gpipe", "interleaved")
# Every process group this process made for a pipeline, in creation order (the same on every rank):
# shutdown() passes a barrier on each before the interpreter ends (see settle_groups).
_GROUPS: list = []
log = logging.getLogger("trainpatterns.pipeline")


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


class PipelineParallel(nn.Module):
    """This rank's stage(s) of ``model`` (an ``nn.Sequential``), run by a pipeline schedule.

    Args:
        model: the whole model, built the same on every rank (only this rank's blocks are kept).
        stages: number of stages: the pipeline's ranks (``world / data_parallel``), or twice that
            with ``schedule="interleaved"`` (any multiple of it).
        split_points: names of the blocks that start stages 2, 3, ... (``stages - 1`` names).
        balance: without ``split_points``, cut so that the most expensive stage is as cheap as
            contiguous blocks allow, by ``"params"`` (parameter bytes) or ``"time"`` (forward +
            backward seconds per block, measured on a micro-batch of ``example_inputs``).
        microbatches: micro-batches per batch (must divide the batch).
        schedule: ``"1f1b"``, ``"gpipe"`` or ``"interleaved"`` (interleaved 1F1B).
        loss_fn: ``loss_fn(outputs, targets)`` of one micro-batch, a mean over its examples.
        data_parallel: replicas of the pipeline; each stage's gradients are averaged over them.
        example_inputs: a batch of inputs, for ``balance="time"``.
        bucket_mb: gradient bucket size of the data-parallel all-reduce.

    Attributes: ``stage`` (the first stage this rank holds), ``stage_ids`` (all of them),
    ``is_first``/``is_last``, ``replica``, ``ranks_per_pipeline``, ``stage_blocks`` (block names of every stage),
    ``stage_costs`` (each stage's cost, in ``cost_unit``: ``"bytes"`` or ``"seconds"``).
    """

    def __init__(self, model: nn.Module, *, stages: Optional[int] = None, split_points: Optional[Sequence[str]] = None,
                 balance: str = "params", microbatches: int = 4, schedule: str = "1f1b",
                 loss_fn: Optional[Callable] = None, data_parallel: int = 1, example_inputs: Any = None,
                 bucket_mb: float = 25) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("PipelineParallel runs under torchrun: call trainpatterns.init_from_env() first")
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"PipelineParallel splits an nn.Sequential at its top-level blocks, got {type(model).__name__}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
        self.microbatches = _positive_int(microbatches, "microbatches")
        self.replicas = _positive_int(data_parallel, "data_parallel")
        if loss_fn is None:
            raise ValueError("PipelineParallel needs loss_fn(outputs, targets) for the last stage")
        self.rank, world = dist.get_rank(), dist.get_world_size()
        if world % self.replicas:
            raise ValueError(f"data_parallel={self.replicas} does not divide the job's {world} ranks")
        width = world // self.replicas  # ranks per pipeline
        self.replica, self._index = divmod(self.rank, width)
        self.ranks_per_pipeline = width
        self.stages = (width * (2 if schedule == "interleaved" else 1)) if stages is None else stages
        if schedule == "interleaved":
            if isinstance(self.stages, bool) or not isinstance(self.stages, int) or self.stages % width:
                raise ValueError(f"stages={self.stages}: the interleaved schedule needs a multiple of the pipeline's "
                                 f"{width} ranks (each rank holds stages p, p+{width}, ...)")
        elif self.stages != width:
            raise ValueError(f"stages={self.stages} but the job has {width} ranks per pipeline (one stage per rank; "
                             f"schedule='interleaved' holds several)")
        names = [n for n, _ in model.named_children()]
        if self.stages > len(names):
            raise ValueError(f"{self.stages} stages but the model has only {len(names)} top-level blocks")
        costs = None
        if split_points is None or balance == "time":
            costs = block_costs(model, names, balance, example_inputs, self.microbatches)
        bounds = cut(names, self.stages, split_points, costs) + [len(names)]
        self.stage_blocks = [names[bounds[s]:bounds[s + 1]] for s in range(self.stages)]
        if costs is None:
            costs = block_costs(model, names, "params", None, self.microbatches)
        self.cost_unit = "seconds" if balance == "time" else "bytes"
        self.stage_costs = [sum(costs[bounds[s]:bounds[s + 1]]) for s in range(self.stages)]
        if self.rank == 0:
            log.info("pipeline stages (%s): %s", self.cost_unit,
                     "; ".join(f"{s}: {b[0]}..{b[-1]} {c:.4g}" for s, (b, c) in
                               enumerate(zip(self.stage_blocks, self.stage_costs))))

        self.stage_ids = list(range(self._index, self.stages, width))
        self.stage = self.stage_ids[0]
        self._pipeline_ranks, self._group, self._dp_group = self._make_groups(world, width)
        inner = [nn.Sequential(*[model.get_submodule(n) for n in self.stage_blocks[s]]) for s in self.stage_ids]
        self._inner = inner
        self._names = {}
        for s in self.stage_ids:
            for n in self.stage_blocks[s]:
                for rest, p in model.get_submodule(n).named_parameters():
                    self._names[id(p)] = f"{n}.{rest}"
        if self._dp_group is not None:
            self.module = nn.ModuleList([SyncDataParallel(m, bucket_mb, process_group=self._dp_group) for m in inner])
        else:
            self.module = nn.ModuleList(inner)
        self._schedule_kind = schedule
        self._loss_fn = loss_fn
        self._specs: tuple = (None, None)
        self._schedule = None
        self._broken: Optional[str] = None
        self._scale = 1.0
        self._device = next(self.parameters(), torch.empty(0)).device
        self._build()  # torch's schedules check their arguments here, the same way on every rank
        self._schedule = None  # built again at the first batch, once its shapes are known

    def _make_groups(self, world: int, width: int) -> tuple:
        """Every rank creates every group, in the same order (``new_group`` is collective)."""
        pipeline = dp = None
        for d in range(self.replicas):
            ranks = list(range(d * width, (d + 1) * width))
            g = dist.new_group(ranks)
            if d == self.replica:
                pipeline, mine = g, ranks
        if self.replicas > 1:
            for p in range(width):
                g = dist.new_group(list(range(p, world, width)))
                if p == self._index:
                    dp = g
        _GROUPS.extend(g for g in (pipeline, dp) if g is not None)
        return mine, pipeline, dp

    def _build(self) -> None:
        # Imported here: torch.distributed.pipelining takes ~0.8 s to import, which every
        # `import trainpatterns` would otherwise pay.
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)

        stages = [PipelineStage(m, s, self.stages, self._device, group=self._group)
                  for m, s in zip(self.module, self.stage_ids)]
        if self._schedule_kind == "interleaved":
            self._schedule = ScheduleInterleaved1F1B(stages, n_microbatches=self.microbatches,
                                                     loss_fn=self._scaled_loss)
        else:
            kind = Schedule1F1B if self._schedule_kind == "1f1b" else ScheduleGPipe
            self._schedule = kind(stages[0], n_microbatches=self.microbatches, loss_fn=self._scaled_loss)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage_ids[-1] == self.stages - 1

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's parameters under the unsplit model's names."""
        for p in self.parameters():
            yield prefix + self._names[id(p)], p

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        for m in self._inner:
            yield from m.parameters()

    # ----- one batch -----------------------------------------------------------------------------

    def step(self, inputs: Any = None, targets: Any = None, *, scaler: Optional[Any] = None) -> Optional[float]:
        """Run one batch through the schedule (forward and backward of every micro-batch; with
        ``data_parallel`` the gradients are then averaged over the replicas); the batch's mean loss
        on the last stage (over all replicas' batches), None elsewhere. Every rank calls it; only
        the first stage needs ``inputs`` and only the last ``targets``; each replica's ranks pass
        that replica's batch.

        With ``scaler`` (a ``torch.amp.GradScaler``, the same settings on every rank) the loss is
        scaled before backward and the usual ``scaler.unscale_(opt)``, ``scaler.step(opt)``,
        ``scaler.update()`` follow; a non-finite gradient on any stage makes every stage's scaler
        skip the step and lower its scale alike (one scalar all-reduce), so the stages never drift
        apart."""
        if self._broken:
            raise RuntimeError(self._broken)
        specs = list(self._specs)
        problem = None
        if self.is_first:
            problem = checks.batch_problem(inputs, "inputs", self.stage, self.microbatches)
            specs[0] = None if problem else checks.micro_spec(inputs, self.microbatches)
        if self.is_last and not problem:
            problem = checks.batch_problem(targets, "targets", self.stages - 1, self.microbatches)
            specs[1] = None if problem else checks.micro_spec(targets, self.microbatches)
        changed = self._schedule is None or tuple(specs) != self._specs
        # Every rank hears of a refused batch or a change of shapes (one all-reduce), so none waits.
        flag = torch.tensor([1.0 if problem else 0.0, 1.0 if changed else 0.0])
        try:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        except RuntimeError as e:  # a rank died: say so here too, and close the pipeline
            self._fail(e)
        if flag[0].item():
            raise ValueError(problem or "another stage refused the batch (its error names why)")
        if flag[1].item():
            self._check_shapes(specs)
        # scaler.scale() (not get_scale) also sets the scaler up on every rank, as backward of a
        # scaled loss would in one process: its unscale_/step need that.
        self._scale = 1.0 if scaler is None else float(scaler.scale(torch.ones((), device=self._device)))
        self._run(inputs, targets)
        if scaler is not None:
            self._agree_on_overflow()
        if not self.is_last:
            return None
        mean = sum(float(v.detach()) for v in self._losses) / len(self._losses) / self._scale
        loss = torch.tensor(mean, dtype=torch.float64)
        if self._dp_group is not None:
            dist.all_reduce(loss, group=self._dp_group)
            loss /= self.replicas
        return float(loss)

    def _scaled_loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        loss = self._loss_fn(outputs, targets)
        return loss if self._scale == 1.0 else loss * self._scale

    def _agree_on_overflow(self) -> None:
        """If any stage's gradients hold an inf or a NaN, put one into this stage's too, so that
        every stage's GradScaler skips this step (each only inspects its own optimizer)."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        bad = torch.zeros(1)
        if grads:
            bad[0] = float(not bool(torch.isfinite(nn.utils.get_total_norm(grads, norm_type=float("inf")))))
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bad.item() and grads and bool(torch.isfinite(grads[0]).all()):
            grads[0].view(-1)[0] = float("inf")

    def _check_shapes(self, specs: list) -> None:
        blocks = {s: self.stage_blocks[s] for s in range(self.stages)}
        local = dict(zip(self.stage_ids, self._inner))
        error = checks.walk_shapes(local, blocks, self.stages, self._pipeline_ranks, self._index, self._group,
                                   specs[0], specs[1], self._loss_fn)
        flag = torch.tensor([1.0 if error else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # the other replicas hear of it too
        if flag.item():
            raise ValueError(error or "another replica's pipeline refused the batch (its error names why)")
        self._specs = tuple(specs)
        self._build()  # torch's stages keep the shapes of their first batch: a new shape needs new ones

    def _run(self, inputs: Any, targets: Any) -> None:
        self._losses: list = []
        sync = self._dp_group is not None
        try:
            with contextlib.ExitStack() as stack:
                if sync:
                    for m in self.module:
                        stack.enter_context(m.no_sync())
                kwargs = {}
                if self.is_last:
                    kwargs = dict(target=targets, losses=self._losses)
                if self.is_first:
                    self._schedule.step(inputs, **kwargs)
                else:
                    self._schedule.step(**kwargs)
        except Exception as e:
            self._fail(e)
        if sync:
            for m in self.module:
                m.sync_gradients()

    def _fail(self, e: Exception) -> None:
        cause = e
        while cause.__cause__ is not None:  # torch's stages wrap the block's own exception
            cause = cause.__cause__
        self._broken = (f"PipelineParallel: stage {self.stage} (rank {self.rank}) failed during the step: "
                        f"{type(cause).__name__}: {str(cause).strip()}. The pipeline's process group is closed "
                        f"so that the other stages fail too instead of waiting; restart from the last checkpoint "
                        f"(torchrun --max-restarts)")
        # gloo closes a group's connections only when its last reference goes (abort() and shutdown()
        # leave them open): the schedule, its stages and the failed frames' pending transfers (held
        # by the traceback) hold it. Drop them all, so the neighbours' waits end now.
        group, self._group, self._schedule = self._group, None, None
        _GROUPS[:] = [g for g in _GROUPS if g is not group]
        link: Optional[BaseException] = e
        while link is not None:
            traceback.clear_frames(link.__traceback__)
            link = link.__cause__ or link.__context__
        with contextlib.suppress(Exception):
            dist.destroy_process_group(group)
        del group
        gc.collect()
        raise RuntimeError(self._broken) from e

    def eval_step(self, inputs: Any = None, targets: Any = None) -> tuple[Optional[Any], Optional[float]]:
        """Forward only, without gradients, the whole batch at once (it need not split into
        micro-batches): ``(outputs, mean loss)`` on the last stage (the loss None without
        ``targets``), ``(None, None)`` elsewhere. Every rank of this replica's pipeline calls it;
        the replicas are independent (each evaluates its own batches)."""
        return forward_only(self, inputs, targets)

    def share_from_last(self, value: Optional[float]) -> float:
        """The last stage's ``value`` on every rank of this replica's pipeline (one broadcast;
        the other ranks pass anything, e.g. None)."""
        t = torch.tensor([float(value) if self.is_last else 0.0], dtype=torch.float64)
        dist.broadcast(t, src=self._pipeline_ranks[-1], group=self._group)
        return float(t)

    # ----- after the step ------------------------------------------------------------------------

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every stage's gradients so that their norm over all stages is at most ``max_norm``
        (one scalar all-reduce); the norm before clipping. Every rank calls it."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        local = torch.zeros((), dtype=torch.float64)
        for g in grads:
            local += g.detach().double().pow(2).sum().cpu()
        dist.all_reduce(local)
        norm = math.sqrt(float(local) / self.replicas)  # each stage is counted once per replica
        if norm > max_norm:
            for g in grads:
                g.mul_(max_norm / (norm + 1e-6))
        return norm

    def export_full_model(self, path: str) -> None:
        """Gather every stage's parameters and buffers to rank 0 and write them, under the unsplit
        model's names, to one safetensors file ``path`` (rank 0 writes; every rank calls it)."""
        mine = {}
        if self.replica == 0:
            for k, s in enumerate(self.stage_ids):
                for j, n in enumerate(self.stage_blocks[s]):
                    for rest, t in self._inner[k][j].state_dict().items():
                        mine[f"{n}.{rest}"] = t.detach().cpu().contiguous()
        parts: Optional[list] = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if self.rank == 0:
            whole = {k: v for part in parts for k, v in part.items()}
            tmp = f"{path}.tmp-{os.getpid()}"
            if os.path.exists(tmp):
                os.remove(tmp)
            write_safetensors(tmp, whole, {})
            os.replace(tmp, path)


def settle_groups() -> None:
    """A barrier on every pipeline group still open, in creation order (every rank calls it, from
    ``shutdown()``). After a transfer returns, gloo's worker threads of its group still drop their
    references to its tensors, which needs the GIL; a process that ends the interpreter first is
    aborted ("terminate called without an active exception"). The barrier waits for them."""
    for g in list(_GROUPS):
        try:
            dist.barrier(group=g)
        except (RuntimeError, ValueError):  # a group a failed stage closed, or a peer that is gone
            pass
    _GROUPS.clear()
