"""Benchmark of the tuning samplers: simple regret and time per suggestion, ours vs Optuna.

Why: a Bayesian sampler is worth its cost only if it finds better points than random search in
fewer trials, at least as well as the reference implementation (Optuna's GPSampler), and cheaply
enough that the sampler is never the bottleneck of a study.

Regret: Branin (2-D, min 0.397887) and Hartmann6 (6-D, min -3.32237), ``--seeds`` seeds (10), the
median over seeds of the simple regret (best value found - true minimum) after 30 / 50 / 100 trials,
for our RandomSampler, our GPSampler and, when installed, Optuna's GPSampler; every GP runs with
``deterministic_objective=True`` (the functions are noise-free) and 10 startup trials. Without Optuna
the reference figures are Optuna 5.0's GPSampler medians on this kind of machine (Branin @50
5.7e-5, Hartmann6 @100 8.9e-5; ANCHOR_REGRET below).

Diagnostic column (with Optuna): "gp|optuna-start", our GP started from the very 10 startup points
Optuna's run drew for the same seed (enqueued), so the two GPs differ only in the modelling and
acquisition from trial 10 on. On Hartmann6, which startup design lands a point near the global
basin decides most of the median over 10 seeds (see bench/RESULTS.md); this column shows the GP
part alone. It carries no target: the targets compare the samplers as a user gets them.

Time per suggestion: a Hartmann6 GP study is run up to n - 5 trials, then ``optimize(n_trials=1)`` is
timed for the next 10 trials (the sampler's whole cost: fit, acquisition, storage); median, at n = 100
and 300 (``--quick``: 100 only). Ours and Optuna's are measured in this process, one after the other.

Targets: our GP's median regret <= Optuna GP's at the same budget (ratio Optuna / ours >= 1), and
<= 50 ms per suggestion at 100 trials (ratio 50 ms / ours >= 1).

Run: python bench/bench_tuning.py [--quick] [--seeds N] [--part all|regret|timing] [--lock FILE] [--json FILE]
(``--lock FILE``: hold an exclusive flock on FILE only while the timed suggestions run, so a shared
machine's timing runs never overlap; the regret part is a quality measurement and needs no lock.)
"""
from __future__ import annotations

import fcntl
import logging
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Target, apply_threads, common_parser, environment, format_targets, write_json  # noqa: E402

from trainpatterns.tuning import GPSampler, RandomSampler, create_study  # noqa: E402

try:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
except ImportError:  # optional: the anchors stand in for it
    optuna = None

ANCHOR_REGRET = {("branin", 50): 5.7e-5, ("hartmann6", 100): 8.9e-5}
BUDGETS = (30, 50, 100)

_H6_A = [[10, 3, 17, 3.5, 1.7, 8], [0.05, 10, 17, 0.1, 8, 14], [3, 3.5, 1.7, 10, 17, 8], [17, 8, 0.05, 10, 0.1, 14]]
_H6_P = [[1312, 1696, 5569, 124, 8283, 5886], [2329, 4135, 8307, 3736, 1004, 9991],
         [2348, 1451, 3522, 2883, 3047, 6650], [4047, 8828, 8732, 5743, 1091, 381]]
_H6_ALPHA = [1.0, 1.2, 3.0, 3.2]


def branin(trial) -> float:
    x = trial.suggest_float("x", -5.0, 10.0)
    y = trial.suggest_float("y", 0.0, 15.0)
    return (y - 5.1 / (4 * math.pi ** 2) * x * x + 5 / math.pi * x - 6) ** 2 + 10 * (1 - 1 / (8 * math.pi)) * math.cos(x) + 10


def hartmann6(trial) -> float:
    x = [trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(6)]
    total = 0.0
    for a, p, alpha in zip(_H6_A, _H6_P, _H6_ALPHA):
        total -= alpha * math.exp(-sum(a[j] * (x[j] - p[j] * 1e-4) ** 2 for j in range(6)))
    return total


FUNCTIONS = {"branin": (branin, 0.397887357729738), "hartmann6": (hartmann6, -3.32236801141551)}


def _ours(kind: str, seed: int):
    if kind == "random":
        return create_study(sampler=RandomSampler(seed=seed))
    return create_study(sampler=GPSampler(seed=seed, deterministic_objective=True))


class _OptunaStudy:
    """Optuna's study behind the two calls used here (optimize, best values per budget)."""

    def __init__(self, seed: int) -> None:
        self.study = optuna.create_study(sampler=optuna.samplers.GPSampler(seed=seed, deterministic_objective=True))

    def optimize(self, fn: Callable, n_trials: int) -> None:
        self.study.optimize(fn, n_trials=n_trials)

    def values(self) -> list:
        return [t.value for t in self.study.trials]

    def params(self) -> list:
        return [t.params for t in self.study.trials]


def _values(study) -> list:
    return study.values() if isinstance(study, _OptunaStudy) else [t.value for t in study.trials]


N_STARTUP = 10  # GPSampler's default for ours and Optuna's


def regret_runs(fn_name: str, variant: str, seeds: int, n_trials: int, starts: dict) -> dict:
    """{budget: [regret per seed]} for one function and sampler. An "optuna-gp" run records its
    startup points in ``starts[(fn_name, seed)]``; "gp|optuna-start" replays them."""
    fn, fmin = FUNCTIONS[fn_name]
    out = {b: [] for b in BUDGETS if b <= n_trials}
    for seed in range(seeds):
        study = _OptunaStudy(seed) if variant == "optuna-gp" else _ours("gp" if variant == "gp|optuna-start" else variant, seed)
        if variant == "gp|optuna-start":
            for params in starts[(fn_name, seed)]:
                study.enqueue_trial(params)
        study.optimize(fn, n_trials=n_trials)
        if variant == "optuna-gp":
            starts[(fn_name, seed)] = study.params()[:N_STARTUP]
        vals = _values(study)
        for b in out:
            out[b].append(min(vals[:b]) - fmin)
    return out


