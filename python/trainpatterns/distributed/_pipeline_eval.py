"""Forward-only passes through a pipeline, for evaluation and prediction.

Evaluation needs no micro-batches (no activations are kept for a backward, so there is no bubble to
fill) and its batches need not split into them (the last batch of a data set rarely does). So the
whole batch goes through the stages in order over ``torch.distributed`` point-to-point messages: each
stage boundary sends the activation's shape and dtype (a small object message), then the tensor.
The last stage computes the outputs and, with targets, the loss; one scalar all-reduce at the end
tells every rank whether the loss failed, so none waits on a rank that raised.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from ._pipeline_checks import batch_problem

__all__ = ["forward_only"]


def _send(x: Any, dst: int, group: Any) -> None:
    tensors = list(x) if isinstance(x, (tuple, list)) else [x]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        raise TypeError(f"a stage must output a tensor or a tuple of tensors, got {type(x).__name__}")
    dist.send_object_list([[(tuple(t.shape), t.dtype) for t in tensors], isinstance(x, (tuple, list))], dst=dst,
                          group=group)
    for t in tensors:
        dist.send(t.contiguous(), dst=dst, group=group)


def _recv(src: int, group: Any, device: torch.device) -> Any:
    meta: list = [None, None]
    dist.recv_object_list(meta, src=src, group=group)
    specs, is_tuple = meta
    tensors = []
    for shape, dtype in specs:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=src, group=group)
        tensors.append(t)
    return tuple(tensors) if is_tuple else tensors[0]


def forward_only(pp: Any, inputs: Any, targets: Any) -> tuple[Optional[Any], Optional[float]]:
    """(outputs, mean loss or None without targets) on the last stage, (None, None) elsewhere."""
    if pp._broken:
        raise RuntimeError(pp._broken)
    # The flags go round this replica's pipeline only: replicas may hold different numbers of batches.
    problem = batch_problem(inputs, "inputs", 0, 1) if pp.is_first else None
    flag = torch.tensor([1.0 if problem else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pp._group)
    if flag.item():
        raise ValueError(problem or "the first stage refused the batch (its error names why)")
    ranks, width = pp._pipeline_ranks, len(pp._pipeline_ranks)
    local = dict(zip(pp.stage_ids, pp._inner))
    x, outputs, error, loss = inputs, None, None, None
    try:
        with torch.no_grad():
            for s in range(pp.stages):
                owner = s % width
                if owner != pp._index:
                    continue
                if s > 0 and (s - 1) % width != owner:
                    x = _recv(ranks[(s - 1) % width], pp._group, pp._device)
                x = local[s](x)
                if s < pp.stages - 1 and (s + 1) % width != owner:
                    _send(x, ranks[(s + 1) % width], pp._group)
            if pp.is_last:
                outputs = x
                if targets is not None:
                    try:
                        loss = float(pp._loss_fn(outputs, targets))
                    except Exception as e:  # noqa: BLE001 - told to every rank below
                        error = f"the loss failed on the last stage: {type(e).__name__}: {e}"
    except Exception as e:
        pp._fail(e)
    flag = torch.tensor([1.0 if error else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=pp._group)
    if flag.item():
        raise ValueError(error or "the last stage could not compute the loss (its error names why)")
    return outputs, loss
