"""The Trainer: one training loop that ties the patterns together.

``Trainer(model, loss_fn, optimizer, train_data, ...).fit()`` trains by virtual epochs
(:class:`~trainpatterns.checkpoint.VirtualEpochs`: a budget in examples cut into a fixed number of
checkpoint intervals), feeds array data through the native
:class:`~trainpatterns.data.PrefetchLoader` (any iterable of batches otherwise), saves the full
training state at every virtual epoch through :class:`~trainpatterns.checkpoint.CheckpointManager`,
resumes automatically from ``checkpoint_dir``, validates per virtual epoch, keeps the best
checkpoint by validation loss, appends one JSON line of metrics per virtual epoch to
``metrics.jsonl``, and shows a tqdm bar (loss, samples/s, ETA). Everything else is a callback
(:mod:`trainpatterns.callbacks`).

Exact resume: with array data the loader position, the RNG states, the optimizer, the scheduler,
the plan and the callbacks' state are all in the checkpoint, so a resumed run continues with the
batches the uninterrupted one would have seen. With an arbitrary iterable the loop restarts it.
A resume also cuts ``metrics.jsonl`` back to the records up to the restored step (a killed run may
have left a torn line or records of epochs that run again), so the file reads as one run's.

Distributed (torchrun): when ``torch.distributed`` is initialised with more than one process, the
model is wrapped in ``trainpatterns.distributed.SyncDataParallel`` (gradients averaged by bucketed
all-reduce; frozen parameters are not communicated), each rank reads its own contiguous shard of
array data, ``train_loss`` is the mean over every rank's steps, and only rank 0 shows progress
and writes ``metrics.jsonl`` (the CheckpointManager coordinates the ranks' saves). Under
``torchrun --max-restarts`` each incarnation resumes from the newest checkpoint every rank can read,
so a run that lost a rank ends as the uninterrupted one would have (bitwise on CPU).
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from . import _metrics_log
from ._train_data import batch_rows, is_array_data, num_rows, shard
from ._tree import to_device
from ._world import rank_and_world
from .callbacks import Callback
from .checkpoint import CheckpointError, CheckpointManager, VirtualEpochs
from .data import PrefetchLoader
from .distributed import SyncDataParallel
from .optim import FusedAdamW
from .overfit import disable_regularization, max_error

__all__ = ["Trainer"]

def _first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type name when the message is empty): what the
    one-line error reports of the Trainer and the command line show."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class _Stateful:
    """Adapts a getter/setter pair to the state_dict protocol the CheckpointManager saves."""

    def __init__(self, get: Callable[[], dict], put: Callable[[dict], None]) -> None:
        self._get, self._put = get, put

    def state_dict(self) -> dict:
        return self._get()

    def load_state_dict(self, state: dict) -> None:
        self._put(state)


class Trainer:
    """Train ``model`` by virtual epochs with checkpoints, validation, progress and callbacks.

    Args:
        model: the module to train (its device is where batches go).
        loss_fn: ``loss_fn(model(inputs), targets)`` for batches ``(inputs, targets)``; for other
            batch layouts pass ``compute_loss``.
        optimizer: a torch or trainpatterns optimizer; None: ``FusedAdamW(lr=1e-3)`` over the
            trainable parameters.
        train_data: array data (a tensor/array, or a tuple/list/dict of them with one row per
            example: read by the native PrefetchLoader, shuffled, endless) or any re-iterable of
            batches (restarted when exhausted).
        val_data: the same kinds, for the validation loss after every virtual epoch (optional).
        checkpoint_dir: where checkpoints and ``metrics.jsonl`` go; None: no checkpoints.
        plan: a VirtualEpochs; default for array data: 10 passes in 10 virtual epochs.
        batch_size: rows per step for array data (default the plan's, else 32).
        scheduler: an LR scheduler stepped after every optimizer step (saved with the state).
        callbacks: :class:`~trainpatterns.callbacks.Callback` objects.
        compute_loss: ``compute_loss(model, batch) -> loss`` replacing the ``(inputs, targets)`` rule.
        interpolation: interpolation mode for noise-free complete data: dropout and weight decay are
            switched off and ``max_error`` (worst absolute error over the whole training data) is
            reported every virtual epoch (see :mod:`trainpatterns.overfit`).
        keep_last, keep_best: checkpoint retention (the best by ``val_loss``, or ``train_loss``
            without validation data).
        resume: restore the latest good checkpoint from ``checkpoint_dir`` at ``fit()`` (default).
        progress: show the tqdm bar (rank 0 only).
        seed: the loader's shuffling seed.
        num_threads: the loader's gather threads.
        async_save: write checkpoints in the background.
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable], optimizer: Optional[torch.optim.Optimizer],
                 train_data: Any, val_data: Any = None, checkpoint_dir: Optional[str] = None, plan: Any = None, *,
                 batch_size: Optional[int] = None, scheduler: Any = None, callbacks: Sequence[Callback] = (),
                 compute_loss: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
                 interpolation: bool = False, keep_last: int = 3, keep_best: int = 1, resume: bool = True,
                 progress: bool = True, seed: int = 0, num_threads: Optional[int] = None,
                 async_save: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if loss_fn is None and compute_loss is None:
            raise ValueError("give loss_fn (called as loss_fn(model(inputs), targets)) or compute_loss")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be trainpatterns.Callback instances, got {type(cb).__name__}")
        self.module = model
        self.loss_fn = loss_fn
        self.compute_loss = compute_loss
        self.scheduler = scheduler
        self.callbacks = list(callbacks)
        self.interpolation = bool(interpolation)
        self.progress = bool(progress)
        self.resume = bool(resume)
        self.seed = seed
        self.num_threads = num_threads
        self.stop_training = False
        self.history: list = []
        self.best: Optional[dict] = None  # metrics of the best virtual epoch so far
        self.step = 0
        self.epoch = 0
        ref = next(model.parameters(), None)
        self.device = ref.device if ref is not None else torch.device("cpu")

        if optimizer is None:
            optimizer = FusedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        self.optimizer = optimizer
        if self.interpolation:
            disable_regularization(model, optimizer)

        self.rank, self.world = rank_and_world()
        self._array_train = is_array_data(train_data)
        if self._array_train:
            n = num_rows(train_data)
            if n == 0:
                raise ValueError("train_data has no rows")
        elif not isinstance(train_data, Iterable):
            raise TypeError(f"train_data must be array data or an iterable of batches, got {type(train_data).__name__}")
        if val_data is not None and not is_array_data(val_data) and not isinstance(val_data, Iterable):
            raise TypeError(f"val_data must be array data or an iterable of batches, got {type(val_data).__name__}")
        if plan is not None and batch_size is not None and plan.batch_size != batch_size:
            raise ValueError(f"batch_size {batch_size} differs from the plan's {plan.batch_size}")
        self.batch_size = batch_size or (plan.batch_size if plan is not None else 32)
        if self._array_train and n < self.batch_size:
            raise ValueError(f"train_data has {n} rows, fewer than one batch of {self.batch_size}")
        if plan is None:
            if not self._array_train:
                raise ValueError("an iterable train_data needs plan=VirtualEpochs(num_examples, batch_size, ...)")
            plan = VirtualEpochs(n, self.batch_size, stop_point=10, num_checkpoints=10)
        self.plan = plan
        self.train_data = train_data
        self.val_data = val_data
        self.loader = None
        if self._array_train:
            mine = shard(train_data, self.rank, self.world) if self.world > 1 else train_data
            if num_rows(mine) < self.batch_size:
                raise ValueError(f"train_data has {num_rows(mine)} rows per process, fewer than one batch of "
                                 f"{self.batch_size}")
            self.loader = PrefetchLoader(mine, self.batch_size, shuffle=True, seed=seed, drop_last=True,
                                         epochs=None, num_threads=num_threads, device=self._loader_device())
        self.model = self._wrap(model)

        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        self.manager = None
        self.metric = "val_loss" if val_data is not None else "train_loss"
        if self.checkpoint_dir is not None:
            self.manager = CheckpointManager(self.checkpoint_dir, keep_last=keep_last, keep_best=keep_best,
                                             metric=self.metric if keep_best else None, mode="min",
                                             async_save=async_save, per_rank=["loader"])

    # ----- setup helpers -------------------------------------------------------------------------

    def _loader_device(self):
        return self.device if self.device.type == "cuda" else None

    def _wrap(self, model: nn.Module) -> nn.Module:
        """SyncDataParallel under torchrun (world size > 1), the model itself otherwise."""
        if self.world == 1:
            return model
        return SyncDataParallel(model)

    def _state(self) -> dict:
        """What a checkpoint holds, in restore order: callbacks first (they may reshape the
        optimizer's groups before its state is loaded), then model, optimizer, the rest."""
        state = {
            "callbacks": _Stateful(lambda: {str(i): cb.state_dict() for i, cb in enumerate(self.callbacks)},
                                   self._load_callbacks),
            "model": self.module,
            "optimizer": self.optimizer,
            "plan": self.plan,
            "trainer": _Stateful(lambda: {"best": self.best or {}, "history": self.history}, self._load_trainer),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        if self.loader is not None:
            state["loader"] = self.loader
        return state

    def _load_callbacks(self, state: dict) -> None:
        for i, cb in enumerate(self.callbacks):
            if str(i) in state:
                cb.load_state_dict(state[str(i)])

    def _load_trainer(self, state: dict) -> None:
        self.best = dict(state["best"]) or None
        self.history = list(state["history"])

    # ----- the loop ------------------------------------------------------------------------------

    def _loss(self, batch: Any) -> torch.Tensor:
        if self.compute_loss is not None:
            return self.compute_loss(self.model, batch)
        if isinstance(batch, (tuple, list)) and len(batch) == 2:
            return self.loss_fn(self.model(batch[0]), batch[1])
        raise ValueError("batches must be (inputs, targets) pairs for loss_fn(model(inputs), targets); "
                         "for other layouts pass compute_loss=lambda model, batch: ...")

    def _batches(self):
        """Endless training batches on the model's device."""
        if self.loader is not None:
            for batch in self.loader:
                yield batch if self.loader.device is not None else to_device(batch, self.device, non_blocking=True)
            return
        while True:
            empty = True
            for batch in self.train_data:
                empty = False
                yield to_device(batch, self.device, non_blocking=True)
            if empty:
                raise ValueError("train_data yielded no batch")

    def restore(self) -> Optional[int]:
        """Restore the newest checkpoint every rank can read; the step restored from, or None for a
        fresh run. ``metrics.jsonl`` is then cut back to the records up to that step (rank 0). A
        checkpoint that does not fit this model/optimizer raises ValueError (nothing is saved)."""
        if self.manager is None:
            return None
        try:
            step = self.manager.restore(self._state())
        except CheckpointError as e:
            raise ValueError(f"cannot resume from {self.checkpoint_dir}: {_first_line(e)}") from e
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"checkpoint directory {self.checkpoint_dir} does not fit this model/optimizer "
                             f"({_first_line(e)})") from e
        if step is not None:
            self._tidy_metrics(step)
        return step

    def fit(self) -> list:
        """Train until the plan's budget is spent (or a callback sets ``stop_training``); returns
        the per-virtual-epoch metrics (the history, resumed runs included)."""
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if self.resume and self.restore() is None:
            self._tidy_metrics(0)  # no checkpoint committed: records a killed run wrote start again
        self.step, self.epoch = self.plan.step, self.plan.epoch
        bar = self._progress_bar()
        batches = self._batches()
        try:
            for vepoch in self.plan:
                self.epoch = vepoch.index
                for cb in self.callbacks:
                    cb.on_epoch_start(self, vepoch.index)
                self.model.train()
                total = torch.zeros((), dtype=torch.float64, device=self.device)
                count, rows, t0 = 0, 0, time.perf_counter()
                for step in vepoch:
                    batch = next(batches)
                    loss = self._loss(batch)
                    if loss.dim() != 0:
                        raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
                    self.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    self.optimizer.step()
                    if self.scheduler is not None:
                        self.scheduler.step()
                    detached = loss.detach()
                    total += detached
                    count += 1
                    rows += batch_rows(batch)
                    self.step = step + 1
                    for cb in self.callbacks:
                        cb.on_step_end(self, self.step, detached)
                    if bar is not None and (count % 10 == 0 or count == len(vepoch) or count == 1):
                        elapsed = time.perf_counter() - t0
                        bar.set_postfix(loss=f"{float(total) / count:.4g}",
                                        samples_s=f"{rows * self.world / max(elapsed, 1e-9):,.0f}",
                                        vepoch=f"{vepoch.index + 1}/{self.plan.num_epochs}", refresh=False)
                    if bar is not None:
                        bar.update(1)
                if count == 0:
                    continue
                elapsed = time.perf_counter() - t0
                metrics = self._epoch_metrics(vepoch.index, self._mean_over_ranks(total, count), rows, elapsed)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, vepoch.index, metrics)
                self.history.append(metrics)
                self._save(metrics)
                self._write_metrics(metrics)
                if self.stop_training:
                    break
        finally:
            if bar is not None:
                bar.close()
            batches.close()
            if self.loader is not None:
                self.loader.close()
            if self.manager is not None:
                self.manager.wait()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.history

    def _mean_over_ranks(self, total: torch.Tensor, count: int) -> float:
        """The virtual epoch's mean training loss over every rank's steps: the same number on every
        rank, so that callbacks and the best-checkpoint choice decide alike everywhere."""
        if self.world == 1:
            return float(total) / count
        both = torch.stack([total, total.new_tensor(float(count))])  # float64, on the model's device
        torch.distributed.all_reduce(both)
        return float(both[0]) / float(both[1])

    def _epoch_metrics(self, index: int, train_loss: float, rows: int, elapsed: float) -> dict:
        metrics = {"epoch": index + 1, "step": self.step, "train_loss": train_loss}
        if self.val_data is not None:
            metrics["val_loss"] = self.evaluate(self.val_data)
        if self.interpolation:
            metrics["max_error"] = self._train_max_error()
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["samples_per_s"] = rows * self.world / max(elapsed, 1e-9)
        metrics["time_s"] = elapsed
        value = metrics.get(self.metric)
        is_best = value is not None and math.isfinite(value) and (
            self.best is None or value < self.best.get(self.metric, math.inf))
        if is_best:
            self.best = {k: metrics[k] for k in ("epoch", "step", self.metric)}
        metrics["best"] = bool(is_best)
        return metrics

    def evaluate(self, data: Any) -> float:
        """Mean loss over ``data`` (array data or an iterable of batches), weighted by batch rows,
        in eval mode without gradients."""
        was = self.model.training
        self.model.eval()
        total, rows = 0.0, 0
        try:
            with torch.no_grad():
                for batch in self._eval_batches(data):
                    n = batch_rows(batch)
                    total += float(self._loss(batch)) * n
                    rows += n
        finally:
            self.model.train(was)
        if rows == 0:
            raise ValueError("the validation data yielded no batch")
        return total / rows

    def _eval_batches(self, data: Any):
        if is_array_data(data):
            with PrefetchLoader(data, max(self.batch_size, 1024), shuffle=False, num_threads=self.num_threads) as ld:
                for batch in ld:
                    yield to_device(batch, self.device, non_blocking=True)
        else:
            for batch in data:
                yield to_device(batch, self.device, non_blocking=True)

    def _train_max_error(self) -> float:
        data = self.train_data
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and is_array_data(data)):
            raise ValueError("interpolation mode needs train_data as (inputs, targets) arrays for max_error")
        x, y = (torch.as_tensor(a) for a in data)
        return max_error(self.module, x, y)

    # ----- checkpoints, metrics, progress --------------------------------------------------------

    def _save(self, metrics: dict) -> None:
        if self.manager is None:
            return
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.manager.save(self._state(), step=self.step, metrics=numbers)

    @property
    def metrics_path(self) -> Optional[str]:
        return None if self.checkpoint_dir is None else os.path.join(self.checkpoint_dir, "metrics.jsonl")

    def _write_metrics(self, metrics: dict) -> None:
        if self.metrics_path is not None and self.rank == 0:
            _metrics_log.append(self.metrics_path, metrics)

    def _tidy_metrics(self, step: int) -> None:
        """Make ``metrics.jsonl`` hold this run's records up to ``step`` and nothing after (rank 0):
        a killed run may have left a torn last line, records past its last checkpoint, or none for
        that checkpoint's own virtual epoch; this run writes the ones after ``step`` again."""
        if self.metrics_path is not None and self.rank == 0:
            _metrics_log.tidy(self.metrics_path, step, self.history)

    def _progress_bar(self):
        if not self.progress or self.rank != 0:
            return None
        return tqdm(total=self.plan.total_steps, initial=self.plan.step, unit="step", dynamic_ncols=True,
                    desc="train", leave=True)

    def restore_best(self) -> Optional[int]:
        """Load the best checkpoint's weights into the model (warm start / final model); its step."""
        if self.manager is None:
            raise ValueError("restore_best needs checkpoint_dir")
        self.manager.wait()
        best = [i for i in self.manager.list() if i.valid]
        if not best:
            return None
        self.manager.load_weights(self.module, "best", key="model")
        return self.best["step"] if self.best else None