@contextmanager
def _locked(path: Optional[str]) -> Iterator[None]:
    """An exclusive flock on ``path`` for the block (nothing without a path)."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def time_per_suggestion(variant: str, n: int, lock: Optional[str]) -> float:
    """Median seconds of one optimize(n_trials=1) call at trials n-5 .. n+4 of a Hartmann6 study
    (the first n-5 trials, not timed, run outside the lock)."""
    study = _OptunaStudy(0) if variant == "optuna-gp" else _ours("gp", 0)
    study.optimize(hartmann6, n_trials=n - 5)
    samples = []
    with _locked(lock):
        for _ in range(10):
            t0 = time.perf_counter()
            study.optimize(hartmann6, n_trials=1)
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per case (default 10, --quick 3)")
    parser.add_argument("--part", choices=("all", "regret", "timing"), default="all", help="which measurements to run")
    parser.add_argument("--lock", metavar="FILE", default=None, help="flock FILE around the timed suggestions")
    args = parser.parse_args()
    apply_threads(args.threads)
    logging.getLogger("trainpatterns.tuning").setLevel(logging.ERROR)
    seeds = args.seeds or (3 if args.quick else 10)
    n_trials = 50 if args.quick else 100
    variants = ["random", "gp"] + (["optuna-gp", "gp|optuna-start"] if optuna is not None else [])
    timed = ["gp"] + (["optuna-gp"] if optuna is not None else [])
    env = environment()
    print(f"tuning benchmark: {seeds} seeds, up to {n_trials} trials; optuna "
          f"{optuna.__version__ if optuna else 'not installed (reference: ANCHORS figures)'}; "
          f"torch threads {env['threads']}, {env['cpus']} CPUs ({env['cpu']})")
    results: dict = {}
    starts: dict = {}
    t_start = time.perf_counter()
    for fn_name in FUNCTIONS if args.part != "timing" else ():
        for v in variants:
            t0 = time.perf_counter()
            results[(fn_name, v)] = regret_runs(fn_name, v, seeds, n_trials, starts)
            print(f"  ran {fn_name:<9} {v:<9} in {time.perf_counter() - t0:7.1f}s", flush=True)
    if results:
        head = f"{'function':<10} {'trials':>6}  " + "  ".join(f"{v:>22}" for v in variants)
        print("\nmedian simple regret over seeds [min, max]")
        print(head)
        print("-" * len(head))
    for fn_name in FUNCTIONS if results else ():
        for b in BUDGETS:
            if b > n_trials:
                continue
            cells = []
            for v in variants:
                r = results[(fn_name, v)][b]
                cells.append(f"{statistics.median(r):9.2e} [{min(r):.0e},{max(r):.0e}]")
            print(f"{fn_name:<10} {b:>6}  " + "  ".join(f"{c:>22}" for c in cells))
    sizes = () if args.part == "regret" else (100,) if args.quick else (100, 300)
    timing = {}
    for n in sizes:
        for v in timed:
            timing[(v, n)] = time_per_suggestion(v, n, args.lock)
    if timing:
        print("\ntime per suggestion (Hartmann6, median of 10 trials around n)")
    for n in sizes:
        line = f"  n={n:<4}" + "".join(f"  {v}: {timing[(v, n)] * 1e3:8.1f} ms" for v in timed)
        if ("optuna-gp", n) in timing:
            line += f"  (optuna / ours: {timing[('optuna-gp', n)] / timing[('gp', n)]:.2f}x)"
        print(line)
    targets = []
    for fn_name in FUNCTIONS if results else ():
        for b in BUDGETS:
            if b > n_trials:
                continue
            ours = statistics.median(results[(fn_name, "gp")][b])
            if optuna is not None:
                ref, src = statistics.median(results[(fn_name, "optuna-gp")][b]), "optuna measured here"
            elif (fn_name, b) in ANCHOR_REGRET:
                ref, src = ANCHOR_REGRET[(fn_name, b)], "ANCHORS figure"
            else:
                continue
            targets.append(Target(f"{fn_name}@{b} regret: reference / ours", ref / max(ours, 1e-300), 1.0,
                                  f"ours {ours:.2e}, reference {ref:.2e} ({src})"))
            if optuna is not None and (fn_name, b) in ANCHOR_REGRET:
                targets.append(Target(f"{fn_name}@{b} regret: ANCHORS / ours", ANCHOR_REGRET[(fn_name, b)] / max(ours, 1e-300),
                                      None, "Optuna 5.0's reference figure"))
    if ("gp", 100) in timing:
        targets.append(Target("time per suggestion @100: 50 ms / ours", 0.050 / timing[("gp", 100)], 1.0,
                              f"ours {timing[('gp', 100)] * 1e3:.1f} ms; absolute time, noisy on a shared box"))
    if ("optuna-gp", 100) in timing:
        targets.append(Target("time per suggestion @100: optuna / ours", timing[("optuna-gp", 100)] / timing[("gp", 100)],
                              None, "same process, one after the other"))
    print("\ntargets")
    print(format_targets(targets))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    payload = dict(environment=env, seeds=seeds, n_trials=n_trials,
                   regret={f"{f}/{v}": {str(b): r for b, r in res.items()} for (f, v), res in results.items()},
                   time_per_suggestion_s={f"{v}@{n}": t for (v, n), t in timing.items()},
                   targets=[t.to_dict() for t in targets])
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
