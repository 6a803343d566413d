"""Where the time of a fused optimizer step goes: the per-phase profile of bench_optim.py case (b).

A FusedAdamW step is, in order: the plan lookup, whose one native call checks the cached pointer
tables against the live tensors and points them at new gradient tensors (``TensorWatch.refresh``,
csrc/common/tensor_watch.h); the gradient multiplier's decision (unscale and clip,
_grad_control.py); the kernel call (its params struct, the GIL released, the native pass); and the
Python around them (``step()`` itself: the test for hooks and a running profiler, ``no_grad``, the
loops). A second optimizer with the same tensors has those three methods wrapped with timers, and
its steps are timed in turns with everything else, so each phase is measured inside real steps,
in the cache state a step leaves it in. What a step takes beyond the three is the Python around.

:func:`grad_read_floor` is the floor of any step that must notice a gradient swapped between steps
(``p.grad = other``, or ``zero_grad(set_to_none=True)`` + backward): the kernel alone, then one read
of every parameter's ``.grad`` and nothing else. After the kernel's pass those tensor objects are
out of the cache, so the read costs far more than the same loop on hot objects.

This wraps private methods of the optimizer; when they change, :func:`profiled_step` returns None
and the profile is left out (the benchmark itself still runs).
"""
from __future__ import annotations

import operator
import statistics
import time
from typing import Callable, Optional

from _common import Variant

PHASES = ("plan lookup: check + gradient refresh (TensorWatch.refresh)",
          "gradient control (unscale/clip decision)", "kernel call (params struct, GIL released, native pass)")
REST = "Python around them (step() minus the above)"
WHOLE = "whole step, ours (timed with the phases)"
TORCH = "whole step, torch (same gradients)"


FLOOR = "  floor: kernel + one read of every .grad"


def grad_read_floor(kernel: Optional[Variant], opt) -> Optional[Variant]:
    """The kernel-only call of ``opt`` followed by one C-level read of every parameter's ``.grad``:
    a lower bound on a step that checks its gradients. None without the kernel-only row."""
    if kernel is None:
        return None
    params = [p for group in opt.param_groups for p in group["params"]]
    grad_of = operator.attrgetter("grad")

    def run() -> None:
        kernel.fn()
        list(map(grad_of, params))
    return Variant(FLOOR, run, role="info")


class _PhaseClock:
    """Times the phases of each step of ``opt`` by wrapping its methods on the instance."""

    def __init__(self, opt) -> None:
        self.opt = opt
        self.now = dict.fromkeys(PHASES, 0.0)
        self.samples: dict = {name: [] for name in (*PHASES, REST, WHOLE)}
        for obj, attr, phase in ((opt, "_plan", PHASES[0]), (opt._grad_control, "for_step", PHASES[1]),
                                 (opt, "_kernel", PHASES[2])):
            setattr(obj, attr, self._timed(getattr(obj, attr), phase))

    def _timed(self, fn: Callable, phase: str) -> Callable:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[phase] += time.perf_counter() - t0
        return timed

    def step(self) -> None:
        self.now = dict.fromkeys(PHASES, 0.0)
        t0 = time.perf_counter()
        self.opt.step()
        whole = time.perf_counter() - t0
        for phase, seconds in self.now.items():
            self.samples[phase].append(seconds)
        self.samples[REST].append(whole - sum(self.now.values()))
        self.samples[WHOLE].append(whole)

    def medians(self) -> dict:
        return {name: statistics.median(values) for name, values in self.samples.items()}


def profiled_step(opt, kind: str, setup: Optional[Callable[[], None]]) -> Optional[tuple]:
    """(variant, clock): steps of ``opt`` (an optimizer of its own, on tensors like the timed one's)
    with each phase timed; None when the methods it wraps are not there."""
    try:
        clock = _PhaseClock(opt)
    except AttributeError as e:
        print(f"  (per-phase profile left out: {e})")
        return None
    return Variant(f"  ours, phases timed ({kind})", clock.step, setup=setup, role="phase"), clock


def profile(results: list, clocks: dict) -> Optional[dict]:
    """{kind: {row: seconds}} from the clocks ({kind: (clock, name of torch's variant)}): the phases,
    the Python around them, our whole step and torch's; None when no clock ran."""
    by = {r.name: r for r in results}
    out = {}
    for kind, (clock, theirs) in clocks.items():
        if clock is None or not clock.samples[WHOLE]:
            return None
        out[kind] = {**clock.medians(), TORCH: by[theirs].median}
    return out


def format_profile(title: str, prof: dict) -> str:
    """The profile as a table: per kind, milliseconds and the share of our whole step."""
    kinds = list(prof)
    rows = list(prof[kinds[0]])
    width = max(len(r) for r in rows)
    head = f"{'phase':<{width}}" + "".join(f"  {k + ', ms':>24}  {'share':>5}" for k in kinds)
    lines = [title, head, "-" * len(head)]
    for row in rows:
        line = f"{row:<{width}}"
        for k in kinds:
            share = "-" if row == TORCH else f"{100 * prof[k][row] / prof[k][WHOLE]:.0f}%"
            line += f"  {prof[k][row] * 1e3:>24.3f}  {share:>5}"
        lines.append(line)
    return "\n".join(lines)


def without_phases(results: list) -> list:
    """The results without the profiled variants (they have their own table)."""
    return [r for r in results if r.role != "phase"]
