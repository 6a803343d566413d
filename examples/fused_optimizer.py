"""Fused optimizer step with mixed precision and clipping, side by side with torch.optim.AdamW.

Run: python examples/fused_optimizer.py [--steps 300]
Trains the same small regression model twice (torch AdamW + clip_grad_norm_, then FusedAdamW with
max_grad_norm) and prints both losses and the time per optimizer step.
"""
import argparse
import copy
import time

import torch

from trainpatterns.optim import FusedAdamW


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    steps = p.parse_args().steps
    torch.manual_seed(0)
    x = torch.randn(4096, 64)
    y = torch.sin(x[:, :8]).sum(dim=1, keepdim=True)
    base = torch.nn.Sequential(*[m for _ in range(12) for m in (torch.nn.Linear(64, 64), torch.nn.GELU())],
                               torch.nn.Linear(64, 1))
    for name in ("torch AdamW", "FusedAdamW"):
        model = copy.deepcopy(base)
        if name == "torch AdamW":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        else:
            opt = FusedAdamW(model.parameters(), lr=1e-3, max_grad_norm=1.0)
        step_time = 0.0
        for _ in range(steps):
            idx = torch.randint(0, len(x), (256,))
            loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            start = time.perf_counter()
            if name == "torch AdamW":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step_time += time.perf_counter() - start
        with torch.no_grad():
            final = torch.nn.functional.mse_loss(model(x), y).item()
        print(f"{name:12s} final mse {final:.4f}   clip+step {step_time / steps * 1e6:7.1f} us")


if __name__ == "__main__":
    main()
