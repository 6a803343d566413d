"""One rank of a PipelineParallel job for tests/test_pipeline.py: the same small nn.Sequential on every
rank, split into WORLD stages; one batch's loss and every gradient, then 20 training steps, saved to
OUT/rank<r>.pt, and the whole model exported to OUT/full.safetensors."""
from __future__ import annotations

import os
import sys
import time

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


def training(out: str, rank: int, pp: PipelineParallel, rows: slice) -> None:
    """Batch 0's loss and gradients, then STEPS steps with global-norm clipping; saved per rank."""
    x, y = batch(0)
    x, y = x[rows], y[rows]
    loss = pp.step(x if pp.is_first else None, y if pp.is_last else None)
    grads = {n: p.grad.clone() for n, p in pp.named_parameters()}
    opt = FusedAdamW(pp.parameters(), lr=1e-2)
    losses = []
    for step in range(1, STEPS + 1):
        opt.zero_grad()
        x, y = batch(step)
        losses.append(pp.step(x[rows], y[rows]))
        pp.clip_grad_norm_(1.0)
        opt.step()
    pp.export_full_model(os.path.join(out, "full.safetensors"))
    state_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                      if isinstance(t, torch.Tensor) and t.dim() > 0)
    torch.save({"loss": loss, "grads": grads, "losses": losses, "blocks": pp.stage_blocks, "stage_ids": pp.stage_ids,
                "costs": pp.stage_costs, "param_bytes": sum(p.numel() * p.element_size() for p in pp.parameters()),
                "optimizer_bytes": state_bytes,
                "params": {n: p.detach().clone() for n, p in pp.named_parameters()}},
               os.path.join(out, f"rank{rank}.pt"))


class Fails(nn.Module):
    """An identity block that raises at the forward call number ``at`` (the "raise" mode)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("block failed on purpose")
        return x


def failing(mode: str, rank: int) -> None:
    """A stage that dies (os._exit) or raises in its third batch: the other stage must fail too, fast."""
    blocks = list(make_model())
    if mode == "raise":
        blocks.append(Fails(at=9))  # the last stage's 9th micro-batch forward: batch 3
    pp = PipelineParallel(nn.Sequential(*blocks), microbatches=4, loss_fn=nn.MSELoss())
    for step in range(5):
        if mode == "dead" and rank == 1 and step == 2:
            os._exit(3)
        start = time.perf_counter()
        try:
            pp.step(*batch(step))
        except RuntimeError as e:
            print(f"rank {rank}: failed in step {step} after {time.perf_counter() - start:.1f} s: {e}", flush=True)
            try:
                pp.step(*batch(step))
            except RuntimeError as again:
                print(f"rank {rank}: then: {again}", flush=True)
            if mode == "raise" and rank == 1:  # the failed rank lives on, holding its exception
                held = e
                time.sleep(15)
                del held
            return


def bad_shapes(rank: int) -> None:
    """A stage that cannot take the previous stage's output, then targets the loss cannot take."""
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(8, 3))
    pp = PipelineParallel(model, split_points=["2"], microbatches=4, loss_fn=nn.MSELoss())
    for y in (torch.randn(BATCH, 3), torch.randn(BATCH, 3)):
        try:
            pp.step(torch.randn(BATCH, 5), y)
        except ValueError as e:
            print(f"rank {rank}: ValueError: {e}", flush=True)
    pp = PipelineParallel(make_model(), microbatches=4, loss_fn=nn.MSELoss())
    try:
        pp.step(torch.randn(BATCH, 5), torch.randn(BATCH, 4))
    except ValueError as e:
        print(f"rank {rank}: ValueError: {e}", flush=True)
    loss = pp.step(torch.randn(BATCH, 5), torch.randn(BATCH, 3))  # and then a good batch runs
    loss = pp.step(torch.randn(BATCH // 2, 5), torch.randn(BATCH // 2, 3))  # and a smaller one
    print(f"rank {rank}: then ran, loss {loss}", flush=True)


def poison(model: nn.Sequential, at_step: list) -> None:
    """Gradients of the first layer's weight become inf in the step numbered ``at_step[1]`` (the
    caller counts steps in ``at_step[0]``): an overflow on the first stage only."""
    model[0].weight.register_hook(lambda g: g * float("inf") if at_step[0] == at_step[1] else g)


def scaled(out: str, rank: int) -> None:
    """Four steps with a GradScaler; step 2 overflows on stage 0 only."""
    counter = [0, 2]
    model = make_model()
    poison(model, counter)
    pp = PipelineParallel(model, microbatches=4, loss_fn=nn.MSELoss())
    opt = FusedAdamW(pp.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    losses = []
    for step in range(4):
        counter[0] = step
        opt.zero_grad()
        losses.append(pp.step(*batch(step), scaler=scaler))
        scaler.unscale_(opt)
        pp.clip_grad_norm_(1e9)
        scaler.step(opt)
        scaler.update()
    torch.save({"losses": losses, "scale": scaler.get_scale(),
                "params": {n: p.detach().clone() for n, p in pp.named_parameters()}},
               os.path.join(out, f"scaled{rank}.pt"))


def main() -> None:
    out, mode, microbatches = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    info = init_from_env("gloo", timeout=60)
    if mode == "errors":  # bad arguments: the same clear error on every rank, before any communication
        for kwargs in (dict(split_points=["9"]), dict(split_points=["2", "4"]), dict(microbatches=0),
                       dict(schedule="zigzag"), dict(stages=5), dict(data_parallel=3),
                       dict(schedule="interleaved", stages=3), dict(balance="time"), dict(microbatches=1)):
            try:
                PipelineParallel(make_model(), loss_fn=nn.MSELoss(), **kwargs)
            except (ValueError, TypeError) as e:
                print(f"rank {info.rank}: {type(e).__name__}: {e}", flush=True)
        try:
            PipelineParallel(nn.Sequential(nn.Linear(5, 3)), loss_fn=nn.MSELoss())
        except ValueError as e:
            print(f"rank {info.rank}: {type(e).__name__}: {e}", flush=True)
    elif mode.startswith("ckpt"):
        checkpointed(out, mode, info.rank)
    elif mode in ("dead", "raise"):
        failing(mode, info.rank)
        if mode == "dead":
            os._exit(0)  # the process group lost a member: skip the goodbye barrier
    elif mode == "scaler":
        scaled(out, info.rank)
    elif mode == "shapes":
        bad_shapes(info.rank)
    elif BATCH % microbatches:  # the bad-input run: every rank must raise, none may wait
        pp = PipelineParallel(make_model(), microbatches=microbatches, loss_fn=nn.MSELoss())
        try:
            pp.step(*batch(0))
        except ValueError as e:
            print(f"rank {info.rank}: ValueError: {e}", flush=True)
    else:
        kwargs: dict = dict(schedule=mode) if mode in ("1f1b", "gpipe", "interleaved") else {}
        rows = slice(None)
        if mode == "dp":  # 2 replicas of a 2-stage pipeline, each on its half of the batch
            kwargs = dict(data_parallel=2)
            half = BATCH // 2
            rows = slice(info.rank // 2 * half, (info.rank // 2 + 1) * half)
        if mode == "time":
            kwargs = dict(balance="time", example_inputs=batch(0)[0])
        pp = PipelineParallel(make_model(), microbatches=microbatches, loss_fn=nn.MSELoss(), **kwargs)
        training(out, info.rank, pp, rows)
    shutdown()


if __name__ == "__main__":
    main()
