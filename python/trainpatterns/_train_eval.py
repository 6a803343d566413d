"""The Trainer's evaluation and prediction: one answer on every rank.

Under torchrun each rank scores its own share of the data (a contiguous block of rows of array
data, every ``world``-th batch of an iterable) with rank 0's buffers (BatchNorm running statistics
drift apart between the training forwards that broadcast them), and the sums are all-reduced: the
loss and each metric ``fn(outputs, targets)`` are weighted by batch rows, so the result is the
mean over every example, whatever the batch boundaries and the number of ranks, and bitwise the same
on every rank. Prediction keeps the data's order: the ranks' shards are gathered in rank order.
Under the pipeline strategy a shard is a replica's (its ranks read the same batches), the stages run
forward only (``PipelineParallel.eval_step``) and only the last stage's ranks hold outputs, so the
other ranks add zeros to the sums and nothing to the gathered predictions.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from ._train_data import batch_rows, is_array_data, num_rows, shard
from ._tree import to_device
from .data import PrefetchLoader

__all__ = ["evaluate", "predict"]


def _batches(trainer: Any, data: Any, sharded: bool) -> Iterator[Any]:
    """This rank's batches of ``data`` on the model's device, in order."""
    rank, world = (trainer.shard_rank, trainer.shard_world) if sharded else (0, 1)
    if is_array_data(data):
        mine = shard(data, rank, world) if world > 1 else data
        if num_rows(mine) == 0:
            return
        size = max(trainer.batch_size, 1024)
        with PrefetchLoader(mine, size, shuffle=False, num_threads=trainer.num_threads) as loader:
            for batch in loader:
                yield to_device(batch, trainer.device, non_blocking=True)
        return
    for i, batch in enumerate(data):
        if i % world == rank:
            yield to_device(batch, trainer.device, non_blocking=True)


def _sync_buffers(trainer: Any) -> None:
    sync = getattr(trainer.model, "sync_buffers", None)
    if trainer.world > 1 and sync is not None:
        sync()


def _pair(batch: Any, what: str) -> tuple:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError(f"{what} needs (inputs, targets) batches, got {type(batch).__name__}")


def _as_number(value: Any, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} returned a tensor of shape {tuple(value.shape)}, not one number")
        return value.detach().reshape(()).to(device=device, dtype=torch.float64)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64, device=device)
    raise TypeError(f"metric {name!r} must return a float or a one-element tensor, got {type(value).__name__}")


def _score(trainer: Any, model: Any, batch: Any, names: list) -> Optional[tuple]:
    """(outputs, targets, loss) of one batch (outputs and targets None when only compute_loss is
    needed); None on a pipeline rank that does not hold the last stage."""
    if trainer.strategy == "pipeline":
        inputs, targets = _pair(batch, "strategy='pipeline'")
        outputs, loss = model.eval_step(inputs, targets)
        return None if outputs is None else (outputs, targets, torch.tensor(loss))
    if names or trainer.compute_loss is None:
        inputs, targets = _pair(batch, "metrics=" if names else "loss_fn")
        outputs = model(inputs)
        loss = (trainer.loss_fn(outputs, targets) if trainer.compute_loss is None
                else trainer.compute_loss(model, batch))
        return outputs, targets, loss
    return None, None, trainer.compute_loss(model, batch)


def evaluate(trainer: Any, data: Any, metrics: Mapping[str, Callable]) -> dict:
    """``{"loss": mean loss, name: mean of fn(outputs, targets), ...}`` over every example of
    ``data`` (every rank's shard), in eval mode, without gradients, in the Trainer's precision.
    Every rank must call it; every rank gets the same numbers."""
    _sync_buffers(trainer)
    model = trainer.model
    names = list(metrics)
    sums = torch.zeros(len(names) + 2, dtype=torch.float64, device=trainer.device)  # loss, metrics..., rows
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), trainer.stepper.autocast():
            for batch in _batches(trainer, data, sharded=True):
                n = batch_rows(batch)
                scored = _score(trainer, model, batch, names)
                if scored is None:
                    continue
                outputs, targets, loss = scored
                for i, name in enumerate(names):
                    sums[1 + i] += _as_number(metrics[name](outputs, targets), name, trainer.device) * n
                sums[0] += loss.detach().to(device=trainer.device, dtype=torch.float64) * n
                sums[-1] += n
    finally:
        model.train(was)
    if trainer.world > 1:
        dist.all_reduce(sums)
    values = sums.tolist()
    if values[-1] == 0:
        raise ValueError("the evaluation data yielded no batch")
    out = {"loss": values[0] / values[-1]}
    out.update({name: values[1 + i] / values[-1] for i, name in enumerate(names)})
    return out


def _inputs(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
        return batch[0]
    raise ValueError("predict needs batches of inputs: a tensor, (inputs,) or (inputs, targets)")


def predict(trainer: Any, data: Any) -> Any:
    """The model's outputs for every example of ``data``, in order, on the CPU: one tensor
    (concatenated along the first dimension) when the outputs are tensors, else a list of each
    batch's outputs. Array data is split over the ranks and gathered; an iterable is run whole on
    every rank. Every rank gets the whole result."""
    sharded = trainer.world > 1 and is_array_data(data)
    pipeline = trainer.strategy == "pipeline"
    if trainer.world > 1 and not pipeline:
        _sync_buffers(trainer)
    model = trainer.model
    outputs = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), trainer.stepper.autocast():
            for batch in _batches(trainer, data, sharded=sharded):
                out = model.eval_step(_inputs(batch))[0] if pipeline else model(_inputs(batch))
                if out is not None:
                    outputs.append(to_device(out, torch.device("cpu")))
    finally:
        model.train(was)
    if pipeline and not (sharded or model.replica == 0):
        outputs = []  # every replica ran the whole data: one copy is enough
    if sharded or (pipeline and trainer.world > 1):
        parts: list = [None] * trainer.world
        dist.all_gather_object(parts, outputs)
        outputs = [o for part in parts for o in part]
    if outputs and all(isinstance(o, torch.Tensor) and o.dim() > 0 for o in outputs):
        return torch.cat(outputs)
    return outputs
