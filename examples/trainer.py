"""The Trainer: virtual epochs, a checkpoint per virtual epoch, automatic exact resume, best by
validation loss, metrics.jsonl and callbacks.

Run: python examples/trainer.py [RUN_DIR]
Trains a small MLP on the damped-pendulum surrogate for 6 virtual epochs but "crashes" (a callback
stops it) after 3; a second Trainer on the same directory resumes from the checkpoint and finishes.
The result is bitwise equal to an uninterrupted run. Then `trainpatterns plot RUN_DIR` draws it.
"""
import sys
import tempfile

import torch
from torch import nn

from trainpatterns import Callback, Trainer, VirtualEpochs
from trainpatterns.cli import pendulum_data
from trainpatterns.optim import FusedAdamW


class CrashAfter(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_end(self, trainer, epoch, metrics):
        if epoch + 1 == self.epochs:
            print(f"  (simulated crash after virtual epoch {epoch + 1})")
            trainer.stop_training = True


def run(run_dir, callbacks=()):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    opt = FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    plan = VirtualEpochs(len(x), batch_size=128, stop_point=6.0, num_checkpoints=6)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=plan.total_steps)
    trainer = Trainer(model, nn.functional.mse_loss, opt, (x, y), (xv, yv), checkpoint_dir=run_dir, plan=plan,
                      scheduler=sched, callbacks=list(callbacks), interpolation=True, progress=False)
    for m in trainer.fit()[-3:]:
        print(f"  virtual epoch {m['epoch']}: train {m['train_loss']:.2e}  val {m['val_loss']:.2e}  "
              f"max error {m['max_error']:.2e}{'  best' if m['best'] else ''}")
    return model


torch.set_num_threads(1)
x, y = pendulum_data(4096)
xv, yv = pendulum_data(512, seed=1)
resumable = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="trainer-example-")
print(f"run 1 -> {resumable}")
run(resumable, [CrashAfter(3)])
print("run 2 (same directory: resumes at virtual epoch 4)")
resumed = run(resumable)
print("reference: uninterrupted")
reference = run(tempfile.mkdtemp(prefix="trainer-reference-"))
same = all(torch.equal(p, q) for p, q in zip(resumed.parameters(), reference.parameters()))
print(f"resumed == uninterrupted, bitwise: {same}; plot it with: trainpatterns plot {resumable}")
