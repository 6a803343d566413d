"""Where PipelineParallel cuts a model: the cost of each top-level block and the contiguous cut.

A block's cost is its parameter bytes (``balance="params"``, as DeepSpeed's ``PipelineModule``
balances) or its measured forward+backward time on one micro-batch (``balance="time"``: what
actually sets a pipeline's pace). The cut minimises the most expensive stage, so that no stage
holds up the others longer than contiguous blocks allow. Every rank must reach the same cut: the
measured times are averaged over the ranks (one all-reduce) before cutting.
"""
from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["balanced_starts", "block_costs", "cut"]

BALANCES = ("params", "time")


def balanced_starts(sizes: Sequence[float], stages: int) -> list:
    """Start indices of ``stages`` contiguous groups of ``sizes`` minimising the largest group's
    sum (every group non-empty): binary search on the bound, greedy packing."""
    sizes = [float(s) for s in sizes]

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


def _param_bytes(block: nn.Module) -> float:
    return float(sum(p.numel() * p.element_size() for p in block.parameters()))


def _timed_blocks(blocks: list, micro: Any, repeats: int = 3) -> list:
    """Forward+backward seconds of each block on the activations the blocks before it produce
    (best of ``repeats`` after one warm-up). Leaves no trace: gradients, buffers (BatchNorm
    statistics) and the random state are as they were."""
    saved_grads = {id(p): p.grad for b in blocks for p in b.parameters()}
    saved_buffers = [(buf, buf.detach().clone()) for b in blocks for buf in b.buffers()]
    devices = [t.device for t in ([micro] if isinstance(micro, torch.Tensor) else [])
               if t.device.type == "cuda"]
    seconds = []
    with torch.random.fork_rng(devices=devices):
        x = micro
        for block in blocks:
            best = float("inf")
            for _ in range(repeats + 1):
                inp = x.detach().requires_grad_(x.is_floating_point()) if isinstance(x, torch.Tensor) else x
                if devices:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                out = block(inp)
                outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(o, torch.Tensor) and o.requires_grad]
                if outs:
                    torch.autograd.backward([o.float().sum() for o in outs])
                if devices:
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - start)
            seconds.append(best)
            x = out.detach() if isinstance(out, torch.Tensor) else out
    with torch.no_grad():
        for buf, value in saved_buffers:
            buf.copy_(value)
    for b in blocks:
        for p in b.parameters():
            p.grad = saved_grads[id(p)]
    return seconds


def block_costs(model: nn.Sequential, names: list, balance: str, example: Any, microbatches: int) -> list:
    """Each top-level block's cost: parameter bytes, or forward+backward seconds on one micro-batch
    of ``example`` (its first ``rows // microbatches`` rows), averaged over the ranks."""
    blocks = [model.get_submodule(n) for n in names]
    if balance == "params":
        return [_param_bytes(b) for b in blocks]
    if not isinstance(example, torch.Tensor) or example.dim() == 0:
        raise ValueError("balance='time' times each block on a micro-batch: pass example_inputs=, a batch of "
                         f"inputs as a tensor (got {type(example).__name__})")
    rows = max(1, example.shape[0] // microbatches)
    seconds = torch.tensor(_timed_blocks(blocks, example[:rows]), dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(seconds)  # every rank cuts at the same place
        seconds /= dist.get_world_size()
    return seconds.tolist()


def cut(names: list, stages: int, split_points: Optional[Sequence[str]], costs: Optional[list]) -> list:
    """Start index of each stage's blocks: at ``split_points`` (names of the blocks that start
    stages 2, 3, ...), else balanced by ``costs``."""
    if split_points is None:
        return balanced_starts([c if c > 0 else 1e-12 for c in costs], stages)
    points = list(split_points)
    if len(points) != stages - 1:
        raise ValueError(f"split_points must name {stages - 1} block(s) (where stages 2.. start), got {points}")
    unknown = [p for p in points if p not in names]
    if unknown:
        raise ValueError(f"split point(s) {unknown} are not top-level blocks of the model ({names})")
    starts = [0] + [names.index(p) for p in points]
    if starts != sorted(set(starts)) or 0 in starts[1:]:
        raise ValueError(f"split_points {points} must be distinct blocks in model order, after the first")
    return starts
