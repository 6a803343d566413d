"""Child processes for tests/test_checkpoint.py: runs that get SIGKILLed, resumed, or exit mid-save.

Modes (argv[1]):
  train DIR TOTAL SAVE_EVERY KILL_AT OUT   a small training run (dropout, FusedAdamW, OneCycleLR, a
      shuffled loader, numpy and python randomness in the augmentation) that resumes from DIR's
      latest checkpoint, checkpoints every SAVE_EVERY steps (async), SIGKILLs itself after step
      KILL_AT (-1: never) and otherwise writes its final parameters to OUT (safetensors).
  spam DIR COUNT MODE                      saves COUNT checkpoints of a 10 MB tensor filled with the
      step number (MODE async|blocking) and prints "committed N" once each is committed. With
      CKPT_KILL="fn:n" (fn one of write, fsync, rename) it SIGKILLs itself right before the n-th
      call of os.fn made after the first checkpoint committed.
  atexit DIR                               an async save whose write is slowed down, then a normal
      interpreter exit: the checkpoint must still be committed.
  dist RANK WORLD PORT DIR                 one rank of a gloo job on 127.0.0.1: saves twice with
      per-rank loader and RNG state, has rank 0 corrupt rank 1's file of the newest checkpoint,
      restores "latest" into fresh objects and writes what it found to DIR/result_RANK.json.
"""
import os
import random
import signal
import sys
import time

import numpy as np
import torch

torch.set_num_threads(1)

import trainpatterns as tp  # noqa: E402
from trainpatterns.checkpoint import CheckpointManager  # noqa: E402
from trainpatterns.checkpoint import _format  # noqa: E402


class ShuffledLoader:
    """Batches of a fixed data set in a fresh permutation per epoch; state = (epoch, consumed batches)."""

    def __init__(self, x, y, batch_size, seed):
        self.x, self.y, self.batch_size, self.seed = x, y, batch_size, seed
        self.epoch, self.pos = 0, 0

    def next(self):
        n_batches = len(self.x) // self.batch_size
        if self.pos == n_batches:
            self.epoch, self.pos = self.epoch + 1, 0
        perm = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        idx = perm[self.pos * self.batch_size:(self.pos + 1) * self.batch_size]
        self.pos += 1
        return self.x[idx], self.y[idx]

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s):
        self.epoch, self.pos = s["epoch"], s["pos"]


def train(directory, total, save_every, kill_at, out):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(203, 12, generator=g)
    y = torch.randint(0, 3, (203,), generator=g)
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 3))
    opt = tp.FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-2, total_steps=total)
    loader = ShuffledLoader(x, y, 16, seed=4)
    state = {"model": model, "opt": opt, "sched": sched, "loader": loader}
    mgr = CheckpointManager(directory, keep_last=2)
    start = mgr.restore(state) or 0
    print(f"start {start}", flush=True)
    for step in range(start, total):
        xb, yb = loader.next()
        xb = xb + 0.05 * torch.from_numpy(np.random.randn(*xb.shape).astype(np.float32))
        if random.random() < 0.5:
            xb = -xb
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % save_every == 0:
            mgr.save(state, step + 1, {"loss": loss.item()})
        if step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    mgr.wait()
    _format.write_safetensors(out, {k: v.contiguous() for k, v in model.state_dict().items()}, {})


def _arm_kill_point(spec, armed):
    fn_name, n = spec.split(":")
    n = int(n)
    real = getattr(os, fn_name)
    calls = [0]

    def wrapper(*args, **kwargs):
        if armed[0]:
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(os, fn_name, wrapper)


def spam(directory, count, mode):
    armed = [False]
    if os.environ.get("CKPT_KILL"):
        _arm_kill_point(os.environ["CKPT_KILL"], armed)
    mgr = CheckpointManager(directory, keep_last=None, async_save=(mode == "async"))
    done = [i.step for i in mgr.list()]
    first = max(done) + 1 if done else 0
    w = torch.empty(2_500_000)
    for step in range(first, first + count):
        w.fill_(step)
        mgr.save({"w": w, "n": step}, step, {"step": step})
        mgr.wait()
        print(f"committed {step}", flush=True)
        armed[0] = True


def exit_during_save(directory):
    real = _format.write_safetensors

    def slow(*args, **kwargs):
        time.sleep(1.0)
        return real(*args, **kwargs)

    _format.write_safetensors = slow
    import trainpatterns.checkpoint.writer as writer
    writer.write_safetensors = slow
    mgr = CheckpointManager(directory)
    mgr.save({"w": torch.arange(1000.0), "n": 7}, 7)
    print("returned", flush=True)


def dist(rank, world, port, directory):
    import datetime
    import json
    import warnings

    import torch.distributed as td

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                          timeout=datetime.timedelta(seconds=60))

    def make():
        torch.manual_seed(0)  # replicated: identical on every rank
        model = torch.nn.Linear(7, 5)
        opt = tp.FusedAdamW(model.parameters(), lr=1e-2)
        data = torch.randn(64, 7, generator=torch.Generator().manual_seed(9))
        loader = ShuffledLoader(data, torch.zeros(64), 8, seed=rank)
        return model, opt, loader

    def train(model, opt, loader, steps):
        for _ in range(steps):
            xb, _ = loader.next()
            loss = torch.nn.functional.dropout(model(xb), 0.5).square().mean()
            opt.zero_grad()
            loss.backward()
            for p in model.parameters():  # the all-reduce a data-parallel step would do
                td.all_reduce(p.grad)
                p.grad /= world
            opt.step()

    model, opt, loader = make()
    torch.manual_seed(100 + rank)
    random.seed(rank)
    np.random.seed(rank)
    for _ in range(rank + 1):
        loader.next()  # per-rank loader positions differ
    mgr = CheckpointManager(directory, keep_last=3, timeout=30)
    state = {"model": model, "opt": opt, "loader": loader, "epoch": 5}
    mgr.save(state, 1)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_loader = loader.state_dict()
    draws = [torch.rand(3).tolist(), random.random(), float(np.random.rand())]
    train(model, opt, loader, 3)
    mgr.save(state, 2)
    mgr.wait()
    td.barrier()
    step2 = os.path.join(directory, "step_00000002")
    files = sorted(os.listdir(step2))
    if rank == 0:
        with open(os.path.join(step2, "rank_00001.safetensors"), "r+b") as f:
            f.seek(-3, os.SEEK_END)
            b = f.read(1)
            f.seek(-3, os.SEEK_END)
            f.write(bytes([b[0] ^ 0x40]))
    td.barrier()
    model, opt, loader = make()
    fresh = {"model": model, "opt": opt, "loader": loader, "epoch": 0}
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        restored = mgr.restore(fresh)
    steps = [None] * world
    td.all_gather_object(steps, restored)
    result = {
        "restored": restored, "all_restored": steps, "files": files,
        "warned": any("step_00000002" in str(x.message) for x in w),
        "model_ok": all(torch.equal(saved_model[k], v) for k, v in model.state_dict().items()),
        "loader": loader.state_dict(), "saved_loader": saved_loader, "epoch": fresh["epoch"],
        "rng_ok": [torch.rand(3).tolist(), random.random(), float(np.random.rand())] == draws,
    }
    with open(os.path.join(directory, f"result_{rank}.json"), "w") as f:
        json.dump(result, f)
    from trainpatterns.distributed import shutdown

    shutdown()  # the group's gloo threads joined before the interpreter ends: see its docstring


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "train":
        train(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    elif mode == "spam":
        spam(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif mode == "atexit":
        exit_during_save(sys.argv[2])
    elif mode == "dist":
        dist(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
