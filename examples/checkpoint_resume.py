"""Checkpoints with virtual epochs: train, get killed, resume exactly where the run stopped.

Run it twice (or kill it with Ctrl-C / SIGKILL part-way and run it again): the second run restores
the model, the optimizer, the LR schedule, the loader position and every RNG from the newest good
checkpoint and continues as if it had never stopped. With --more-data the data set grows by half and
the restored plan keeps its checkpoint cadence while adding virtual epochs for the new examples
(a warm start on new data).

    python examples/checkpoint_resume.py --dir /tmp/ckpt
    python examples/checkpoint_resume.py --dir /tmp/ckpt --more-data
"""
import argparse

import torch

from trainpatterns.checkpoint import CheckpointManager, VirtualEpochs
from trainpatterns.optim import FusedAdamW


class ShuffledBatches:
    """A resumable shuffled loader: its state is (epoch, consumed batches), not a prefetched position."""

    def __init__(self, x, y, batch_size, seed=0):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.epoch, self.pos = 0, 0

    def next(self):
        if self.pos == len(self.x) // self.batch_size:
            self.epoch, self.pos = self.epoch + 1, 0
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        idx = perm[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        return self.x[idx], self.y[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="checkpoints-example")
    p.add_argument("--more-data", action="store_true", help="grow the data set by half (warm start)")
    args = p.parse_args()

    n = 6000 if args.more_data else 4000
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 20, generator=g)
    y = (x[:, :5].sum(1) > 0).long()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(64, 2))
    opt = FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    plan = VirtualEpochs(num_examples=n, batch_size=32, stop_point=3.0, num_checkpoints=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.1, 1 - s / 2000))
    loader = ShuffledBatches(x, y, 32)
    state = {"model": model, "opt": opt, "sched": sched, "loader": loader, "plan": plan}

    manager = CheckpointManager(args.dir, keep_last=2, keep_best=1, metric="loss", mode="min")
    step = manager.restore(state)
    print(f"{'resumed at step ' + str(step) if step is not None else 'fresh start'}: {plan}")
    for epoch in plan:
        total, count = 0.0, 0
        for _ in epoch:
            xb, yb = loader.next()
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, count = total + loss.item(), count + 1
        avg = total / max(1, count)
        manager.save(state, step=plan.step, metrics={"loss": avg})  # returns after the host snapshot
        print(f"virtual epoch {epoch.index}: step {plan.step}/{plan.total_steps}, loss {avg:.4f}")
    manager.wait()
    print("checkpoints:", [(c.step, round(c.metrics["loss"], 4)) for c in manager.list()])


if __name__ == "__main__":
    main()
