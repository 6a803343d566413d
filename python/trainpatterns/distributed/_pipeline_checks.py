"""Checks that keep a pipeline from hanging on bad input: every rank hears of a problem at once.

A stage that raised inside a schedule would leave its neighbours waiting for a send that never
comes. So before a batch enters the schedule, what can be checked is checked and agreed on:

* the batch itself (a tensor whose rows split into the micro-batches), one flag all-reduced each
  step, which also carries "the shapes changed";
* when the micro-batch's shape or dtype changes (and at the first step), the shapes are walked
  through the stages on the meta device (no compute, no side effects on buffers), each stage's
  owner broadcasting its output's shape or the error it met, and the last stage also trying the
  loss on the targets. A stage whose blocks do not accept the previous stage's output is then a
  clear error on every rank, naming the stage, the shapes and the cause.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

__all__ = ["batch_problem", "micro_spec", "walk_shapes"]


def batch_problem(t: Any, what: str, stage: int, microbatches: int) -> Optional[str]:
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return f"stage {stage} needs {what} as a tensor with a batch dimension, got {type(t).__name__}"
    if t.shape[0] % microbatches:
        return f"the batch of {t.shape[0]} rows does not split into {microbatches} micro-batches"
    return None


def micro_spec(t: torch.Tensor, microbatches: int) -> tuple:
    """(shape, dtype) of one micro-batch of ``t``."""
    return (t.shape[0] // microbatches, *t.shape[1:]), t.dtype


def _spec_of(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape), out.dtype
    if isinstance(out, (tuple, list)) and all(isinstance(o, torch.Tensor) for o in out):
        return [(tuple(o.shape), o.dtype) for o in out]
    raise TypeError(f"a stage must output a tensor or a tuple of tensors, got {type(out).__name__}")


def _meta(spec: Any) -> Any:
    if isinstance(spec, list):
        return tuple(torch.empty(s, dtype=d, device="meta") for s, d in spec)
    shape, dtype = spec
    return torch.empty(shape, dtype=dtype, device="meta")


def _describe(spec: Any) -> str:
    if isinstance(spec, list):
        return ", ".join(_describe(s) for s in spec)
    shape, dtype = spec
    return f"{tuple(shape)} {str(dtype).replace('torch.', '')}"


def _run_meta(module: nn.Module, spec: Any) -> Any:
    """The module's output spec for an input of ``spec``, computed on the meta device."""
    meta = {n: torch.empty_like(t, device="meta") for n, t in
            list(module.named_parameters()) + list(module.named_buffers())}
    x = _meta(spec)
    out = functional_call(module, meta, x if isinstance(x, tuple) else (x,))
    return _spec_of(out)


def _own_stage(module: nn.Module, s: int, blocks: list, spec: Any, target_spec: Any,
               loss_fn: Optional[Callable]) -> tuple:
    """('ok', output spec), ('error', message) or ('skip', None) when a block has no meta kernel."""
    source = "the inputs" if s == 0 else f"stage {s - 1}'s output"
    try:
        out = _run_meta(module, spec)
    except NotImplementedError:
        return "skip", None
    except Exception as e:  # noqa: BLE001 - any failure here is the user's model refusing the shapes
        return "error", (f"stage {s} (blocks {blocks}) cannot take {source} of shape {_describe(spec)}: "
                         f"{type(e).__name__}: {e}")
    if target_spec is not None and loss_fn is not None:
        try:
            loss = loss_fn(_meta(out), _meta(target_spec))
        except NotImplementedError:
            return "skip", None
        except Exception as e:  # noqa: BLE001
            return "error", (f"the loss cannot take the last stage's output {_describe(out)} with targets "
                             f"{_describe(target_spec)}: {type(e).__name__}: {e}")
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return "error", (f"loss_fn must return one number per micro-batch (a mean), got "
                             f"{type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}")
    return "ok", out


def walk_shapes(local: dict, blocks: dict, stages: int, pipeline_ranks: list, my_index: int,
                group: Optional[dist.ProcessGroup], input_spec: Any, target_spec: Any,
                loss_fn: Optional[Callable]) -> Optional[str]:
    """Walk one micro-batch's shapes through the stages of this rank's pipeline; the first error
    met, the same on every rank of the pipeline, or None. ``local`` maps the stage indices this
    rank holds to their modules; stage ``s`` is held by pipeline rank ``s % len(pipeline_ranks)``;
    ``input_spec`` is known on the first stage's rank, ``target_spec`` on the last's."""
    spec = input_spec
    width = len(pipeline_ranks)
    with torch.no_grad():
        for s in range(stages):
            owner = s % width
            msg: list = [None]
            if owner == my_index:
                msg[0] = _own_stage(local[s], s, blocks[s], spec, target_spec if s == stages - 1 else None, loss_fn)
            dist.broadcast_object_list(msg, src=pipeline_ranks[owner], group=group)
            kind, value = msg[0]
            if kind == "skip":
                return None
            if kind == "error":
                return value
            spec = value
    return None
