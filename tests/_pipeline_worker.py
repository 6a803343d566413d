"""One rank of a PipelineParallel job for tests/test_pipeline.py: the same small nn.Sequential on every
rank, split into WORLD stages; one batch's loss and every gradient, then 20 training steps, saved to
OUT/rank<r>.pt, and the whole model exported to OUT/full.safetensors."""
from __future__ import annotations

import os
import sys

import torch
from torch import nn

from trainpatterns.distributed import init_from_env, shutdown
from trainpatterns.distributed.pipeline import PipelineParallel
from trainpatterns.optim import FusedAdamW

BATCH, STEPS = 24, 20


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3))


def batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(BATCH, 5, generator=g), torch.randn(BATCH, 3, generator=g)


def checkpointed(out: str, mode: str, rank: int) -> None:
    """Train to step 15 with a per-stage checkpoint every 5 steps: straight through ("ckpt_full"),
    stopping after step 10 ("ckpt_part"), or resuming from the newest checkpoint ("ckpt_resume")."""
    from trainpatterns.checkpoint import CheckpointManager

    pp = PipelineParallel(make_model(), microbatches=4, loss_fn=nn.MSELoss())
    opt = FusedAdamW(pp.parameters(), lr=1e-2)
    state = {"stage": pp, "optimizer": opt}
    manager = CheckpointManager(os.path.join(out, mode.replace("_part", "").replace("_resume", "")), keep_last=2,
                                async_save=False, per_rank=["stage", "optimizer"])
    start = (manager.restore(state) or 0) if mode == "ckpt_resume" else 0
    stop = 10 if mode == "ckpt_part" else 15
    for step in range(start + 1, stop + 1):
        opt.zero_grad()
        pp.step(*batch(step))
        opt.step()
        if step % 5 == 0:
            manager.save(state, step=step)
    torch.save({"start": start, "params": {n: p.detach().clone() for n, p in pp.named_parameters()}},
               os.path.join(out, f"{mode}{rank}.pt"))


def main() -> None:
    out, schedule, microbatches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    info = init_from_env("gloo", timeout=60)
    if schedule == "errors":  # bad arguments: the same clear error on every rank, before any communication
        for kwargs in (dict(split_points=["9"]), dict(split_points=["2", "4"]), dict(microbatches=0),
                       dict(schedule="zigzag"), dict(stages=5)):
            try:
                PipelineParallel(make_model(), loss_fn=nn.MSELoss(), **kwargs)
            except (ValueError, TypeError) as e:
                print(f"rank {info.rank}: {type(e).__name__}: {e}", flush=True)
        try:
            PipelineParallel(nn.Sequential(nn.Linear(5, 3)), loss_fn=nn.MSELoss())
        except ValueError as e:
            print(f"rank {info.rank}: {type(e).__name__}: {e}", flush=True)
        shutdown()
        return
    if schedule.startswith("ckpt"):
        checkpointed(out, schedule, info.rank)
        shutdown()
        return
    pp = PipelineParallel(make_model(), microbatches=microbatches, schedule=schedule, loss_fn=nn.MSELoss())
    if BATCH % microbatches:  # the bad-input run: every rank must raise, none may wait
        try:
            pp.step(*batch(0))
        except ValueError as e:
            print(f"rank {info.rank}: ValueError: {e}", flush=True)
        shutdown()
        return
    x, y = batch(0)
    loss = pp.step(x if pp.is_first else None, y if pp.is_last else None)
    grads = {n: p.grad.clone() for n, p in pp.named_parameters()}
    opt = FusedAdamW(pp.parameters(), lr=1e-2)
    losses = []
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        x, y = batch(step)
        losses.append(pp.step(x, y))
        pp.clip_grad_norm_(1.0)
        opt.step()
    pp.export_full_model(os.path.join(out, "full.safetensors"))
    torch.save({"loss": loss, "grads": grads, "losses": losses, "blocks": pp.block_names,
                "params": {n: p.detach().clone() for n, p in pp.named_parameters()}},
               os.path.join(out, f"rank{info.rank}.pt"))
    shutdown()


if __name__ == "__main__":
    main()
