"""The Trainer: one training loop that ties the patterns together.

``Trainer(model, loss_fn, optimizer, train_data, ...).fit()`` trains by virtual epochs
(:class:`~trainpatterns.checkpoint.VirtualEpochs`: a budget in examples cut into a fixed number of
checkpoint intervals), feeds array data through the native :class:`~trainpatterns.data.PrefetchLoader`
(any iterable of batches otherwise), saves the full training state at every virtual epoch through
:class:`~trainpatterns.checkpoint.CheckpointManager`, resumes automatically from ``checkpoint_dir``,
validates per virtual epoch (the loss and the user's ``metrics``), keeps the best checkpoint by
``monitor``/``mode``, appends one JSON line per virtual epoch to ``metrics.jsonl``, says one summary
line per virtual epoch and shows a tqdm bar. The step is in :mod:`._train_step`, the scheduler's
stepping in :mod:`._schedule`, evaluation in :mod:`._train_eval`; everything else is a callback
(:mod:`trainpatterns.callbacks`, :mod:`.loggers`).

Exact resume: with array data the loader position, the RNG states, the optimizer, the scheduler,
the GradScaler, the plan and the callbacks' state are all in the checkpoint, so a resumed run
continues with the batches the uninterrupted one would have seen. ``metrics.jsonl`` is cut back to
the records up to the restored step (a killed run may have left a torn line or records of epochs
that run again), so the file reads as one run's.

Distributed (torchrun): with ``WORLD_SIZE > 1`` the Trainer joins the job itself, wraps the model
in :class:`~trainpatterns.distributed.SyncDataParallel`, gives each rank its contiguous shard of
array data, and makes every decision once: the metrics of a virtual epoch are reduced over the ranks
and rank 0's record is the one every rank acts on (best checkpoint, schedulers, callbacks), and the
run stops when any rank's callbacks ask. Only rank 0 speaks and writes ``metrics.jsonl``; other
strategies (parameter servers, pipeline stages) keep this loop and swap its step.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from . import _metrics_log, _schedule, _train_async, _train_eval, _train_pipeline
from ._train_data import is_array_data, num_rows, shard
from ._train_progress import Progress, Speaker, summary
from ._train_setup import (Stateful, check_data, check_metrics, check_monitor, default_plan, join_torchrun,
                           one_line, split_batch)
from ._train_step import Stepper, finish_interpolation
from ._tree import to_device
from ._world import agree, any_rank, mean_over_ranks, rank_and_world
from .callbacks import Callback, EarlyStopping, callback_states, load_callback_states
from .checkpoint import CheckpointError, CheckpointManager
from .data import PrefetchLoader
from .distributed import SyncDataParallel
from .optim import FusedAdamW
from .overfit import disable_regularization, max_error

__all__ = ["Trainer"]

_RECORD_KEYS = ("epoch", "step", "train_loss", "val_loss", "max_error", "lr", "samples_per_s", "time_s",
                "elapsed_s", "best")


class Trainer:
    """Train ``model`` by virtual epochs with checkpoints, validation, metrics, progress and callbacks.

    Args:
        model: the module to train (its device is where batches go).
        loss_fn: ``loss_fn(model(inputs), targets)`` for batches ``(inputs, targets)``; for other
            batch layouts pass ``compute_loss``.
        optimizer: a torch or trainpatterns optimizer; None: ``FusedAdamW(lr=1e-3)`` over the
            trainable parameters.
        train_data: array data (a tensor/array, or a tuple/list/dict of them with one row per
            example: read by the native PrefetchLoader, shuffled, endless; each rank reads its own
            contiguous shard) or any re-iterable of batches (restarted when exhausted; each rank
            iterates its own).
        val_data: the same kinds, evaluated after every virtual epoch (split over the ranks).
        checkpoint_dir: where checkpoints and ``metrics.jsonl`` go; None: no checkpoints.
        plan: a VirtualEpochs counting examples over all ranks (its ``batch_size`` is the global
            batch); default for array data: 10 passes in 10 virtual epochs.
        batch_size: rows per rank per micro-batch (default: from ``global_batch_size`` or the plan,
            else 32).
        global_batch_size: examples per optimizer step over all ranks: ``batch_size * world size *
            accumulate``; give this or ``batch_size``.
        scheduler: an LR scheduler, saved with the state, stepped as ``scheduler_interval`` says.
        scheduler_interval: ``"step"`` (after every optimizer step, the default) or ``"epoch"`` (once
            per virtual epoch); a ``ReduceLROnPlateau`` is stepped once per virtual epoch with the
            ``monitor`` value either way.
        callbacks: :class:`~trainpatterns.callbacks.Callback` objects (``EarlyStopping``...).
        metrics: ``{name: fn(outputs, targets) -> float}`` computed on validation data, weighted
            by rows over every batch and rank, recorded under ``name``.
        monitor, mode: the record key (``"val_loss"`` by default, ``"train_loss"`` without
            validation data) and direction (``"min"``/``"max"``) that pick the best checkpoint and
            feed metric-driven schedulers.
        accumulate: micro-batches per optimizer step (gradients summed locally, all-reduced once).
        precision: ``"bf16"`` or ``"fp16"`` autocast (fp16 with a GradScaler); None or "fp32": none.
        compute_loss: ``compute_loss(model, batch) -> loss`` replacing the ``(inputs, targets)`` rule.
        interpolation: interpolation mode for noise-free complete data: dropout and weight decay off,
            ``max_error`` (worst absolute error over the whole training data) every virtual epoch.
        interpolation_finish: in interpolation mode, end the plan's last virtual epoch with
            :func:`~trainpatterns.overfit.lbfgs_finish` on the whole training data (True: its
            defaults; a dict: its keyword arguments; False: no finish).
        keep_last, keep_best: checkpoint retention (the best by ``monitor``).
        resume: restore the latest good checkpoint from ``checkpoint_dir`` at ``fit()`` (default).
        rescale_schedule: when a resume restores a scheduler whose length (``T_max``,
            ``total_iters``) differs from the one built, continue on the one built (warned otherwise).
        progress: show the tqdm bar (rank 0). The summary lines are INFO records of the
            ``trainpatterns.train`` logger, written above the bar when logging would not show them.
        seed: the loader's shuffling seed.  num_threads: the loader's gather threads.
        async_save: write checkpoints in the background.
        strategy: under torchrun, ``"sync"`` (SyncDataParallel, the default), ``"async"`` (parameter
            servers, ``async_options``: :mod:`._train_async`) or ``"pipeline"`` (an ``nn.Sequential``
            in stages, ``pipeline_options``: :mod:`._train_pipeline`).
    """

    def __init__(self, model: nn.Module, loss_fn: Optional[Callable], optimizer: Optional[torch.optim.Optimizer],
                 train_data: Any, val_data: Any = None, checkpoint_dir: Optional[str] = None, plan: Any = None, *,
                 batch_size: Optional[int] = None, global_batch_size: Optional[int] = None, scheduler: Any = None,
                 scheduler_interval: str = "step",
                 callbacks: Sequence[Callback] = (), metrics: Optional[Mapping[str, Callable]] = None,
                 monitor: Optional[str] = None, mode: str = "min", accumulate: int = 1,
                 precision: Optional[str] = None, compute_loss: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None,
                 interpolation: bool = False, interpolation_finish: Union[bool, Mapping] = True, keep_last: int = 3, keep_best: int = 1, resume: bool = True,
                 rescale_schedule: bool = False, progress: bool = True, seed: int = 0,
                 num_threads: Optional[int] = None, async_save: bool = True, strategy: str = "sync",
                 async_options: Optional[Mapping] = None, pipeline_options: Optional[Mapping] = None) -> None:
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
        self.scheduling = _schedule.SchedulerStepping(scheduler, scheduler_interval)
        self.callbacks = list(callbacks)
        self.metrics = check_metrics(metrics, _RECORD_KEYS)
        self.interpolation = bool(interpolation)
        self.finish = dict(interpolation_finish) if isinstance(interpolation_finish, Mapping) else (
            {} if interpolation_finish else None)
        self.progress = bool(progress)
        self.resume = bool(resume)
        self.rescale_schedule = bool(rescale_schedule)
        self.seed = seed
        self.num_threads = num_threads
        self.stop_training = False
        self.history: list = []
        self.best: Optional[dict] = None  # the best virtual epoch's epoch, step and monitored value
        self.step = 0
        self.epoch = 0
        ref = next(model.parameters(), None)
        self.device = ref.device if ref is not None else torch.device("cpu")

        if strategy not in ("sync", "async", "pipeline"):
            raise ValueError(f"strategy must be 'sync', 'async' or 'pipeline', got {strategy!r}")
        if strategy == "pipeline":
            pipeline_options = _train_pipeline.check(pipeline_options, scheduler, accumulate, compute_loss,
                                                     interpolation)
        if strategy == "async" and (scheduler is not None or scheduler_interval != "step"):
            raise ValueError("strategy='async': the servers step the scheduler after every update; pass async_options="
                             "{'scheduler': lambda optimizer: ...} instead of scheduler= (and no scheduler_interval)")
        self.strategy = strategy
        joined = None
        if strategy == "async":  # no process group: the servers talk over RPC; each process on its own
            where = _train_async.place(async_options)
            self.rank, self.world = (-1 if where.is_server else where.worker), 1
            part, parts = (0, 1) if where.is_server else (where.worker, where.workers)
        else:
            joined = join_torchrun(self.device)
            self.rank, self.world = rank_and_world()
            part, parts = self.rank, self.world
            if strategy == "pipeline":  # the ranks of one pipeline read the same batches
                part, parts = _train_pipeline.place(pipeline_options, self.rank, self.world)
        self.shard_rank, self.shard_world = (part, parts) if strategy == "pipeline" else (self.rank, self.world)
        self.say = Speaker(self.rank, self.progress)
        if joined:
            self.say(joined)
        if optimizer is None:
            optimizer = FusedAdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        self.optimizer = optimizer
        if self.interpolation:
            disable_regularization(model, optimizer)
        self._array_train = check_data(train_data, val_data)
        self.batch_size, self.global_batch_size = split_batch(
            batch_size, global_batch_size, plan.batch_size if plan is not None else None,
            parts if strategy == "pipeline" else self.world, accumulate)
        self.plan = plan if plan is not None else default_plan(train_data, self._array_train, self.global_batch_size)
        self.monitor, self.mode = check_monitor(monitor, mode, val_data is not None, self.metrics, self.interpolation)
        self.train_data = train_data
        self.val_data = val_data
        self.loader = None
        if self._array_train and self.rank >= 0:  # every rank but an async server reads data
            mine = shard(train_data, part, parts) if parts > 1 else train_data
            if num_rows(mine) < self.batch_size:
                raise ValueError(f"train_data has {num_rows(mine)} rows per process, fewer than one batch of "
                                 f"{self.batch_size}")
            self.loader = PrefetchLoader(mine, self.batch_size, shuffle=True, seed=seed, drop_last=True, epochs=None,
                                         num_threads=num_threads,
                                         device=self.device if self.device.type == "cuda" else None)
        self.checkpoint_dir = None if checkpoint_dir is None else os.fspath(checkpoint_dir)
        stepped = optimizer
        if strategy == "async":
            self.model, stepped = _train_async.wrap(model, optimizer, self.plan.total_steps, self.checkpoint_dir,
                                                    self.plan.steps_per_epoch, async_options)
        elif strategy == "pipeline":
            self.model, self.optimizer, self.scheduler = _train_pipeline.wrap(model, loss_fn, optimizer, pipeline_options)
            self.scheduling = _schedule.SchedulerStepping(self.scheduler, scheduler_interval)
            self.module = self.model  # what checkpoints hold: this rank's stage
        else:
            self.model = SyncDataParallel(model) if self.world > 1 else model
        if strategy == "pipeline":
            self.stepper = _train_pipeline.PipelineStepper(self.model, self.optimizer, self.device, precision,
                                                           getattr(optimizer, "max_grad_norm", None))
        else:
            self.stepper = Stepper(self.model, stepped, self._loss, self.device, precision, accumulate)
        self.manager = None
        if self.checkpoint_dir is not None and strategy != "async":
            self.manager = CheckpointManager(self.checkpoint_dir, keep_last=keep_last, keep_best=keep_best,
                                             metric=self.monitor, mode=self.mode, weights_key="model",
                                             async_save=async_save,
                                             per_rank=_train_pipeline.PER_RANK if strategy == "pipeline" else ["loader"])

    # ----- setup helpers -------------------------------------------------------------------------

    def _state(self) -> dict:
        """What a checkpoint holds, in restore order: callbacks first (they may reshape the
        optimizer's groups before its state is loaded), then model, optimizer, the rest."""
        state = {
            "callbacks": Stateful(lambda: callback_states(self.callbacks),
                                  lambda state: load_callback_states(self.callbacks, state)),
            "model": self.module,
            "optimizer": self.optimizer,
            "plan": self.plan,
            "trainer": Stateful(lambda: {"best": self.best or {}, "history": self.history}, self._load_trainer),
        }
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler
        if self.stepper.scaler is not None:
            state["scaler"] = self.stepper.scaler
        if self.loader is not None:
            state["loader"] = self.loader
        return state

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
        checkpoint that does not fit this model/optimizer raises ValueError naming the missing and
        unexpected keys and mismatched shapes (nothing is saved)."""
        if self.manager is None:
            return None
        built = _schedule.length_of(self.scheduler)
        try:
            step = self.manager.restore(self._state())
        except CheckpointError as e:
            raise ValueError(f"cannot resume from {self.checkpoint_dir}: {one_line(e)}") from e
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ValueError(f"checkpoint directory {self.checkpoint_dir} does not fit this model/optimizer: "
                             f"{one_line(e)}") from e
        if step is not None:
            self._tidy_metrics(step)
            self.say(f"resumed from step {step} ({self.manager.restored_from})")
            _schedule.check_length(self.scheduler, built, self.plan.total_steps, self.rescale_schedule, self.say)
        return step

    def fit(self) -> list:
        """Train until the plan's budget is spent or a callback sets ``stop_training`` (a run that
        :class:`EarlyStopping` stopped stays stopped when resumed); returns the per-virtual-epoch
        records (resumed runs included)."""
        if self.strategy == "async":
            return _train_async.fit_async(self)
        for cb in self.callbacks:
            cb.on_fit_start(self)
        if self.resume and self.restore() is None:
            self._tidy_metrics(0)  # no checkpoint committed: records a killed run wrote start again
        self.step, self.epoch = self.plan.step, self.plan.epoch
        stopped = [cb.stopped_epoch for cb in self.callbacks if isinstance(cb, EarlyStopping) and cb.stopped_epoch]
        if stopped:
            self.say(f"the run stopped early after virtual epoch {stopped[0]} (EarlyStopping): nothing to train")
            return self.history
        bar = Progress(self.progress and self.rank == 0, self.plan.total_steps, self.plan.step, self.world,
                       self.plan.num_epochs, ("val_loss", *self.metrics))
        bar.last = self.history[-1] if self.history else {}
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
                    loss, n = self.stepper(batches)
                    self.scheduling.after_step()
                    total += loss
                    count += 1
                    rows += n
                    self.step = step + 1
                    for cb in self.callbacks:
                        cb.on_step_end(self, self.step, loss)
                    bar.step(count, len(vepoch) == 0, float(total) / count, rows, t0, vepoch.index)
                if count == 0:
                    continue
                bar.last = self._end_epoch(vepoch.index, mean_over_ranks(total, count, self.world), rows,
                                           time.perf_counter() - t0)
                if self.stop_training:
                    break
        finally:
            bar.close()
            batches.close()
            if self.loader is not None:
                self.loader.close()
            if self.manager is not None:
                self.manager.wait()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.history

    def _end_epoch(self, index: int, train_loss: float, rows: int, elapsed: float,
                   schedule: bool = True) -> dict:
        """Everything after a virtual epoch's steps, decided once for all ranks: the record, the
        callbacks, the stop, the scheduler's epoch step (not with ``schedule=False``: the async
        servers step theirs), the checkpoint and the log line."""
        metrics = agree(self._epoch_metrics(index, train_loss, rows, elapsed), self.world)  # times differ by rank
        value = metrics.get(self.monitor)
        if value is not None and math.isfinite(value) and (self.best is None or self._better(value, self.best[self.monitor])):
            self.best = {"epoch": metrics["epoch"], "step": metrics["step"], self.monitor: value}
            metrics["best"] = True
        for cb in self.callbacks:
            cb.on_epoch_end(self, index, metrics)
        self.stop_training = any_rank(self.stop_training, self.world, self.device)
        if schedule:
            self.scheduling.after_epoch(value)
        self.history.append(metrics)
        self._save(metrics)
        self._write_metrics(metrics)
        self.say(summary(metrics, self.plan.num_epochs, list(self.metrics)))
        return metrics

    def _better(self, value: float, best: float) -> bool:
        return value < best if self.mode == "min" else value > best

    def _epoch_metrics(self, index: int, train_loss: float, rows: int, elapsed: float) -> dict:
        metrics = {"epoch": index + 1, "step": self.step, "train_loss": train_loss}
        training = elapsed  # the optimizer steps' time; the finish adds to the epoch's time, not the rate
        if self.interpolation and self.finish is not None and self.plan.step >= self.plan.total_steps:
            report = finish_interpolation(self.module, *self._train_arrays(), self.finish, self.rank, self.world)
            if report is not None:
                self.say(str(report))
                elapsed += report.seconds
        if self.val_data is not None:
            scores = _train_eval.evaluate(self, self.val_data, self.metrics)
            metrics["val_loss"] = scores.pop("loss")
            metrics.update(scores)
        if self.interpolation:
            metrics["max_error"] = max_error(self.module, *self._train_arrays())
        if self.strategy != "async":  # under "async" the servers' optimizers hold the LR
            metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["samples_per_s"] = rows * self.world / max(training, 1e-9)
        metrics["time_s"] = elapsed
        before = self.history[-1].get("elapsed_s", 0.0) if self.history else 0.0
        metrics["elapsed_s"] = before + elapsed
        metrics["best"] = False
        return metrics

    def evaluate(self, data: Any) -> float:
        """Mean loss over ``data`` (array data or an iterable of batches), weighted by batch rows,
        in eval mode without gradients, split over the ranks (every rank must call it)."""
        return _train_eval.evaluate(self, data, {})["loss"]

    def test(self, data: Any) -> dict:
        """``{"test_loss": ..., <each metric name>: ...}`` over ``data``: the validation metrics of
        a finished model on held-out data (every rank must call it; every rank gets the result)."""
        scores = _train_eval.evaluate(self, data, self.metrics)
        return {"test_loss": scores.pop("loss"), **scores}

    def predict(self, data: Any) -> Any:
        """The model's outputs for ``data`` (inputs, or ``(inputs, targets)`` whose targets are
        ignored), in order, on the CPU: one tensor when the outputs are tensors."""
        return _train_eval.predict(self, data)

    def _train_arrays(self) -> tuple:
        data = self.train_data
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and is_array_data(data)):
            raise ValueError("interpolation mode needs train_data as (inputs, targets) arrays for max_error")
        return tuple(torch.as_tensor(a) for a in data)

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
        """Make ``metrics.jsonl`` hold this run's records up to ``step`` and nothing after (rank 0)."""
        if self.metrics_path is not None and self.rank == 0:
            _metrics_log.tidy(self.metrics_path, step, self.history)

    def restore_best(self) -> Optional[int]:
        """Load the best checkpoint's weights into the model (warm start / final model); its step."""
        if self.manager is None:
            raise ValueError("restore_best needs checkpoint_dir")
        self.manager.wait()
        if not [i for i in self.manager.list() if i.valid]:
            return None
        if self.strategy == "pipeline":  # each rank's stage is a per-rank entry of the checkpoint
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the other entries stay as they are
                self.manager.restore({"model": self.module}, "best")
        else:
            self.manager.load_weights(self.module, "best", key="model")
        return self.best["step"] if self.best else None
