"""One rank of Trainer(strategy="pipeline") runs for tests/test_scheduler_interval.py, started by
tests/_ranks.py with torchrun's variables: the same small MLP in 2 stages, once with a
ReduceLROnPlateau and once with a StepLR stepped per virtual epoch (both given as factories, since
each rank's optimizer holds its stage only). Each rank writes OUT/<case><rank>.json: the LR every
optimizer step used (read by a step pre-hook on the rank's optimizer) and the records."""
from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

from trainpatterns import Trainer, VirtualEpochs
from trainpatterns.optim import FusedAdamW

ROWS, BATCH = 64, 16
CASES = {
    "plateau": (lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0), "step"),
    "epoch": (lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), "epoch"),
}


def make_data(seed: int, n: int, sign: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, sign * torch.sin(x[:, :2])


def run(out: str, case: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 2))
    factory, interval = CASES[case]
    plan = VirtualEpochs(ROWS, BATCH, stop_point=2, num_checkpoints=4)  # 4 virtual epochs of 2 steps
    # validation targets of the opposite sign: the better the fit, the worse val_loss, so the plateau acts
    trainer = Trainer(model, nn.functional.mse_loss, FusedAdamW(model.parameters(), lr=5e-2), make_data(0, ROWS),
                      make_data(1, 32, -1.0), checkpoint_dir=os.path.join(out, case), plan=plan,
                      global_batch_size=BATCH, progress=False, num_threads=1, async_save=False, strategy="pipeline",
                      scheduler_interval=interval, pipeline_options=dict(microbatches=2, scheduler=factory))
    used = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(opt.param_groups[0]["lr"]))
    history = trainer.fit()
    with open(os.path.join(out, f"{case}{trainer.rank}.json"), "w") as f:
        json.dump({"used": used, "history": history, "scheduler": type(trainer.scheduler).__name__}, f)


def main() -> None:
    torch.set_num_threads(1)
    for case in CASES:
        run(sys.argv[1], case)


if __name__ == "__main__":
    main()
