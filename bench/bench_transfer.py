"""Benchmark of cached bottleneck features: one epoch of head training on a
``FeatureCache`` against one epoch of full forward passes through the frozen backbone.

Why: when the backbone is frozen its output for a given input never changes, so running it every
epoch is pure waste; caching the features once turns an epoch into head-only work. The target is
>= 5x faster per epoch when the backbone dominates the compute (here a small conv net on 32x32
images with a linear head: the usual fine-tuning shape).

Variants (same data, same head, same optimizer, timed in turns in one process):
  full forward   per batch: frozen backbone forward (no autograd through it) + head forward,
                 backward and FusedAdamW step; the loop a user writes without the cache
  cached         per batch: a gather from the cache + the same head step
Also reported: the one-time cost of building the cache, and the number of epochs after which the
cache has paid for itself.

Run: python bench/bench_transfer.py [--quick] [--threads N] [--json FILE]
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Target, Variant, apply_threads, common_parser, environment, format_table,  # noqa: E402
                     format_targets, measure, write_json)

from trainpatterns.optim import FusedAdamW  # noqa: E402
from trainpatterns.transfer import FeatureCache, freeze  # noqa: E402


def backbone(width: int) -> nn.Module:
    layers, c = [], 3
    for w in (width, width * 2, width * 4):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1),
                   nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def main(argv: Optional[list] = None) -> int:
    args = common_parser(__doc__).parse_args(argv)
    apply_threads(args.threads)
    n, width, batch, repeats = (512, 16, 64, 3) if args.quick else (2048, 32, 128, 5)
    env = environment()
    print(f"bench_transfer: torch {env['torch']}, {env['threads']} threads, {env['cpu']}, "
          f"{'quick' if args.quick else 'full'} mode: {n} images 3x32x32, backbone width {width}, batch {batch}, "
          f"medians of {repeats} interleaved epochs")
    torch.manual_seed(0)
    body = backbone(width)
    freeze(body)
    head = nn.Linear(width * 4, 10)
    x = torch.randn(n, 3, 32, 32)
    y = torch.randint(0, 10, (n,))
    opt = FusedAdamW(head.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    t0 = time.perf_counter()
    cache = FeatureCache(body, x, y, batch_size=256)
    build_s = time.perf_counter() - t0

    def head_step(features: torch.Tensor, targets: torch.Tensor) -> None:
        loss = loss_fn(head(features), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    epoch = [0]

    def full_epoch() -> None:
        body.train()  # what a training loop does; the frozen BatchNorm layers stay in eval mode
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch[0]))
        epoch[0] += 1
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            head_step(body(x[idx]), y[idx])

    def cached_epoch() -> None:
        for features, targets in cache.batches(batch, seed=0, epoch=epoch[0]):
            head_step(features, targets)
        epoch[0] += 1

    results = measure([Variant("full forward", full_epoch, role="baseline"),
                       Variant("cached", cached_epoch, role="ours")], repeats=repeats, warmup=1, min_sample_s=0.0)
    by = {r.name: r for r in results}
    speedup = by["full forward"].median / by["cached"].median
    saved = by["full forward"].median - by["cached"].median
    breakeven = build_s / saved if saved > 0 else float("inf")
    print()
    print(format_table("one epoch of head training (ms per epoch)", results, baseline="full forward"))
    targets = [Target("cached vs full forward, per epoch (speedup)", speedup, 5.0),
               Target("cache build time / full-forward epoch time", build_s / by["full forward"].median, None,
                      f"build {build_s * 1e3:.0f} ms"),
               Target("epochs until the cache has paid for itself", breakeven, None)]
    print(format_targets(targets))
    write_json(args.json, dict(benchmark="bench_transfer", environment=env, quick=args.quick,
                               config=dict(n=n, width=width, batch=batch, repeats=repeats), build_s=build_s,
                               results=[r.to_dict() for r in results], targets=[t.to_dict() for t in targets]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
