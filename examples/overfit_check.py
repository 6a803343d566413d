"""Useful overfitting: the one-batch overfit check as a debugging tool, and interpolation mode.

Run: python examples/overfit_check.py
1. A healthy MLP passes the overfit check (loss at init close to log C, then near zero), a model
   that is too small fails it (reported, not raised), and the caller's model is untouched.
2. Interpolation mode fits a noise-free function exactly, in float64, and reports the worst-case
   error over the whole dataset.
"""
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

    grid = torch.linspace(-3, 3, 401).unsqueeze(1)
    target = torch.tanh(2 * grid) * torch.cos(grid)  # noise-free and complete: fit every point
    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    print(interpolate(model, grid, target, steps=1000, lr=5e-3, dtype=torch.float64))


if __name__ == "__main__":
    main()
