"""Useful overfitting: the one-batch overfit check as a debugging tool, and interpolation mode.

Run: python examples/overfit_check.py
1. A healthy MLP passes the overfit check (loss at init close to log C, then near zero), a model
   that is too small fails it (reported, not raised), and a model whose logits start 50x too
   large is flagged even though it fits the batch.
2. Interpolation mode fits a noise-free function in float64: FusedAdamW alone, then FusedAdamW
   until it stalls followed by the full-batch L-BFGS finish, which gets far closer in less time.
"""
import time

import torch
from torch import nn

from trainpatterns.overfit import interpolate, overfit_check


def main() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(64, 20), torch.randint(0, 10, (64,))
    healthy = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    print(overfit_check(healthy, (x, y), nn.CrossEntropyLoss(), steps=300, lr=1e-2), "\n")
    tiny = nn.Linear(20, 10)
    print(overfit_check(tiny, (torch.randn(512, 20), torch.randint(0, 10, (512,))), nn.CrossEntropyLoss(),
                        steps=200, lr=1e-2), "\n")
    loud = nn.Sequential(nn.Linear(20, 128), nn.ReLU(), nn.Linear(128, 10))
    with torch.no_grad():
        loud[2].weight.mul_(50)  # the output layer's initial scale is off
    print(overfit_check(loud, (x, y), nn.CrossEntropyLoss(), steps=300, lr=1e-2), "\n")

    grid = torch.linspace(-3, 3, 401).unsqueeze(1)
    target = torch.tanh(2 * grid) * torch.cos(grid)  # noise-free and complete: fit every point
    for finish in (None, "lbfgs"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
        start = time.perf_counter()
        report = interpolate(model, grid, target, steps=1000, lr=5e-3, finish=finish, finish_max_iter=500)
        print(f"finish={finish!r} ({time.perf_counter() - start:.1f} s): {report}")


if __name__ == "__main__":
    main()
