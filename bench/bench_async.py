"""Benchmark of asynchronous data parallelism: AsyncDataParallel (1 parameter server + 2 workers)
against SyncDataParallel (2 workers), with and without a straggler.

Why: a synchronous job moves at the pace of its slowest rank; an asynchronous one lets each worker
push gradients at its own pace. Targets, with one worker slowed 3x: the asynchronous job processes
>= 1.8x the samples per second of the synchronous one, and reaches a fixed validation MSE in <= 0.7x
its wall time. Without the straggler the same two ratios are reported for context only.

The task: the damped pendulum (``trainpatterns.pendulum.pendulum_data``: 16384 training rows, 4096
held-out rows), an MLP 2->H->H->2 (tanh, H=256: ~67k parameters), FusedAdamW (lr 3e-4), batches of
B=256 rows per worker drawn at random from that worker's half of the rows. Same initial weights, same
data and the same sample budget for both: the synchronous job takes S steps of 2 x B rows, the
asynchronous one 2 x S updates of B rows (``total_updates``, ``pull_every=1``; --max-staleness and
--staleness-lr pass AsyncDataParallel's options, unset by default as in its defaults).

The straggler: the last worker sleeps after every step twice the time one step of the synchronous
job takes without a straggler (measured once by a short calibration launch before the jobs), so its
steps take about 3x as long; both variants get the same sleep (--sleep-ms sets it).

Timing: every process reads the machine's monotonic clock (shared by the processes of one host).
A job starts when its first worker enters its training loop and ends at the last applied update.
Samples/s = rows of the applied updates / that time. Validation MSE is measured without slowing the
job: an optimizer step post-hook copies the parameters (with the time) every K applied updates, where
the updates are applied: on the parameter server (K=20 updates of B rows), on rank 0 of the
synchronous job (every K/2 steps of 2 x B rows, the same number of rows); after the job, that rank
scores each copy on the held-out rows. Time to MSE = time of the first copy at or below the target
(default 1e-2; --quick: 5e-2), from the start of the job; a job that never gets there scores inf.
The table shows the asynchronous job's staleness (mean/max) and refused gradients beside it. The
learning rate is one both variants can use: this task is unusually sensitive to stale gradients
(FusedAdamW at lr 1e-3 with gradients one update stale ends 10x above the fresh-gradient MSE; at
3e-4 the asynchronous job converges), the usual price of asynchrony that docs/async.md states.

Turns: one invocation runs both scenarios x both variants; each round runs the four jobs, starting
from a different one each round, and the table reports medians over rounds (bench/_common.py's rule).
This script starts the rank processes itself (torchrun's variables on 127.0.0.1, a free port), one
job at a time; each rank runs with one torch thread (--threads).

Caveat, 2-core machines: the asynchronous job has 3 processes (the server's optimizer steps and RPC
threads compete with the workers for the cores) against the synchronous job's 2, so without a
straggler it pays for oversubscription; with one, the straggler's sleep frees a core, which the
asynchronous job uses and the synchronous one cannot. Quote ratios from a quiet box with >= 4 cores.

Run: python bench/bench_async.py [--quick] [--repeats N] [--json FILE]; --floor prints, in one process,
the updates the task needs to reach the target MSE with gradients 0-3 updates stale: the floor that
asynchrony puts under the time to loss (bench/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Target, common_parser, environment, format_targets, write_json  # noqa: E402

import trainpatterns as tp  # noqa: E402
from trainpatterns.optim import FusedAdamW  # noqa: E402
from trainpatterns.pendulum import pendulum_data  # noqa: E402

WORKERS = 2
VARIANTS = ("sync", "async")
SCENARIOS = {False: "no straggler", True: "straggler"}
PYTHON_DIR = str(Path(tp.__file__).resolve().parent.parent)


def mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, 2))


# ----- inside a rank ----------------------------------------------------------------------------

class Recorder:
    """Optimizer step post-hook: every ``every`` steps, and at step ``last``, the time and a copy of
    the optimizer's parameters (in its own order). A copy of ~67k floats costs microseconds."""

    def __init__(self, every: int, last: int) -> None:
        self.every, self.last, self.count = max(1, every), last, 0
        self.copies: list = []

    def __call__(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        self.count += 1
        if self.count % self.every == 0 or self.count == self.last:
            values = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
            self.copies.append((time.monotonic(), self.count, values))


def score(cfg: dict, model: nn.Module, params: list, rec: Recorder) -> list:
    """[time, updates, validation MSE] of every copy ``rec`` took; ``params`` are ``model``'s
    parameters in the recording optimizer's order."""
    xv, yv = pendulum_data(cfg["val_rows"], seed=cfg["seed"] + 1)
    out = []
    with torch.no_grad():
        for t, count, values in rec.copies:
            for p, v in zip(params, values):
                p.copy_(v)
            out.append([t, count, F.mse_loss(model(xv), yv).item()])
    return out


def staleness_floor(cfg: dict, limit: int = 3000) -> list:
    """Updates (and rows) single-process training needs to reach the target MSE when every gradient
    is computed on the weights of ``d`` updates ago: the floor asynchrony puts under the time to loss.
    Rows: (label, updates or None, rows)."""
    x, y = pendulum_data(cfg["train_rows"], seed=cfg["seed"])
    xv, yv = pendulum_data(cfg["val_rows"], seed=cfg["seed"] + 1)
    out = []
    for batch, delay in ((WORKERS * cfg["batch"], 0), (cfg["batch"], 0), (cfg["batch"], 1), (cfg["batch"], 2),
                         (cfg["batch"], 3)):
        torch.manual_seed(cfg["seed"])
        model, stale = mlp(cfg["hidden"]), mlp(cfg["hidden"])
        opt = FusedAdamW(model.parameters(), lr=cfg["lr"])
        gen = torch.Generator().manual_seed(1)
        past = [[p.detach().clone() for p in model.parameters()]]
        hit = None
        for i in range(1, limit + 1):
            with torch.no_grad():
                for p, v in zip(stale.parameters(), past[0]):
                    p.copy_(v)
            stale.zero_grad()
            idx = torch.randint(len(x), (batch,), generator=gen)
            F.mse_loss(stale(x[idx]), y[idx]).backward()
            for p, q in zip(model.parameters(), stale.parameters()):
                p.grad = q.grad.clone()
            opt.step()
            past = (past + [[p.detach().clone() for p in model.parameters()]])[-(delay + 1):]
            if i % 20 == 0:
                with torch.no_grad():
                    if F.mse_loss(model(xv), yv).item() <= cfg["target_mse"]:
                        hit = i
                        break
        out.append((f"{batch} rows, {delay} update(s) stale", hit, None if hit is None else hit * batch))
    return out


def sync_step_s(cfg: dict) -> float:
    """Seconds per step of the synchronous job without a straggler (a short calibration launch): the
    step the straggler's sleep is measured against, communication included."""
    probe = dict(cfg, steps=min(cfg["steps"], 300), sleep_s=0.0)
    run = launch(probe, "sync", False)
    return run["job_s"] / probe["steps"]


def train_loop(cfg: dict, worker: int, step: Callable, more: Callable[[], bool]) -> dict:
    """One worker's loop: random batches from its half of the rows, ``step(x, y)`` while ``more()``;
    the straggler sleeps after each step (see the module docstring)."""
    x, y = pendulum_data(cfg["train_rows"], seed=cfg["seed"])
    part = torch.arange(worker, len(x), WORKERS)
    gen = torch.Generator().manual_seed(cfg["seed"] * 1000 + worker + 1)
    straggler = cfg["straggler"] and worker == WORKERS - 1
    sleep = cfg["sleep_s"]
    steps = 0
    start = time.monotonic()
    while more():
        idx = part[torch.randint(len(part), (cfg["batch"],), generator=gen)]
        step(x[idx], y[idx])
        steps += 1
        if straggler:
            time.sleep(sleep)
    return {"start": start, "end": time.monotonic(), "steps": steps, "sleep_s": (sleep or 0.0) if straggler else 0.0}


def run_sync(cfg: dict) -> dict:
    from trainpatterns.distributed import SyncDataParallel, init_from_env, shutdown

    info = init_from_env("gloo", timeout=cfg["timeout_s"])
    torch.manual_seed(cfg["seed"])
    model = mlp(cfg["hidden"])
    opt = FusedAdamW(model.parameters(), lr=cfg["lr"])
    rec = Recorder(cfg["record_every"] // WORKERS, cfg["steps"]) if info.rank == 0 else None
    if rec is not None:
        opt.register_step_post_hook(rec)
    sdp = SyncDataParallel(model)
    left = [cfg["steps"]]

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        opt.zero_grad()
        F.mse_loss(sdp(xb), yb).backward()
        opt.step()
        left[0] -= 1

    out = train_loop(cfg, info.rank, step, lambda: left[0] > 0)
    shutdown()
    if rec is not None:
        out["copies"] = score(cfg, model, list(model.parameters()), rec)
        out["rows"] = cfg["steps"] * WORKERS * cfg["batch"]
    return out


def run_async(cfg: dict) -> dict:
    from trainpatterns.distributed import AsyncDataParallel

    torch.manual_seed(cfg["seed"])
    model = mlp(cfg["hidden"])
    updates = cfg["steps"] * WORKERS
    rec = Recorder(cfg["record_every"], updates)

    def make_optimizer(params: list) -> torch.optim.Optimizer:
        opt = FusedAdamW(params, lr=cfg["lr"])
        opt.register_step_post_hook(rec)
        return opt

    adp = AsyncDataParallel(model, optimizer=make_optimizer, num_servers=1, total_updates=updates,
                            max_staleness=cfg["max_staleness"], staleness_lr=cfg["staleness_lr"],
                            timeout=cfg["timeout_s"])
    out: dict = {}
    if adp.is_server:
        adp.serve()
    else:
        def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
            F.mse_loss(adp(xb), yb).backward()
            adp.step(rows=len(xb))

        out = train_loop(cfg, adp.worker, step, lambda: adp.training)
    adp.finish()
    if adp.is_server:
        stats = adp.stats()
        trainable = [p for p in model.parameters() if p.requires_grad]
        out["copies"] = score(cfg, model, [trainable[i] for i in adp.shards[0].model_indices], rec)
        out["rows"] = sum(w["rows"] for w in stats["workers"].values())
        out["stats"] = {k: stats[k] for k in ("updates", "refused", "staleness", "workers", "dropped")}
    return out


def rank_main(job_file: str) -> None:
    cfg = json.loads(Path(job_file).read_text())
    torch.set_num_threads(cfg["threads"])
    out = (run_sync if cfg["variant"] == "sync" else run_async)(cfg)
    rank = int(os.environ["RANK"])
    Path(cfg["out_dir"], f"rank{rank}.json").write_text(json.dumps(out))


# ----- the launcher -----------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: dict, variant: str, straggler: bool) -> dict:
    """Run one job (its ranks as subprocesses, killed at the timeout) and summarise it."""
    world = WORKERS + (1 if variant == "async" else 0)
    with tempfile.TemporaryDirectory(prefix="bench_async_") as tmp:
        job = dict(cfg, variant=variant, straggler=straggler, out_dir=tmp)
        job_file = os.path.join(tmp, "job.json")
        Path(job_file).write_text(json.dumps(job))
        port = free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(cfg["threads"]),
                       PYTHONPATH=os.pathsep.join([PYTHON_DIR, os.environ.get("PYTHONPATH", "")]))
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--rank-job", job_file],
                                          env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        failures = []
        try:
            for rank, p in enumerate(procs):
                try:
                    _, err = p.communicate(timeout=cfg["timeout_s"] + 60)
                except subprocess.TimeoutExpired:
                    failures.append(f"rank {rank}: killed after {cfg['timeout_s'] + 60} s")
                    continue
                if p.returncode != 0:
                    failures.append(f"rank {rank}: exit code {p.returncode}\n{err[-3000:]}")
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        if failures:  # exit code 2: a crash, not a target's FAIL (exit code 1 in the bench tests)
            print(f"bench_async: the {variant} job ({SCENARIOS[straggler]}) failed:\n" + "\n".join(failures),
                  file=sys.stderr)
            raise SystemExit(2)
        outs = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return summarise(cfg, variant, straggler, outs)


def summarise(cfg: dict, variant: str, straggler: bool, outs: list) -> dict:
    workers = [o for o in outs if "start" in o]
    rec = next(o for o in outs if "copies" in o)
    t0 = min(w["start"] for w in workers)
    copies = rec["copies"]
    job_s = copies[-1][0] - t0
    hit = next((t - t0 for t, _, mse in copies if mse <= cfg["target_mse"]), math.inf)
    run = dict(variant=variant, straggler=straggler, processes=len(outs), job_s=job_s, rows=rec["rows"],
               samples_per_s=rec["rows"] / job_s, time_to_mse_s=hit, final_mse=copies[-1][2],
               best_mse=min(c[2] for c in copies), sleep_ms=1e3 * max(w["sleep_s"] for w in workers),
               worker_steps=[w["steps"] for w in workers], curve=copies)
    if "stats" in rec:
        hist = {int(k): v for k, v in rec["stats"]["staleness"].items()}
        applied = sum(hist.values())
        run.update(stats=rec["stats"], staleness_mean=sum(k * v for k, v in hist.items()) / max(applied, 1),
                   staleness_max=max(hist, default=0),
                   worker_updates=[w["updates"] for _, w in sorted(rec["stats"]["workers"].items())])
    return run


def median_of(runs: list, key: str) -> float:
    return statistics.median(r[key] for r in runs)


def format_scenario(cfg: dict, straggler: bool, by: dict) -> str:
    to_mse = "s to MSE<=" + format(cfg["target_mse"], "g")
    head = (f"{'variant':<7}  {'procs':>5}  {'samples/s':>10}  {'job s':>6}  {to_mse:>14}  {'final MSE':>9}"
            f"  {'sleep ms':>8}  {'updates/worker':>15}  {'staleness mean/max':>24}")
    title = SCENARIOS[straggler] + (f" (worker {WORKERS - 1} slowed 3x by a sleep per step)" if straggler else "")
    lines = [f"\n{title}: medians of {len(by['sync'])} round(s); updates/worker, max staleness and refused: "
             f"the last round", head, "-" * len(head)]
    for v in VARIANTS:
        runs = by[v]
        last = runs[-1]
        per_worker = last.get("worker_updates", last["worker_steps"])
        stale = "-"
        if v == "async":
            mean = median_of(runs, "staleness_mean")
            stale = f"{mean:.2f}/{last['staleness_max']}, {last['stats']['refused']} refused"
        lines.append(f"{v:<7}  {last['processes']:>5}  {median_of(runs, 'samples_per_s'):>10.0f}  "
                     f"{median_of(runs, 'job_s'):>6.2f}  {median_of(runs, 'time_to_mse_s'):>14.2f}  "
                     f"{median_of(runs, 'final_mse'):>9.2e}  {median_of(runs, 'sleep_ms'):>8.2f}  "
                     f"{'/'.join(map(str, per_worker)):>15}  {stale:>24}")
    return "\n".join(lines)


def targets_for(straggler: bool, by: dict) -> list:
    name = SCENARIOS[straggler]
    speed = median_of(by["async"], "samples_per_s") / median_of(by["sync"], "samples_per_s")
    t_sync, t_async = median_of(by["sync"], "time_to_mse_s"), median_of(by["async"], "time_to_mse_s")
    to_mse = t_sync / t_async if math.isfinite(t_async) else 0.0
    note = "" if math.isfinite(t_sync) and math.isfinite(t_async) else "a job never reached the MSE (inf)"
    return [Target(f"{name}: async samples/s / sync samples/s", speed, 1.8 if straggler else None,
                   "async >= 1.8x sync" if straggler else "oversubscribed on 2 cores: see the docstring"),
            Target(f"{name}: sync time to MSE / async time to MSE", to_mse, 1 / 0.7 if straggler else None,
                   note or ("async <= 0.7x sync's time" if straggler else ""))]


def main(argv: Optional[list] = None) -> int:
    parser = common_parser(__doc__)
    parser.set_defaults(threads=1)
    parser.add_argument("--repeats", type=int, default=None, help="rounds of the four jobs (default 3; --quick 1)")
    parser.add_argument("--steps", type=int, default=None,
                        help="synchronous steps S of the budget (default 1500; --quick 300)")
    parser.add_argument("--batch", type=int, default=256, help="rows per worker per step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--target-mse", type=float, default=None, help="default 1e-2; --quick 5e-2")
    parser.add_argument("--record-every", type=int, default=20, help="K: applied updates between copies")
    parser.add_argument("--sleep-ms", type=float, default=None, help="a fixed straggler sleep for both variants")
    parser.add_argument("--max-staleness", type=int, default=None, help="AsyncDataParallel's bound (default none)")
    parser.add_argument("--staleness-lr", choices=["inverse"], default=None, help="AsyncDataParallel's staleness_lr")
    parser.add_argument("--floor", action="store_true", help="only the staleness floor: updates to the target MSE "
                                                             "with gradients 0-3 updates stale, in one process")
    parser.add_argument("--rank-job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rank_job:
        rank_main(args.rank_job)
        return 0
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for flag in ("repeats", "steps", "batch", "hidden", "record_every"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in ("lr", "target_mse"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    if (args.sleep_ms is not None and not args.sleep_ms >= 0) or (args.max_staleness or 0) < 0:
        parser.error("--sleep-ms and --max-staleness must be >= 0")
    cfg = dict(hidden=args.hidden, batch=args.batch, lr=args.lr, seed=0, train_rows=16384, val_rows=4096,
               steps=args.steps or (300 if args.quick else 1500), record_every=args.record_every,
               target_mse=args.target_mse or (5e-2 if args.quick else 1e-2), threads=args.threads,
               max_staleness=args.max_staleness, staleness_lr=args.staleness_lr,
               sleep_s=None if args.sleep_ms is None else args.sleep_ms / 1e3, timeout_s=120 if args.quick else 600)
    if args.floor:
        print(f"updates to validation MSE <= {cfg['target_mse']:g} with gradients d updates stale (single process):")
        for label, hit, rows in staleness_floor(cfg):
            print(f"  {label:<28} {hit if hit is not None else 'not reached':>12}  {rows or '-':>10} rows")
        return 0
    if cfg["sleep_s"] is None:
        cfg["sleep_s"] = 2 * sync_step_s(cfg)
    repeats = args.repeats or (1 if args.quick else 3)
    env = environment()
    print(f"bench_async: torch {env['torch']}, {env['cpus']} CPUs ({env['cpu']}), {args.threads} thread(s) per rank, "
          f"{'quick' if args.quick else 'full'} mode: MLP 2-{cfg['hidden']}-{cfg['hidden']}-2, batch {cfg['batch']}"
          f"/worker, {cfg['steps']} sync steps = {cfg['steps'] * WORKERS} async updates, {repeats} round(s)")
    jobs = [(s, v) for s in SCENARIOS for v in VARIANTS]
    runs: dict = {job: [] for job in jobs}
    for r in range(repeats):
        for j in range(len(jobs)):
            straggler, variant = jobs[(r + j) % len(jobs)]
            run = launch(cfg, variant, straggler)
            runs[(straggler, variant)].append(run)
            print(f"  round {r + 1}: {variant:<5} {SCENARIOS[straggler]:<12}  {run['samples_per_s']:8.0f} samples/s, "
                  f"MSE <= {cfg['target_mse']:g} after {run['time_to_mse_s']:.2f} s, final {run['final_mse']:.2e}",
                  flush=True)
    targets = []
    for straggler in SCENARIOS:
        by = {v: runs[(straggler, v)] for v in VARIANTS}
        print(format_scenario(cfg, straggler, by))
        targets += targets_for(straggler, by)
    print("\ntargets:")
    print(format_targets(targets))
    write_json(args.json, {"benchmark": "bench_async", "environment": env, "config": cfg, "repeats": repeats,
                           "runs": [r for job in jobs for r in runs[job]], "targets": [t.to_dict() for t in targets]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
