"""Command line: ``trainpatterns train | overfit-check | plot | info`` (also ``python -m trainpatterns``).

``train`` with no data runs the built-in default job: a small MLP learns a noise-free physics
surrogate (the damped pendulum's state after a fixed time, over its whole state space) in
interpolation mode with FusedAdamW and an L-BFGS finish, through the Trainer (virtual epochs,
checkpoints, metrics), printing the loss as it falls; it needs no download and takes about 20 s on 2
CPU cores.
``--data file.npz`` trains the same kind of MLP on the user's arrays (``x`` and ``y``, optionally
``x_val`` and ``y_val``; integer ``y`` means classification). ``--resume`` continues a run directory
(without ``--run-dir``, the newest run of the same task under ``runs/``: see :mod:`._cli_runs`), and
``--logger csv|tensorboard`` also writes the records as a CSV file or TensorBoard event files in the
run directory. The library's messages are ``logging`` records of the ``trainpatterns`` loggers; the
command line shows their INFO lines on stdout. ``overfit-check`` runs the one-batch overfit check on
the job's model, ``plot RUN_DIR`` draws the loss per virtual epoch with the best checkpoint marked
(needs the ``plot`` extra), and ``tune`` (added by :mod:`trainpatterns.tuning.cli`) runs a tuning
study on the built-in task. The jobs themselves (data, model, loss) are defined in
:mod:`trainpatterns.pendulum`; this module parses the arguments and drives them.

Bad input (missing or malformed data, shape mismatches, a run directory that holds another run or
another model) ends with a one-line error on stderr and exit code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from . import __version__
from . import _cli_runs as runs
from ._kernels import build_info
from .checkpoint import VirtualEpochs
from .distributed import init_from_env, shutdown
from .optim import FusedAdamW
from .overfit import overfit_check
from .pendulum import DEFAULTS, Job, UsageError, pendulum_data
from ._world import agree
from ._train_setup import first_line
from .train import Trainer
from .tuning.cli import register as _register_tune

__all__ = ["DEFAULTS", "Job", "UsageError", "build_parser", "main", "pendulum_data"]


def _cmd_info(args: argparse.Namespace) -> int:
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


def _config(args: argparse.Namespace, saved: Optional[dict] = None) -> dict:
    """The job configuration: explicit arguments, else the saved run's values, else defaults."""
    cfg = {}
    for key, default in DEFAULTS.items():
        value = getattr(args, key, None)
        if value is None and saved is not None and key in saved:
            value = saved[key]
        cfg[key] = default if value is None else value
    for key in ("samples", "steps", "batch_size", "hidden", "checkpoints"):
        if cfg[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1, got {cfg[key]}")
    if not (cfg["lr"] > 0 and math.isfinite(cfg["lr"])):
        raise UsageError(f"--lr must be a positive number, got {cfg['lr']}")
    if not 0 <= cfg["seed"] < 2**63 - 1:  # seed + 1 seeds the validation data: both must fit torch's int64
        raise UsageError(f"--seed must be in [0, 2**63 - 1), got {cfg['seed']}")
    if cfg["data"] is not None:
        cfg["data"] = os.path.abspath(cfg["data"])
    return cfg


def _set_threads(args: argparse.Namespace, cfg: dict) -> None:
    threads = getattr(args, "threads", None)
    if threads is None and cfg["data"] is None:
        threads = 1
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


# ----- train ---------------------------------------------------------------------------------------

def _join_torchrun() -> tuple[int, int]:
    """(rank, world size): under torchrun (WORLD_SIZE > 1) this process joins the job over gloo
    (the command trains on the CPU); a single process initialises nothing."""
    info = init_from_env("gloo")
    return info.rank, info.world_size


# Interpolation mode's L-BFGS finish: max_iter bounds it on any machine (and keeps runs reproducible);
# the time limit only caps it on a slow one, so the built-in job stays near a minute.
_FINISH = dict(max_iter=1500, time_limit=25.0)


def _cmd_train(args: argparse.Namespace) -> int:
    if args.strategy == "async":  # parameter servers over RPC: no process group to join
        if int(os.environ.get("WORLD_SIZE", "1") or 1) < 2:
            raise UsageError("--strategy async runs under torchrun with at least 2 processes (a server and a worker)")
        if args.run_dir is None or args.resume:
            raise UsageError("--strategy async needs --run-dir (every rank must name the same directory) and "
                             "cannot --resume (a job started again resumes from its servers' checkpoints)")
        return _train(args, int(os.environ.get("RANK", "0")), 1)
    if args.strategy == "pipeline":
        if args.interpolation:
            raise UsageError("--strategy pipeline cannot run interpolation mode (its L-BFGS finish needs the whole "
                             "model on one rank): drop --interpolation")
        args.interpolation = False
    rank, world = _join_torchrun()
    if args.strategy == "pipeline" and world < 2:
        raise UsageError("--strategy pipeline runs under torchrun with at least 2 processes (one stage each)")
    try:
        code = _train(args, rank, world)
    except BaseException:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: the other ranks may be gone
        raise
    shutdown()
    return code


def _train(args: argparse.Namespace, rank: int, world: int) -> int:
    """`trainpatterns train` on one rank of ``world`` (under torchrun every rank runs this, on its
    shard of the data: the Trainer wraps the model in SyncDataParallel; rank 0 decides the run
    directory, writes config.json and prints)."""
    say = print if rank == 0 else (lambda *a, **k: None)

    resume = args.resume or runs.restarted_by_torchrun(args.run_dir)
    saved = None
    if resume:
        if args.run_dir is None:  # rank 0's pick for all: a run may start meanwhile
            args.run_dir, problem = agree(runs.newest_run(args.data) if rank == 0 else None, world)
            if problem is not None:
                raise UsageError(problem)
            say(f"resuming the newest {runs.task_name(args.data)} run: {args.run_dir}")
        saved = runs.read_config(args.run_dir)
    cfg = _config(args, saved)
    _set_threads(args, cfg)
    torch.manual_seed(cfg["seed"])
    job = Job(cfg)
    run_dir = args.run_dir or runs.new_run_dir(job.name)
    loggers = runs.chosen_loggers(args.logger, saved)
    callbacks = runs.make_loggers(loggers, run_dir)
    problem = None
    checks = args.strategy != "async" or rank == 0  # async ranks cannot agree: rank 0 checks for all
    if checks and not resume and os.path.exists(run_dir) and os.listdir(run_dir):
        problem = (f"run directory {run_dir} is not empty: pass --resume to continue it, or choose another "
                   f"--run-dir")
    # Rank 0's directory and verdict for all: the ranks' clocks may straddle a second, and rank 1
    # must not find the directory non-empty because rank 0 has already started writing into it.
    run_dir, problem = agree((run_dir, problem), world)
    if problem is not None:
        raise UsageError(problem)
    n = job.x.shape[0]
    batch = min(cfg["batch_size"], n)
    checkpoints = min(cfg["checkpoints"], cfg["steps"])
    plan = VirtualEpochs(n, batch, stop_point=(cfg["steps"] * batch + 0.5) / n, num_checkpoints=checkpoints)
    model = job.model()
    opt = FusedAdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0 if job.interpolation else 0.01,
                     max_grad_norm=1.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=plan.total_steps)
    val = (job.x_val, job.y_val) if job.x_val is not None else None

    strategy: dict = {"scheduler": sched}
    if args.strategy != "sync":  # each rank's optimizer is built by the strategy: the schedule comes as a factory
        options = {"scheduler": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=plan.total_steps)}
        if args.strategy == "pipeline":
            options.update(microbatches=args.microbatches, schedule="1f1b")
        strategy = {"scheduler": None, "strategy": args.strategy, f"{args.strategy}_options": options}
    trainer = Trainer(model, job.loss_fn, opt, (job.x, job.y), val, checkpoint_dir=run_dir, plan=plan,
                      interpolation=job.interpolation, progress=not args.no_progress,
                      seed=cfg["seed"], resume=resume, num_threads=1 if cfg["data"] is None else None,
                      rescale_schedule=saved is not None and cfg["steps"] != saved.get("steps"),
                      interpolation_finish=_FINISH, callbacks=callbacks, **strategy)
    step = trainer.restore() if resume else None
    if step is None and args.resume:
        raise UsageError(f"--resume: {run_dir} holds no usable checkpoint")
    if step is not None:
        trainer.resume = False  # restored already (the Trainer said from where)
    else:
        if rank == 0:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(dict(cfg, loggers=loggers), f, indent=2)
        kind = f"{job.classes}-class classification" if job.classes else "regression"
        mode = ", interpolation mode" if job.interpolation else ""
        ranks = f" on {world} ranks (SyncDataParallel over gloo, each on its shard)" if world > 1 else ""
        if args.strategy == "async":
            ranks = " with parameter servers (AsyncDataParallel: the first rank serves, the others work)"
        if args.strategy == "pipeline":
            ranks = (f" in {world} pipeline stages (PipelineParallel, 1F1B, {args.microbatches} micro-batches; "
                     f"stage costs in bytes {[int(c) for c in trainer.model.stage_costs]})")
        say(f"training a {sum(p.numel() for p in model.parameters())}-parameter MLP on {job.name} "
            f"({n} examples, {kind}{mode}; {plan.total_steps} steps in {plan.num_epochs} virtual epochs, "
            f"FusedAdamW){ranks} -> {run_dir}")
        if trainer.rank >= 0:  # not an async server
            with torch.no_grad():
                init = trainer.evaluate((job.x, job.y))
            say(f"epoch 0/{plan.num_epochs}  step 0  train_loss {init:.4g}")
    start = time.perf_counter()
    trainer.fit()
    best = trainer.best or {}
    trainer.say(f"done in {time.perf_counter() - start:.1f}s; best {trainer.monitor} "
                f"{best.get(trainer.monitor, float('nan')):.3e} at virtual epoch {best.get('epoch')}; plot: "
                f"trainpatterns plot {run_dir}")
    return 0


