"""PipelineParallel: model parallelism by pipeline stages, on ``torch.distributed.pipelining``.

A model too large for one device is cut into stages, one per rank, at boundaries between its
top-level blocks (an ``nn.Sequential``'s children): at the names given, or balanced by parameter
bytes. Each rank keeps only its stage; a batch is cut into micro-batches that stream through the
stages under torch's schedules (GPipe: every forward, then every backward; 1F1B: one forward, one
backward once the pipeline is full, so a stage holds at most ``stages`` micro-batches' activations).
Gradients are those of the batch's mean loss, as in the unsplit model (the schedules scale each
micro-batch's gradient by ``1 / microbatches``).

Each rank's optimizer sees only its stage's parameters; :meth:`PipelineParallel.clip_grad_norm_`
clips by the norm over all stages (one scalar all-reduce). :meth:`named_parameters` keeps the unsplit
model's names, and :meth:`export_full_model` gathers the stages into one safetensors file that the
unsplit model loads.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint._format import write_safetensors

__all__ = ["PipelineParallel"]

_SCHEDULES = ("1f1b", "gpipe")


def _balanced_starts(sizes: list, stages: int) -> list:
    """Start indices of ``stages`` contiguous groups of ``sizes`` minimising the largest group's
    sum (every group non-empty): binary search on the bound, greedy packing."""
    def fits(bound: float) -> Optional[list]:
        starts, total = [0], 0.0
        for i, s in enumerate(sizes):
            if total + s > bound and total > 0:
                starts.append(i)
                total = 0.0
            total += s
        return starts if len(starts) <= stages else None

    lo, hi = max(sizes), sum(sizes)
    for _ in range(60):
        mid = (lo + hi) / 2
        if fits(mid) is None:
            lo = mid
        else:
            hi = mid
    starts = fits(hi)
    # Split the largest groups further until there are exactly ``stages`` (each block stays whole).
    while len(starts) < stages:
        bounds = starts + [len(sizes)]
        k = max((j for j in range(len(starts)) if bounds[j + 1] - bounds[j] > 1),
                key=lambda j: sum(sizes[bounds[j]:bounds[j + 1]]))
        starts.insert(k + 1, bounds[k] + (bounds[k + 1] - bounds[k]) // 2)
    return starts


class PipelineParallel(nn.Module):
    """One rank's stage of ``model`` (an ``nn.Sequential``), run by a pipeline schedule.

    Args:
        model: the whole model, built the same on every rank (only this rank's blocks are kept).
        stages: number of stages (default: the world size; one stage per rank).
        split_points: names of the blocks that start stages 2, 3, ... (``stages - 1`` names).
        balance: ``"params"``: without ``split_points``, cut so that the stages' parameter bytes are
            as equal as contiguous blocks allow.
        microbatches: micro-batches per batch (must divide the batch).
        schedule: ``"1f1b"`` or ``"gpipe"``.
        loss_fn: ``loss_fn(outputs, targets)`` of one micro-batch, a mean over its examples.
    """

    def __init__(self, model: nn.Module, *, stages: Optional[int] = None, split_points: Optional[Sequence[str]] = None,
                 balance: str = "params", microbatches: int = 4, schedule: str = "1f1b",
                 loss_fn: Optional[Callable] = None) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("PipelineParallel runs under torchrun: call trainpatterns.init_from_env() first")
        if not isinstance(model, nn.Sequential):
            raise TypeError(f"PipelineParallel splits an nn.Sequential at its top-level blocks, got {type(model).__name__}")
        if schedule not in _SCHEDULES:
            raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
        if balance != "params":
            raise ValueError(f"balance must be 'params', got {balance!r}")
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"microbatches must be an int >= 1, got {microbatches!r}")
        if loss_fn is None:
            raise ValueError("PipelineParallel needs loss_fn(outputs, targets) for the last stage")
        self.rank, world = dist.get_rank(), dist.get_world_size()
        self.stages = world if stages is None else stages
        if self.stages != world:
            raise ValueError(f"stages={self.stages} but the job has {world} ranks (one stage per rank)")
        names = [n for n, _ in model.named_children()]
        if self.stages > len(names):
            raise ValueError(f"{self.stages} stages but the model has only {len(names)} top-level blocks")
        starts = self._starts(model, names, split_points)
        self.stage = self.rank
        bounds = starts + [len(names)]
        mine = names[bounds[self.rank]:bounds[self.rank + 1]]
        self.block_names = mine
        self.module = nn.Sequential(*[model.get_submodule(n) for n in mine])
        self._names = {f"{k}.{rest}": f"{n}.{rest}" for k, n in enumerate(mine)
                       for rest, _ in model.get_submodule(n).named_parameters()}
        self.microbatches = microbatches
        # Imported here: torch.distributed.pipelining takes ~0.8 s to import, which every
        # `import trainpatterns` would otherwise pay.
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        device = next(self.module.parameters(), torch.empty(0)).device
        self._stage = PipelineStage(self.module, self.rank, self.stages, device)
        kind = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        self._schedule = kind(self._stage, n_microbatches=microbatches, loss_fn=loss_fn)

    def _starts(self, model: nn.Sequential, names: list, split_points: Optional[Sequence[str]]) -> list:
        if split_points is not None:
            points = list(split_points)
            if len(points) != self.stages - 1:
                raise ValueError(f"split_points must name {self.stages - 1} block(s) (where stages 2.. start), "
                                 f"got {points}")
            unknown = [p for p in points if p not in names]
            if unknown:
                raise ValueError(f"split point(s) {unknown} are not top-level blocks of the model ({names})")
            starts = [0] + [names.index(p) for p in points]
            if starts != sorted(set(starts)) or 0 in starts[1:]:
                raise ValueError(f"split_points {points} must be distinct blocks in model order, after the first")
            return starts
        sizes = [float(sum(p.numel() * p.element_size() for p in model.get_submodule(n).parameters()) or 1)
                 for n in names]
        return _balanced_starts(sizes, self.stages)

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.stages - 1

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        """This stage's parameters under the unsplit model's names."""
        for local, p in self.module.named_parameters():
            yield prefix + self._names[local], p

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self.module.parameters()

    def step(self, inputs: Any = None, targets: Any = None) -> Optional[float]:
        """Run one batch through the schedule (forward and backward of every micro-batch); the
        batch's mean loss on the last stage, None elsewhere. Every rank calls it; only the first
        stage needs ``inputs`` and only the last ``targets``."""
        problem = (self._check_batch(inputs, "inputs") if self.is_first else None) or (
            self._check_batch(targets, "targets") if self.is_last else None)
        # Every stage hears of a refused batch (one scalar all-reduce), so none waits for it.
        flag = torch.tensor([1.0 if problem else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise ValueError(problem or "another stage refused the batch (its error names why)")
        losses: list = []
        if self.is_first and self.is_last:
            self._schedule.step(inputs, target=targets, losses=losses)
        elif self.is_first:
            self._schedule.step(inputs)
        elif self.is_last:
            self._schedule.step(target=targets, losses=losses)
        else:
            self._schedule.step()
        if not self.is_last:
            return None
        return float(sum(float(v) for v in losses) / len(losses))

    def _check_batch(self, t: Any, what: str) -> Optional[str]:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return f"stage {self.stage} needs {what} as a tensor with a batch dimension, got {type(t).__name__}"
        if t.shape[0] % self.microbatches:
            return f"the batch of {t.shape[0]} rows does not split into {self.microbatches} micro-batches"
        return None

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale every stage's gradients so that their norm over all stages is at most ``max_norm``
        (one scalar all-reduce); the norm before clipping. Every rank calls it."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        local = torch.zeros((), dtype=torch.float64)
        for g in grads:
            local += g.detach().double().pow(2).sum().cpu()
        dist.all_reduce(local)
        norm = math.sqrt(float(local))
        if norm > max_norm:
            for g in grads:
                g.mul_(max_norm / (norm + 1e-6))
        return norm

    def export_full_model(self, path: str) -> None:
        """Gather every stage's parameters and buffers to rank 0 and write them, under the unsplit
        model's names, to one safetensors file ``path`` (rank 0 writes; every rank calls it)."""
        mine = {}
        for k, n in enumerate(self.block_names):
            for rest, t in self.module[k].state_dict().items():
                mine[f"{n}.{rest}"] = t.detach().cpu().contiguous()
        parts: list = [None] * self.stages if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if self.rank == 0:
            whole = {k: v for part in parts for k, v in part.items()}
            tmp = f"{path}.tmp-{os.getpid()}"
            if os.path.exists(tmp):
                os.remove(tmp)
            write_safetensors(tmp, whole, {})
            os.replace(tmp, path)
