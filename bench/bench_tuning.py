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

Time per suggestion: a Hartmann6 GP study is run up to 95 trials, then ``optimize(n_trials=1)`` is
timed for the next 10 trials (the sampler's whole cost: fit, acquisition, storage); median. Ours and
Optuna's are measured in this process, one after the other.

Scaling (``--part scaling``, about a minute): the time per suggestion at 300 and 1000 trials. Running
a GP study to a thousand trials takes longer than the measurement, so both samplers start from the
same stored history of n - 1 Hartmann6 trials shaped like a Bayesian optimisation run's
(``bo_like_history``: a fifth of the points spread, half clustered within 1e-4 to 1e-2 of the best,
as a GP run's are: half of its points at 300 trials lie within 1e-3 of an earlier one). Then
``optimize(n_trials=1)`` is timed, ours and Optuna's in turns (``_common.measure``), 12 suggestions
each at 300 and 10 at 1000. Ours refits the kernel only every few trials at these sizes (every 3rd at
300, every 10th at 1000), so the target is on the mean, which counts the refits; the median is
printed too.

Parallel workers (``--part parallel``): regret after 100 trials when 4 workers run 25 trials each,
against 1 worker running 100 (the regret part's GP runs). Simulated with ask/tell, so it is
reproducible and fast: 4 trials are always in flight, each finishing after a duration drawn uniformly in [0.5, 1.5]
(seeded); the earliest to finish is told, and its worker asks for the next trial at once. Every
proposal therefore sees 3 RUNNING trials.

Targets: our GP's median regret <= Optuna GP's at the same budget (ratio Optuna / ours >= 1); <= 50 ms
per suggestion at 100 trials, <= 100 ms at 300 and <= 1 s at 1000 (mean; ratio limit / ours >= 1).
Context (info): Optuna's time / ours at each size; regret of 1 x 100 / 4 x 25.

``--quick``: 50 trials, 3 seeds, scaling at 300 only. JSON: ``regret``, ``time_per_suggestion_s``
({"gp@100": median s}), ``scaling_s`` ({"gp@1000": [s per suggestion]}), ``targets``.

Run: python bench/bench_tuning.py [--quick] [--seeds N] [--part all|regret|timing|scaling|parallel]
[--lock FILE] [--json FILE] (``--lock FILE``: hold an exclusive flock on FILE only while the timed
suggestions run, so a shared machine's timing runs never overlap; regret is a quality measurement
and needs no lock.)
"""
from __future__ import annotations

import fcntl
import functools
import logging
import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (Target, Variant, apply_threads, common_parser, environment, format_targets,  # noqa: E402
                     measure, write_json)

import numpy as np  # noqa: E402

from trainpatterns.tuning import FloatDistribution, FrozenTrial, GPSampler, RandomSampler, TrialState  # noqa: E402
from trainpatterns.tuning import create_study  # noqa: E402

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


def _hartmann6_at(x) -> float:
    total = 0.0
    for a, p, alpha in zip(_H6_A, _H6_P, _H6_ALPHA):
        total -= alpha * math.exp(-sum(a[j] * (x[j] - p[j] * 1e-4) ** 2 for j in range(6)))
    return total


def hartmann6(trial) -> float:
    return _hartmann6_at([trial.suggest_float(f"x{i}", 0.0, 1.0) for i in range(6)])


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


def bo_like_history(n: int, seed: int = 0) -> list:
    """[(params, value)] of ``n`` Hartmann6 trials shaped like a Bayesian optimisation run's (module
    docstring): 10 uniform points, then 20% uniform, 30% near one of the 5 best so far (Gaussian
    steps of 0.05), 50% refining the best (steps of 10^-4.5 to 10^-2.5, log-uniform)."""
    rng = np.random.default_rng(seed)
    xs: list = []
    ys: list = []
    for i in range(n):
        u = rng.random()
        if i < 10 or u < 0.2:
            x = rng.random(6)
        elif u < 0.5:
            top = np.argsort(ys)[:5]
            x = xs[top[rng.integers(len(top))]] + rng.normal(0.0, 0.05, 6)
        else:
            x = xs[int(np.argmin(ys))] + rng.normal(0.0, 10 ** rng.uniform(-4.5, -2.5), 6)
        xs.append(np.clip(x, 0.0, 1.0))
        ys.append(_hartmann6_at(xs[-1]))
    return [({f"x{j}": float(x[j]) for j in range(6)}, y) for x, y in zip(xs, ys)]


def _prefilled(variant: str, history: list):
    """A Hartmann6 study of ``variant`` ("gp" or "optuna-gp", seed 0) holding ``history`` as COMPLETE trials."""
    if variant == "optuna-gp":
        study = _OptunaStudy(0)
        dist = optuna.distributions.FloatDistribution(0.0, 1.0)
        study.study.add_trials([optuna.trial.create_trial(params=p, distributions={k: dist for k in p}, value=v)
                                for p, v in history])
        return study
    study = _ours("gp", 0)
    dist = FloatDistribution(0.0, 1.0)
    # The storage's bulk insert (what import_from_optuna uses): claiming and telling a thousand
    # trials one by one would run the sampler for each.
    study.storage.add_trials(study._study_id, [
        FrozenTrial(number=i, state=TrialState.COMPLETE, value=v, params=p, distributions={k: dist for k in p},
                    datetime_start=float(i), datetime_complete=float(i)) for i, (p, v) in enumerate(history)])
    return study


def scaling(sizes: tuple, timed: list, lock: Optional[str]) -> dict:
    """{(variant, n): [seconds of each timed suggestion]} from a stored history of n - 1 trials, the
    variants in turns; 12 suggestions at 300, 10 at 1000 (one kernel refit period of ours there)."""
    out = {}
    history = bo_like_history(max(sizes) - 1)
    for n in sizes:
        studies = {v: _prefilled(v, history[:n - 1]) for v in timed}
        variants = [Variant(v, functools.partial(st.optimize, hartmann6, n_trials=1)) for v, st in studies.items()]
        with _locked(lock):
            res = measure(variants, repeats=12 if n <= 300 else 10, warmup=1, min_sample_s=0.0)
        for r in res:
            out[(r.name, n)] = r.samples
    return out


def parallel_runs(fn_name: str, seeds: int, n_trials: int, workers: int) -> dict:
    """{budget: [regret per seed]} of our GP with ``workers`` trials always in flight (ask/tell; each
    trial's objective runs when asked, its result is told after a duration uniform in [0.5, 1.5])."""
    fn, fmin = FUNCTIONS[fn_name]
    out = {b: [] for b in BUDGETS if b <= n_trials}
    for seed in range(seeds):
        study = _ours("gp", seed)
        rng = np.random.default_rng(seed)
        running: list = []  # (finish time, trial, value)
        now = 0.0
        for _ in range(n_trials):
            if len(running) == workers:
                running.sort(key=lambda r: r[0])
                now, trial, value = running.pop(0)
                study.tell(trial, value)
            trial = study.ask()
            running.append((now + rng.uniform(0.5, 1.5), trial, fn(trial)))
        for _, trial, value in running:
            study.tell(trial, value)
        vals = [t.value for t in study.trials]
        for b in out:
            out[b].append(min(vals[:b]) - fmin)
    return out


def _regret_table(title: str, columns: dict, n_trials: int) -> None:
    """Print median [min, max] regret per function and budget; ``columns``: {name: {fn: {budget: [regret]}}}."""
    head = f"{'function':<10} {'trials':>6}  " + "  ".join(f"{v:>22}" for v in columns)
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    for fn_name in FUNCTIONS:
        for b in (b for b in BUDGETS if b <= n_trials):
            cells = [f"{statistics.median(c[fn_name][b]):9.2e} [{min(c[fn_name][b]):.0e},{max(c[fn_name][b]):.0e}]"
                     for c in columns.values()]
            print(f"{fn_name:<10} {b:>6}  " + "  ".join(f"{c:>22}" for c in cells))


def _regret_targets(results: dict, n_trials: int) -> list:
    targets = []
    for fn_name in FUNCTIONS:
        for b in (b for b in BUDGETS if b <= n_trials):
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
    return targets


LIMITS = {100: 0.050, 300: 0.100, 1000: 1.0}  # seconds per suggestion: the targets


def _timing_targets(timing: dict, scaled: dict) -> list:
    targets = []
    if ("gp", 100) in timing:
        targets.append(Target("time per suggestion @100: 50 ms / ours (median)", LIMITS[100] / timing[("gp", 100)], 1.0,
                              f"ours {timing[('gp', 100)] * 1e3:.1f} ms; absolute time, noisy on a shared box"))
    if ("optuna-gp", 100) in timing:
        targets.append(Target("time per suggestion @100: optuna / ours", timing[("optuna-gp", 100)] / timing[("gp", 100)],
                              None, "same process, one after the other"))
    for (v, n), samples in scaled.items():
        if v != "gp":
            continue
        mean = statistics.mean(samples)
        targets.append(Target(f"time per suggestion @{n}: {LIMITS[n] * 1e3:.0f} ms / ours (mean)", LIMITS[n] / mean,
                              1.0, f"ours {mean * 1e3:.1f} ms mean, {statistics.median(samples) * 1e3:.1f} ms median"))
        if ("optuna-gp", n) in scaled:
            theirs = statistics.mean(scaled[("optuna-gp", n)])
            targets.append(Target(f"time per suggestion @{n}: optuna / ours (mean)", theirs / mean, None,
                                  f"optuna {theirs * 1e3:.1f} ms; in turns, same history"))
    return targets


def main() -> int:
    parser = common_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per case (default 10, --quick 3)")
    parser.add_argument("--part", choices=("all", "regret", "timing", "scaling", "parallel"), default="all",
                        help="which measurements to run")
    parser.add_argument("--lock", metavar="FILE", default=None, help="flock FILE around the timed suggestions")
    args = parser.parse_args()
    apply_threads(args.threads)
    logging.getLogger("trainpatterns.tuning").setLevel(logging.ERROR)
    seeds = args.seeds or (3 if args.quick else 10)
    n_trials = 50 if args.quick else 100
    part = {args.part} if args.part != "all" else {"regret", "timing", "scaling", "parallel"}
    variants = ["random", "gp"] + (["optuna-gp", "gp|optuna-start"] if optuna is not None else [])
    timed = ["gp"] + (["optuna-gp"] if optuna is not None else [])
    env = environment()
    print(f"tuning benchmark: {seeds} seeds, up to {n_trials} trials; optuna "
          f"{optuna.__version__ if optuna else 'not installed (reference: ANCHORS figures)'}; "
          f"torch threads {env['threads']}, {env['cpus']} CPUs ({env['cpu']})")
    results: dict = {}
    starts: dict = {}
    t_start = time.perf_counter()
    for fn_name in FUNCTIONS if part & {"regret", "parallel"} else ():
        for v in variants if "regret" in part else ["gp"]:
            t0 = time.perf_counter()
            results[(fn_name, v)] = regret_runs(fn_name, v, seeds, n_trials, starts)
            print(f"  ran {fn_name:<9} {v:<9} in {time.perf_counter() - t0:7.1f}s", flush=True)
        if "parallel" in part:
            t0 = time.perf_counter()
            results[(fn_name, "gp 4x")] = parallel_runs(fn_name, seeds, n_trials, workers=4)
            print(f"  ran {fn_name:<9} gp, 4 workers in {time.perf_counter() - t0:7.1f}s", flush=True)
    if "regret" in part:
        _regret_table("median simple regret over seeds [min, max]",
                      {v: {f: results[(f, v)] for f in FUNCTIONS} for v in variants}, n_trials)
    if "parallel" in part:
        _regret_table(f"parallel workers: our GP, median regret over seeds [min, max] (4 workers: {n_trials // 4} "
                      "trials each, 3 trials always pending)",
                      {f"1 worker x {n_trials}": {f: results[(f, "gp")] for f in FUNCTIONS},
                       f"4 workers x {n_trials // 4}": {f: results[(f, "gp 4x")] for f in FUNCTIONS}}, n_trials)
    timing = {(v, 100): time_per_suggestion(v, 100, args.lock) for v in timed} if "timing" in part else {}
    scaled = scaling((300,) if args.quick else (300, 1000), timed, args.lock) if "scaling" in part else {}
    if timing or scaled:
        print("\ntime per suggestion, Hartmann6 (n=100: a GP run, median of 10; larger: a stored history, "
              "in turns, mean and median)")
    for n in (100,) if timing else ():
        print(f"  n={n:<5}" + "".join(f"  {v}: {timing[(v, n)] * 1e3:8.1f} ms" for v in timed))
    for n in sorted({n for _, n in scaled}):
        print(f"  n={n:<5}" + "".join(f"  {v}: {statistics.mean(scaled[(v, n)]) * 1e3:8.1f} ms mean, "
                                      f"{statistics.median(scaled[(v, n)]) * 1e3:8.1f} median" for v in timed))
    targets = _regret_targets(results, n_trials) if "regret" in part else []
    targets += _timing_targets(timing, scaled)
    for fn_name in FUNCTIONS if "parallel" in part else ():
        one, four = (statistics.median(results[(fn_name, v)][n_trials]) for v in ("gp", "gp 4x"))
        targets.append(Target(f"{fn_name}@{n_trials} regret: 1 worker / 4 workers", one / max(four, 1e-300), None,
                              f"1 x {n_trials}: {one:.2e}, 4 x {n_trials // 4}: {four:.2e}"))
    print("\ntargets")
    print(format_targets(targets))
    print(f"\ntotal {time.perf_counter() - t_start:.0f}s")
    payload = dict(environment=env, seeds=seeds, n_trials=n_trials,
                   regret={f"{f}/{v}": {str(b): r for b, r in res.items()} for (f, v), res in results.items()},
                   time_per_suggestion_s={f"{v}@{n}": t for (v, n), t in timing.items()},
                   scaling_s={f"{v}@{n}": samples for (v, n), samples in scaled.items()},
                   targets=[t.to_dict() for t in targets])
    write_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