# ----- overfit-check -------------------------------------------------------------------------------

def _cmd_overfit_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    _set_threads(args, cfg)
    torch.manual_seed(cfg["seed"])
    job = Job(cfg)
    rows = min(cfg["batch_size"], job.x.shape[0])
    report = overfit_check(job.model(), (job.x[:rows], job.y[:rows]), job.loss_fn, steps=cfg["steps"],
                           lr=cfg["lr"])
    print(report)
    return 0 if report.passed else 1


# ----- plot ----------------------------------------------------------------------------------------

_REQUIRED, _OPTIONAL = ("epoch", "train_loss"), ("step", "val_loss", "max_error", "time_s", "elapsed_s")


def _read_metrics(run_dir: str) -> list:
    """The records of ``run_dir/metrics.jsonl``. A last line that is not JSON is the torn tail of an
    interrupted append and is skipped with a note; a bad line before it is an error naming it."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise UsageError(f"run directory {run_dir} not found")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir} holds no metrics.jsonl (is it a trainpatterns run directory?)")
    try:
        with open(path, "rb") as f:
            lines = [(i, raw) for i, raw in enumerate(f.read().split(b"\n"), 1) if raw.strip()]
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for k, (i, raw) in enumerate(lines):
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError:  # UnicodeDecodeError too: a write torn inside a character
            if k == len(lines) - 1:
                print(f"trainpatterns plot: note: ignoring the incomplete last line {i} of {path} "
                      f"(an interrupted write)", file=sys.stderr)
                break
            raise UsageError(f"{path} line {i} is not a metrics record (not JSON)") from None
        if not (isinstance(row, dict) and all(isinstance(row.get(key), (int, float)) for key in _REQUIRED)
                and all(isinstance(row[key], (int, float)) for key in _OPTIONAL if key in row)):
            raise UsageError(f"{path} line {i} is not a metrics record (numbers {', '.join(_REQUIRED)}, "
                             f"optionally {', '.join(_OPTIONAL)})")
        rows.append(row)
    if not rows:
        raise UsageError(f"{path} is empty: no virtual epoch finished yet")
    return rows


def _plot_max_error_against_time(ax, rows: list) -> None:
    """Max error over the training set against training time (``elapsed_s``; the running sum of
    ``time_s`` for records without it): how fast interpolation converges, the finish included."""
    clock, seconds = 0.0, []
    for r in rows:
        clock = r["elapsed_s"] if isinstance(r.get("elapsed_s"), (int, float)) else clock + float(r.get("time_s", 0.0))
        seconds.append(clock)
    errors = [r.get("max_error", math.nan) for r in rows]
    ax.plot(seconds, errors, "^-", color="tab:green")
    if all(isinstance(e, (int, float)) and e > 0 for e in errors):
        ax.set_yscale("log")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("max error (train set)")
    ax.set_title("max error against time")
    ax.grid(True, alpha=0.3)


def _cmd_plot(args: argparse.Namespace) -> int:
    rows = _read_metrics(args.run_dir)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("trainpatterns plot needs matplotlib: pip install 'trainpatterns[plot]'") from None
    out = args.out or os.path.join(args.run_dir, "loss.png")
    epochs = [r["epoch"] for r in rows]
    timed = any("max_error" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train loss")
    key = "val_loss" if any("val_loss" in r for r in rows) else "train_loss"
    if key == "val_loss":
        ax.plot(epochs, [r.get("val_loss", math.nan) for r in rows], "s-", label="validation loss")
    if timed:
        ax.plot(epochs, [r.get("max_error", math.nan) for r in rows], "^--", label="max error (train set)")
    # the Trainer marks each new best by its monitor; older records without the flag: the lowest loss
    flagged = [r for r in rows if r.get("best") is True]
    best = flagged[-1] if flagged else min((r for r in rows if math.isfinite(r.get(key, math.nan))),
                                           key=lambda r: r[key], default=None)
    if best is not None and math.isfinite(best.get(key, math.nan)):
        ax.plot([best["epoch"]], [best[key]], "*", markersize=16, color="crimson",
                label=f"best checkpoint (virtual epoch {best['epoch']}, step {best.get('step')})")
    values = [v for r in rows for v in (r.get("train_loss"), r.get(key), r.get("max_error"))
              if isinstance(v, (int, float)) and v > 0]
    if values and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("virtual epoch")
    ax.set_ylabel("loss")
    ax.set_title(os.path.basename(os.path.abspath(args.run_dir)))
    ax.grid(True, alpha=0.3)
    ax.legend()
    if timed:
        _plot_max_error_against_time(axes[0][1], rows)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise UsageError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    print(f"wrote {out}")
    return 0


# ----- parser --------------------------------------------------------------------------------------

def _job_arguments(p: argparse.ArgumentParser, steps_help: str) -> None:
    p.add_argument("--data", metavar="FILE.npz", help="arrays x and y (optionally x_val, y_val); default: the "
                                                      "built-in damped-pendulum task")
    p.add_argument("--samples", type=int, help=f"pendulum states to generate (default {DEFAULTS['samples']})")
    p.add_argument("--steps", type=int, help=steps_help)
    p.add_argument("--batch-size", type=int, help=f"examples per optimizer step, over all ranks under torchrun "
                                                  f"(default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, help=f"learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--hidden", type=int, help=f"MLP width (default {DEFAULTS['hidden']})")
    p.add_argument("--seed", type=int, help="seed for data, initialisation and shuffling (default 0)")
    p.add_argument("--threads", type=int, help="torch threads (default: 1 for the built-in job, whose small "
                                               "MLP runs fastest on one; torch's default with --data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainpatterns", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="what the native module was built with")
    p_info.add_argument("--json", action="store_true", help="print as JSON")
    p_info.set_defaults(func=_cmd_info)
    p_train = sub.add_parser("train", help="train (the built-in default job without --data)")
    _job_arguments(p_train, f"optimizer steps in total (default {DEFAULTS['steps']})")
    p_train.add_argument("--checkpoints", type=int, help=f"virtual epochs = checkpoints (default {DEFAULTS['checkpoints']})")
    p_train.add_argument("--run-dir", metavar="DIR", help="checkpoints, metrics.jsonl, config.json "
                                                         "(default runs/<task>-<time>)")
    p_train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint "
                                                               "(default: the newest run of the task under runs/)")
    p_train.add_argument("--logger", action="append", choices=runs.LOGGERS,
                         help="also log the records to RUN_DIR/metrics.csv (csv) or TensorBoard event files in "
                              "RUN_DIR (tensorboard); repeatable; a resumed run keeps its loggers")
    p_train.add_argument("--interpolation", action=argparse.BooleanOptionalAction, default=None,
                         help="interpolation mode: no regularisation, max-error metric (default on for the "
                              "noise-free built-in task, off for --data)")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.add_argument("--strategy", choices=("sync", "async", "pipeline"), default="sync",
                         help="under torchrun: sync (SyncDataParallel, default), async (parameter servers) or "
                              "pipeline (the model's layers in stages, one per rank)")
    p_train.add_argument("--microbatches", type=int, default=4,
                         help="--strategy pipeline: micro-batches per batch (default 4; must divide the batch)")
    p_train.set_defaults(func=_cmd_train)
    p_over = sub.add_parser("overfit-check", help="can the job's model fit one batch? (exit 1 if not)")
    _job_arguments(p_over, f"at most this many steps on the batch (default {DEFAULTS['steps']})")
    p_over.set_defaults(func=_cmd_overfit_check)
    p_plot = sub.add_parser("plot", help="draw the loss per virtual epoch of a run (needs matplotlib)")
    p_plot.add_argument("run_dir", metavar="RUN_DIR")
    p_plot.add_argument("--out", metavar="FILE.png", help="default RUN_DIR/loss.png")
    p_plot.set_defaults(func=_cmd_plot)
    _register_tune(sub)
    return parser


class _Stdout(logging.Handler):
    """The library's INFO lines on the current ``sys.stdout`` (looked up at each line, so a
    replaced stdout, as under pytest's capture, gets them)."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(self.format(record), file=sys.stdout)  # above a progress bar, if one is shown
        sys.stdout.flush()


def _show_library_lines() -> None:
    """The command line shows what the library says at INFO (the Trainer's summary lines when the
    progress bar is off), as plain lines on stdout, once."""
    log = logging.getLogger("trainpatterns")
    if not any(isinstance(h, _Stdout) for h in log.handlers):
        log.addHandler(_Stdout())
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _show_library_lines()
    try:
        return args.func(args)
    except UsageError as e:
        print(f"trainpatterns {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # the library's clear errors (a checkpoint for another model, bad shapes)
        print(f"trainpatterns {args.command}: error: {first_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
