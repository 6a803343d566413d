"""One rank of a 2-rank Trainer job for tests/test_trainer_ranks.py, started by tests/_ranks.py with
torchrun's variables and NOT calling init_from_env: the Trainer must join the job itself.

A small CNN-like model with BatchNorm (its running statistics differ between the ranks, whose shards
differ) trains with metrics, EarlyStopping, a ReduceLROnPlateau and a global batch size; the rank
writes what it saw (its records, its view of the checkpoint directory, the final weights, and the
number of all-reduces inside one accumulated optimizer step) to OUT/rank<r>.pt.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from trainpatterns import EarlyStopping, Trainer, VirtualEpochs
from trainpatterns.optim import FusedAdamW

ROWS, VAL_ROWS, GLOBAL_BATCH = 96, 37, 16


def make_data(seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 2))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    return (outputs.argmax(1) == targets).float().mean().item()


def main() -> None:
    out, accumulate = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    model = make_model()
    opt = FusedAdamW(model.parameters(), lr=3e-2)
    plan = VirtualEpochs(ROWS, GLOBAL_BATCH, stop_point=6, num_checkpoints=6)  # 6 virtual epochs of 6 steps
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0)
    trainer = Trainer(model, nn.functional.cross_entropy, opt, make_data(0, ROWS), make_data(1, VAL_ROWS),
                      checkpoint_dir=os.path.join(out, "run"), plan=plan, global_batch_size=GLOBAL_BATCH,
                      accumulate=accumulate, scheduler=sched, metrics={"val_acc": accuracy}, monitor="val_acc",
                      mode="max", callbacks=[EarlyStopping("val_loss", patience=2, min_delta=1e-3)],
                      progress=False, num_threads=1, async_save=False)
    calls = []
    real = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    history = trainer.fit()
    # One more optimizer step outside fit, counting the all-reduces it makes (the plan is done).
    dist.all_reduce = counting
    try:
        trainer.stepper(iter([make_data(2, GLOBAL_BATCH // 2)] * accumulate))
    finally:
        dist.all_reduce = real
    rank = dist.get_rank()
    torch.save({"history": history, "best": trainer.best, "batch_size": trainer.batch_size,
                "total_steps": plan.total_steps, "listing": sorted(os.listdir(os.path.join(out, "run"))),
                "test": trainer.test(make_data(1, VAL_ROWS)), "predict": trainer.predict(make_data(1, VAL_ROWS)),
                "state": {k: v.clone() for k, v in model.state_dict().items()}, "inner_all_reduces": len(calls),
                "world": dist.get_world_size()},
               os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
