"""Command line: ``trainpatterns info`` and ``trainpatterns train``.

``train`` runs the built-in default job: a small MLP learns a noise-free physics surrogate (the
damped pendulum's state after a fixed time, over its whole state space) with FusedAdamW, printing
the loss as it falls. It needs no download and takes well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Optional, Sequence

import torch


def _cmd_info(args: argparse.Namespace) -> int:
    from . import __version__, build_info

    info = build_info()
    info["torch"] = torch.__version__
    info["torch_cuda_available"] = torch.cuda.is_available()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"trainpatterns {__version__} (torch {torch.__version__})")
    cuda = f"yes, archs {info['cuda_archs']}, {info['cuda_devices']} device(s) visible" if info["cuda"] else "no"
    print(f"  CUDA kernels : {cuda}")
    print(f"  CPU SIMD     : {info['simd']} (compiled: {', '.join(info['simd_compiled'])})")
    print(f"  OpenMP       : {'yes' if info['openmp'] else 'no'}")
    return 0


def pendulum_data(n: int, t: float = 1.0, damping: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (angle, angular velocity) uniform over [-pi, pi] x [-2, 2]; targets: the state after
    time ``t`` of theta'' = -sin(theta) - damping * theta', integrated with RK4 (200 steps).
    Deterministic and noise-free, so the best model interpolates it exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    x[:, 0] = (x[:, 0] * 2 - 1) * math.pi
    x[:, 1] = (x[:, 1] * 2 - 1) * 2.0

    def deriv(s: torch.Tensor) -> torch.Tensor:
        return torch.stack([s[:, 1], -torch.sin(s[:, 0]) - damping * s[:, 1]], dim=1)

    s, steps = x.clone(), 200
    h = t / steps
    for _ in range(steps):
        k1 = deriv(s)
        k2 = deriv(s + h / 2 * k1)
        k3 = deriv(s + h / 2 * k2)
        k4 = deriv(s + h * k3)
        s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x.float(), s.float()


def _cmd_train(args: argparse.Namespace) -> int:
    from .optim import FusedAdamW

    torch.manual_seed(args.seed)
    x, y = pendulum_data(args.samples, seed=args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(2, 128), torch.nn.Tanh(), torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 2)
    )
    opt = FusedAdamW(model.parameters(), lr=args.lr, weight_decay=0.0, max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    loss_fn = torch.nn.MSELoss()
    start = time.perf_counter()
    print(f"training a {sum(p.numel() for p in model.parameters())}-parameter MLP on the damped pendulum "
          f"({args.samples} states, {args.steps} steps, FusedAdamW)")
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, args.samples, (args.batch_size,), generator=gen)
        loss = loss_fn(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            with torch.no_grad():
                full = loss_fn(model(x), y).item()
            print(f"step {step:5d}  train mse {full:.3e}  grad norm {opt.last_grad_norm.item():.3e}  "
                  f"{time.perf_counter() - start:6.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainpatterns", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="what the native module was built with")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)
    p_train = sub.add_parser("train", help="run the built-in default training job")
    p_train.add_argument("--steps", type=int, default=1500)
    p_train.add_argument("--samples", type=int, default=8192)
    p_train.add_argument("--batch-size", type=int, default=256)
    p_train.add_argument("--lr", type=float, default=3e-3)
    p_train.add_argument("--seed", type=int, default=0)
    p_train.set_defaults(func=_cmd_train)
    from .tuning.cli import register as _register_tune  # issue 7: `trainpatterns tune`
    _register_tune(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
