"""One rank of a Trainer(strategy="pipeline") job for tests/test_trainer_pipeline.py, started by
tests/_ranks.py with torchrun's variables (the Trainer joins the job itself).

A small regression MLP in 4 stages' worth of blocks trains for 4 virtual epochs with validation, an
accuracy-like metric, a cosine schedule (given as a factory: each rank's optimizer holds its stage
only) and per-stage checkpoints. Modes: "full" runs the plan; "dp" with 2 replicas, "sync" its
reference (SyncDataParallel on 2 ranks: the same shards); "kill" SIGKILLs every rank once the
checkpoint of virtual epoch 2 has committed; "resume" then finishes the killed run. Each rank saves
its records, its stage's parameters (unsplit names), the test scores and the predictions to
OUT/<mode><rank>.pt.
"""
from __future__ import annotations

import logging
import os
import signal
import sys

import torch
from torch import nn

from trainpatterns import Callback, Trainer, VirtualEpochs
from trainpatterns.optim import FusedAdamW

ROWS, VAL_ROWS, BATCH = 96, 37, 16


def make_data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, torch.sin(x[:, :2] * 2) + 0.1 * x[:, 2:4]


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))


def close(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return ((outputs - targets).abs() < 0.25).float().mean().item()


def make_trainer(out: str, strategy: str, options: dict, callbacks=()) -> Trainer:
    model = make_model()
    opt = FusedAdamW(model.parameters(), lr=2e-2, max_grad_norm=0.5)  # clipped by the norm over all stages
    plan = VirtualEpochs(ROWS, BATCH, stop_point=4, num_checkpoints=4)  # 4 virtual epochs of 6 steps
    factory = lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=plan.total_steps)  # noqa: E731
    extra: dict = {}
    if strategy == "pipeline":
        extra = dict(strategy="pipeline", pipeline_options=dict(options, scheduler=factory))
    else:
        extra = dict(scheduler=factory(opt))
    return Trainer(model, nn.functional.mse_loss, opt, make_data(0, ROWS), make_data(1, VAL_ROWS),
                   checkpoint_dir=os.path.join(out, "run"), plan=plan, global_batch_size=BATCH,
                   metrics={"close": close}, progress=False, num_threads=1, async_save=False, callbacks=callbacks,
                   **extra)


class KillAfter(Callback):
    """SIGKILL this process as virtual epoch ``index`` starts: the previous one's checkpoint has
    committed on every rank (blocking saves)."""

    def __init__(self, index: int) -> None:
        self.index = index

    def on_epoch_start(self, trainer, index) -> None:
        if index == self.index:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    out, mode, schedule = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)  # the Trainer's lines (progress=False logs them)
    options = dict(microbatches=4, schedule=schedule)
    if mode == "dp":
        options["data_parallel"] = 2
    if mode == "sync":  # the data-parallel reference of "dp": 2 ranks, each on its replica's shard
        trainer = make_trainer(out, "sync", {})
    else:
        trainer = make_trainer(out, "pipeline", options, [KillAfter(2)] if mode == "kill" else [])
    history = trainer.fit()
    scores = trainer.test(make_data(2, 23))
    predictions = trainer.predict(make_data(2, 23)[0])
    torch.save({"history": history, "test": scores, "predictions": predictions,
                "lr": trainer.optimizer.param_groups[0]["lr"], "params": {n: p.detach().clone() for n, p in trainer.module.named_parameters()}},
               os.path.join(out, f"{mode}{trainer.rank}.pt"))


if __name__ == "__main__":
    main()
