"""Synchronous data parallelism with trainpatterns.distributed.SyncDataParallel.

Each rank trains the same MLP on its own slice of every batch (a noisy linear regression); the
gradients are averaged by bucketed, overlapped all-reduce, so the ranks take identical steps. At
the end the script checks that every rank holds the same parameters.

    torchrun --standalone --nproc-per-node 2 examples/sync_data_parallel.py [--compress bf16] [--accumulate 2]
    python examples/sync_data_parallel.py        # one process: the same code, no communication
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from trainpatterns.distributed import SyncDataParallel, init_from_env, shutdown
from trainpatterns.optim import FusedAdamW


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=64, help="samples per rank and micro-batch")
    p.add_argument("--compress", choices=["bf16", "fp16"], default=None)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per step (no_sync between)")
    p.add_argument("--overlap-step", action="store_true", help="step each bucket as soon as it is reduced")
    args = p.parse_args()
    torch.set_num_threads(1)  # ranks share the machine's cores
    info = init_from_env(timeout=60)

    torch.manual_seed(0)
    true_w = torch.randn(32, 1)
    model = nn.Sequential(nn.Linear(32, 256), nn.GELU(), nn.Linear(256, 1)).to(info.device)
    opt = FusedAdamW(model.parameters(), lr=3e-3)
    ddp = SyncDataParallel(model, compress=args.compress, optimizer=opt if args.overlap_step else None)

    gen = torch.Generator().manual_seed(1234 + info.rank)  # every rank draws its own samples
    for step in range(args.steps):
        opt.zero_grad()
        for micro in range(args.accumulate):
            x = torch.randn(args.batch, 32, generator=gen)
            y = x @ true_w + 0.01 * torch.randn(args.batch, 1, generator=gen)
            if micro < args.accumulate - 1:
                with ddp.no_sync():  # accumulate locally, reduce once at the last micro-batch
                    loss = F.mse_loss(ddp(x.to(info.device)), y.to(info.device)) / args.accumulate
                    loss.backward()
            else:
                loss = F.mse_loss(ddp(x.to(info.device)), y.to(info.device)) / args.accumulate
                loss.backward()
        if not args.overlap_step:
            opt.step()
        if info.is_main and step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item() * args.accumulate:.5f}")

    flat = torch.cat([q.detach().reshape(-1) for q in model.parameters()])
    if info.world_size > 1:
        spread = torch.stack([flat, -flat])
        dist.all_reduce(spread, op=dist.ReduceOp.MAX)
        gap = (spread[0] + spread[1]).abs().max().item()  # max over ranks minus min over ranks
        if info.is_main:
            print(f"parameters identical on all {info.world_size} ranks: {gap == 0.0} (max spread {gap:.3g})")
        shutdown()  # a barrier, then destroy_process_group
    elif info.is_main:
        print("single process: nothing to compare")


if __name__ == "__main__":
    main()
