"""Shared helpers for the benchmarks under bench/: interleaved timing, tables, targets, --json.

Every benchmark here measures ours and the baselines in one process, in turns: each repeat runs
every variant once (starting from a different variant each round), so slow drifts of a shared, noisy
machine hit all variants alike. We report medians over repeats and quote ratios, not absolute times.

Usage sketch::

    parser = common_parser(__doc__)           # --quick --json --threads (add your own flags)
    args = parser.parse_args()
    apply_threads(args.threads)
    results = measure([Variant("torch", f), Variant("ours", g)], repeats=7)
    print(format_table("case", results, baseline="torch"))
    write_json(args.json, payload)

Units: times in seconds (tables print milliseconds), bandwidth in GB/s (1e9 bytes per second).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

__all__ = [
    "Variant", "Result", "Target", "measure", "format_table", "format_targets",
    "common_parser", "apply_threads", "environment", "write_json",
]


@dataclass
class Variant:
    """One thing to time. ``fn()`` is one call (e.g. one optimizer step). ``setup()``, when given,
    runs before every call outside the timed region (e.g. assigning fresh gradient tensors).
    ``bytes_per_call`` (bytes read + written by one call) turns a time into a bandwidth.
    ``role`` is free text shown in the table: "probe", "torch", "ours", "info"..."""

    name: str
    fn: Callable[[], object]
    setup: Optional[Callable[[], object]] = None
    bytes_per_call: Optional[float] = None
    role: str = ""


@dataclass
class Result:
    """Per-call times of one variant, one entry per interleaved repeat (seconds)."""

    name: str
    role: str
    samples: list
    calls_per_sample: int
    bytes_per_call: Optional[float] = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def gbps(self) -> Optional[float]:
        if not self.bytes_per_call:
            return None
        return self.bytes_per_call / self.median / 1e9

    def to_dict(self) -> dict:
        d = asdict(self)
        d["median_s"] = self.median
        d["gbps"] = self.gbps
        return d


def _time_calls(v: Variant, calls: int) -> float:
    """Seconds per call, averaged over ``calls`` calls (setup, when present, not counted)."""
    if v.setup is None:
        t0 = time.perf_counter()
        for _ in range(calls):
            v.fn()
        return (time.perf_counter() - t0) / calls
    total = 0.0
    for _ in range(calls):
        v.setup()
        t0 = time.perf_counter()
        v.fn()
        total += time.perf_counter() - t0
    return total / calls


def measure(variants: Sequence[Variant], *, repeats: int = 7, warmup: int = 3,
            min_sample_s: float = 0.05, max_calls: int = 1000) -> list[Result]:
    """Time every variant ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    Each sample is the mean over enough calls to last about ``min_sample_s`` (calibrated per variant
    from the warm-up, capped at ``max_calls``), so fast calls are not lost in timer and scheduling
    noise. Round r starts at variant r mod len(variants), so no variant always runs right after
    the same neighbour. The garbage collector is paused while timing.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    calls = []
    for v in variants:
        for _ in range(max(warmup, 1)):
            if v.setup is not None:
                v.setup()
            v.fn()
        per_call = _time_calls(v, 1)
        calls.append(int(max(1, min(max_calls, round(min_sample_s / max(per_call, 1e-9))))))
    samples: list[list[float]] = [[] for _ in variants]
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        k = len(variants)
        for r in range(repeats):
            for j in range(k):
                i = (r + j) % k
                samples[i].append(_time_calls(variants[i], calls[i]))
    finally:
        if was_enabled:
            gc.enable()
    return [Result(v.name, v.role, s, c, v.bytes_per_call) for v, s, c in zip(variants, samples, calls)]


def _fmt(x: Optional[float], spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(title: str, results: Sequence[Result], *, baseline: Optional[str] = None,
                 probe: Optional[str] = None) -> str:
    """A fixed-width table: median ms, GB/s, spread (max/min sample), the speed relative to
    ``baseline`` (its time / this time: > 1 means faster than the baseline) and the fraction of
    ``probe``'s bandwidth (probe time / this time, same bytes)."""
    by_name = {r.name: r for r in results}
    base = by_name.get(baseline) if baseline else None
    prb = by_name.get(probe) if probe else None
    width = max([len(r.name) for r in results] + [len("variant")])
    head = f"{'variant':<{width}}  {'median ms':>10}  {'GB/s':>6}  {'spread':>6}"
    if prb is not None:
        head += f"  {'of probe':>8}"
    if base is not None:
        head += f"  {'speedup vs ' + baseline:>{max(10, len(baseline) + 11)}}"
    lines = [title, head, "-" * len(head)]
    for r in results:
        spread = max(r.samples) / min(r.samples) if min(r.samples) > 0 else None
        line = f"{r.name:<{width}}  {r.median * 1e3:>10.3f}  {_fmt(r.gbps, '6.1f'):>6}  {_fmt(spread, '6.2f'):>6}"
        if prb is not None:
            line += f"  {prb.median / r.median:>8.3f}"
        if base is not None:
            line += f"  {base.median / r.median:>{max(10, len(baseline) + 11)}.2f}x"
        lines.append(line)
    return "\n".join(lines)


@dataclass
class Target:
    """A speed target: ``value`` (a measured ratio) must be >= ``threshold``. With no threshold
    the line is context only (printed as "info", never a failure)."""

    label: str
    value: float
    threshold: Optional[float]
    note: str = ""

    @property
    def passed(self) -> Optional[bool]:
        return None if self.threshold is None else self.value >= self.threshold

    def to_dict(self) -> dict:
        return dict(label=self.label, value=self.value, threshold=self.threshold, passed=self.passed,
                    note=self.note)


def format_targets(targets: Sequence[Target]) -> str:
    lines = []
    for t in targets:
        note = f"  ({t.note})" if t.note else ""
        if t.threshold is None:
            lines.append(f"  info   {t.label}: {t.value:.3f}{note}")
            continue
        verdict = "PASS" if t.passed else "FAIL"
        lines.append(f"  target {t.label}: {t.value:.3f} (need >= {t.threshold:g})  {verdict}{note}")
    return "\n".join(lines)


def common_parser(description: Optional[str]) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark shares."""
    p = argparse.ArgumentParser(description=(description or "").split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (under a minute)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch.set_num_threads(N) (default: torch's default)")
    return p


def apply_threads(threads: Optional[int]) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def environment() -> dict:
    """What the numbers were measured on, for the JSON record and the table header."""
    import torch

    env = dict(python=sys.version.split()[0], torch=torch.__version__, threads=torch.get_num_threads(),
               machine=platform.machine(), cpu=_cpu_name(), cpus=os.cpu_count(),
               simd_cap=os.environ.get("TRAINPATTERNS_SIMD"))
    try:
        from trainpatterns import _kernels

        env["trainpatterns"] = _kernels.build_info()
    except Exception as e:  # the benchmark still reports the baselines without the extension
        env["trainpatterns"] = f"unavailable: {e}"
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: Optional[str], payload: dict) -> None:
    if not path:
        return
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
