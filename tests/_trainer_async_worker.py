"""One rank of a 3-rank ``Trainer(strategy="async")`` job for tests/test_trainer_ranks.py: rank 0
serves, ranks 1 and 2 train on their halves of the pendulum data with the Trainer's loop (loader,
validation, metrics, callbacks), and each rank saves its history and final weights to OUT/async<r>.pt.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

from trainpatterns import Callback, Trainer, VirtualEpochs
from trainpatterns.optim import FusedAdamW
from trainpatterns.pendulum import pendulum_data

ROWS, BATCH, UPDATES = 1024, 32, 240


class Steps(Callback):
    def __init__(self) -> None:
        self.seen = 0

    def on_step_end(self, trainer, step, loss):
        self.seen += 1


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    torch.manual_seed(int(os.environ["RANK"]))  # the servers' values win: workers start from them
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
    steps = Steps()
    plan = VirtualEpochs(ROWS, BATCH, stop_point=UPDATES * BATCH / ROWS, num_checkpoints=4)
    trainer = Trainer(model, nn.functional.mse_loss, FusedAdamW(model.parameters(), lr=1e-3), pendulum_data(ROWS),
                      pendulum_data(256, seed=1), checkpoint_dir=os.path.join(out, "run"), plan=plan,
                      strategy="async", async_options={"num_servers": 1, "timeout": 30.0}, callbacks=[steps],
                      progress=False, num_threads=1)
    history = trainer.fit()
    torch.save({"history": history, "steps": steps.seen, "stats": trainer.model.stats(),
                "state": {k: v.clone() for k, v in model.state_dict().items()}},
               os.path.join(out, f"async{os.environ['RANK']}.pt"))


if __name__ == "__main__":
    main()
