"""A small CNN classifier through the Trainer: metrics, early stopping, bf16, kill-and-resume, and a
2-rank run, on image data the script generates (no download).

Run:
    python examples/trainer_classifier.py [--run-dir DIR]
        a child process trains and is killed (SIGKILL) mid-run; this process resumes the run from its
        newest checkpoint, finishes it (or stops early), and reports test accuracy
    torchrun --standalone --nproc-per-node 2 examples/trainer_classifier.py [--run-dir DIR]
        the same training on 2 ranks: the Trainer joins the job itself, splits the global batch and the
        validation set over the ranks, and both ranks report the same figures

The images are 12x12 with one of four patterns (a horizontal bar, a vertical bar, a diagonal, a
blob) at a random place, plus noise; the label is the pattern.
"""
import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile

import torch
from torch import nn

from trainpatterns import Callback, EarlyStopping, Trainer, VirtualEpochs
from trainpatterns.optim import FusedAdamW

SIZE = 12


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy 1x12x12 images of four patterns and their labels 0..3."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = 0.8 * torch.randn(n, 1, SIZE, SIZE, generator=g)
    at = torch.randint(2, SIZE - 2, (n, 2), generator=g)
    idx = torch.arange(SIZE)
    for i in range(n):
        r, c = int(at[i, 0]), int(at[i, 1])
        k = int(labels[i])
        if k == 0:
            x[i, 0, r, :] += 1.0
        elif k == 1:
            x[i, 0, :, c] += 1.0
        elif k == 2:
            x[i, 0, idx, idx] += 1.0
        else:
            x[i, 0, r - 1:r + 2, c - 1:c + 2] += 1.0
    return x, labels


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4))


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(1) == targets).float().mean()


class KillAfter(Callback):
    """Kills this process (SIGKILL: no cleanup, as a crash or a preempted machine) when virtual epoch
    ``epochs + 1`` starts, once virtual epoch ``epochs``'s checkpoint has been written."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epochs:
            trainer.manager.wait()
            os.kill(os.getpid(), signal.SIGKILL)


def trainer(run_dir: str, rows: int, epochs: int, callbacks=()) -> Trainer:
    model = cnn()
    opt = FusedAdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    plan = VirtualEpochs(rows, 64, stop_point=epochs, num_checkpoints=epochs)  # 64 examples per step, all ranks
    return Trainer(model, nn.functional.cross_entropy, opt, images(rows, 0), images(rows // 4, 1),
                   checkpoint_dir=run_dir, plan=plan, global_batch_size=64, precision="bf16",
                   metrics={"val_acc": accuracy}, monitor="val_acc", mode="max",
                   callbacks=[*callbacks, EarlyStopping("val_loss", patience=2, min_delta=1e-3)],
                   scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=plan.total_steps),
                   progress=False, num_threads=1)


def report(t: Trainer, rows: int) -> None:
    scores = t.test(images(rows // 4, 2))
    if t.rank == 0:
        print(f"test: loss {scores['test_loss']:.3f}, accuracy {scores['val_acc']:.3f} over {rows // 4} images "
              f"(rank 0 of {t.world})")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", default=None)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--kill-after", type=int, default=None, help=argparse.SUPPRESS)  # the child's role
    args = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if args.kill_after is not None:
        trainer(args.run_dir, args.rows, args.epochs, [KillAfter(args.kill_after)]).fit()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        run_dir = args.run_dir or "runs/trainer-classifier-2ranks"
        t = trainer(run_dir, args.rows, args.epochs)
        t.fit()
        report(t, args.rows)
        return
    run_dir = args.run_dir or tempfile.mkdtemp(prefix="trainer-classifier-")
    print(f"a child process trains into {run_dir} and is killed after virtual epoch 2")
    child = subprocess.run([sys.executable, __file__, "--run-dir", run_dir, "--rows", str(args.rows),
                            "--epochs", str(args.epochs), "--kill-after", "2"])
    print(f"child ended with {child.returncode} ({'killed' if child.returncode == -signal.SIGKILL else 'not killed'})")
    t = trainer(run_dir, args.rows, args.epochs)
    history = t.fit()
    best = t.best or {}
    print(f"done at step {t.step}: best val_acc {best.get('val_acc', float('nan')):.3f} at virtual epoch "
          f"{best.get('epoch')}; {len(history)} virtual epochs recorded")
    t.restore_best()
    report(t, args.rows)


if __name__ == "__main__":
    main()
