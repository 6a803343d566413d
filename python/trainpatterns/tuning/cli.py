"""``trainpatterns tune``: a tuning study on the built-in task, with a line of progress per trial.

The task is the one ``trainpatterns train`` runs (an MLP learning the damped pendulum's state after
one second, ``trainpatterns.pendulum.pendulum_data``), trained here by a short FusedAdamW loop. The
study tunes the learning rate, the width and depth of the MLP and its activation, minimising the
validation MSE. With ``--pruner asha`` bad trials stop early, at rungs fitted to ``--trials``
(``ASHAPruner.for_budget``: several trials finish, so the sampler has results to learn from; it
learns from the pruned trials' last values too). Each trial saves its model, optimizer
and sampling-generator state at every report with a ``CheckpointManager`` in ``trial.checkpoint_dir``
(safetensors + JSON, written atomically, nothing pickled), and restores the newest usable one, so a
trial that is retried after a crash (or resumed by ``ASHAPruner(pause=True)``) continues where it
was. Checkpoints that cannot be restored (corrupt, or written for another model) are moved aside
and the trial starts over, rather than failing on every retry.

``register(subparsers)`` adds the subcommand to the main parser (trainpatterns/cli.py).
"""
from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from typing import Any, Callable

import torch

from ..checkpoint import CheckpointError, CheckpointManager
from ..optim import FusedAdamW
from ..pendulum import UsageError, pendulum_data
from .asha import ASHAPruner
from .gp import GPSampler
from .grid import GridSampler
from .plots import plot_intermediate_values, plot_optimization_history, plot_param_importances
from .random import RandomSampler
from .study import create_study
from .trial import FrozenTrial, Trial, TrialPruned, TrialState

__all__ = ["register", "PendulumObjective", "ProgressPrinter"]

GRID = {"lr": [1e-3, 3e-3, 1e-2], "width": [32, 64], "depth": [1, 2], "activation": ["tanh"]}
_ACTIVATIONS = {"tanh": torch.nn.Tanh, "gelu": torch.nn.GELU, "silu": torch.nn.SiLU}


class PendulumObjective:
    """objective(trial) -> validation MSE of an MLP trained for ``steps`` FusedAdamW steps, the
    learning rate decaying from the suggested ``lr`` to zero on a cosine.
    A top-level class (picklable), so it runs in ``n_jobs`` worker processes too. ``threads``: torch
    threads per trial (1 by default: these models are small, and more threads only contend, badly
    so when several trials or other jobs share the cores); 0 leaves torch's setting alone."""

    def __init__(self, steps: int = 300, samples: int = 2048, batch_size: int = 256, seed: int = 0,
                 reports: int = 10, threads: int = 1) -> None:
        for name, value, low in (("steps", steps, 1), ("samples", samples, 1), ("batch_size", batch_size, 1),
                                 ("reports", reports, 1), ("threads", threads, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        self.steps, self.samples, self.batch_size, self.seed = steps, samples, batch_size, seed
        self.reports, self.threads = reports, threads

    def __call__(self, trial: Trial) -> float:
        if self.threads:
            torch.set_num_threads(self.threads)
        lr = trial.suggest_float("lr", 1e-4, 3e-2, log=True)
        width = trial.suggest_int("width", 16, 128, log=True)
        depth = trial.suggest_int("depth", 1, 3)
        act = _ACTIVATIONS[trial.suggest_categorical("activation", list(_ACTIVATIONS))]
        x, y = pendulum_data(self.samples, seed=self.seed)
        xv, yv = pendulum_data(512, seed=self.seed + 1)

        def fresh() -> dict:
            # Every trial starts from the same seed (common random numbers): two trials then differ
            # by their hyperparameters, not by their luck with the initial weights and batches, so
            # the pruner's comparisons at a rung and the GP's model of the objective see less noise.
            torch.manual_seed(self.seed)
            layers, d_in = [], 2
            for _ in range(depth):
                layers += [torch.nn.Linear(d_in, width), act()]
                d_in = width
            model = torch.nn.Sequential(*layers, torch.nn.Linear(d_in, 2))
            opt = FusedAdamW(model.parameters(), lr=lr, weight_decay=0.0, max_grad_norm=1.0)
            gen = torch.Generator().manual_seed(self.seed)
            return dict(model=model, opt=opt, gen=gen.get_state())

        # rng=False: the trial's randomness is its own seeded generator, saved as a plain tensor.
        manager = CheckpointManager(trial.checkpoint_dir, keep_last=2, async_save=False, rng=False)
        state, start_step = _restore_or_start_over(manager, fresh)
        model, opt = state["model"], state["opt"]
        gen = torch.Generator()
        gen.set_state(state["gen"])
        every = max(1, self.steps // self.reports)
        loss_fn = torch.nn.MSELoss()

        def validate() -> float:
            with torch.no_grad():
                return loss_fn(model(xv), yv).item()

        val = validate() if start_step >= self.steps else math.inf
        for step in range(start_step + 1, self.steps + 1):
            # Cosine decay to zero: the value at the last step is the settled end of training, not a
            # point on Adam's oscillations at full learning rate, so it ranks configurations well.
            # A function of the step alone: a resumed trial continues on the same schedule.
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / self.steps))
            idx = torch.randint(0, self.samples, (self.batch_size,), generator=gen)
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % every == 0 or step == self.steps:
                val = validate()
                manager.save(dict(model=model, opt=opt, gen=gen.get_state()), step=step, metrics={"val_mse": val})
                trial.report(value=val, step=step)
                if trial.should_prune():
                    raise TrialPruned()
        return val


def _restore_or_start_over(manager: CheckpointManager, fresh: Callable[[], dict]) -> tuple[dict, int]:
    """(state, step): ``fresh()`` with the newest usable checkpoint of ``manager`` loaded into it,
    or ``fresh()`` and step 0. When checkpoints exist but none can be restored (all corrupt, or saved
    for another model), they are renamed ``<name>.unusable-<time>`` (kept for inspection) with a
    warning, so that the new run's saves do not collide with them and a retry does not fail again."""
    state = fresh()
    try:
        step = manager.restore(state)
    except (CheckpointError, RuntimeError, ValueError, KeyError, TypeError) as e:
        stamp = time.time_ns()
        for info in manager.list():
            os.rename(info.path, f"{info.path}.unusable-{stamp}")
        warnings.warn(f"cannot restore the trial's checkpoint in {manager.directory} ({e}); starting the trial "
                      "over (the old checkpoints are renamed *.unusable-*)", RuntimeWarning, stacklevel=3)
        return fresh(), 0
    return state, step or 0


class ProgressPrinter:
    """A callback printing one line per finished trial (the ``tune`` command's output): its outcome,
    the best COMPLETE value so far (marked when this trial set it), the time, its parameters."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self, study: Any, t: FrozenTrial) -> None:
        if t.state is TrialState.COMPLETE:
            what = f"complete {t.value:.4e}"
        elif t.state is TrialState.PRUNED:
            what = (f"pruned   {t.value:.4e} @ step {t.last_step}" if t.value is not None
                    else f"pruned at step {t.last_step}")
        else:
            what = f"{t.state.name.lower()}: {t.fail_reason}"
        params = " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
        try:
            best = study.best_trial
            best_s = f"best {best.value:.4e} " + ("(new)" if best.number == t.number else f"(trial {best.number})")
        except ValueError:
            best_s = "best -"
        print(f"trial {t.number:3d}  {what:<32}  {best_s:<27}  {time.perf_counter() - self.t0:6.1f}s  {params}",
              flush=True)


def _improvements(study: Any) -> list:
    """[(trial number, value)] of each COMPLETE trial that improved on every earlier one."""
    sign = 1.0 if study.direction == "minimize" else -1.0
    out: list = []
    for t in study.get_trials([TrialState.COMPLETE]):
        if not out or sign * t.value < sign * out[-1][1]:
            out.append((t.number, t.value))
    return out


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _cmd_tune(args: argparse.Namespace) -> int:
    for name, low in (("trials", 1), ("steps", 1), ("samples", 1), ("jobs", 1), ("threads", 0)):
        if getattr(args, name) < low:
            raise UsageError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**63 - 1:  # seed + 1 seeds the validation data: both must fit torch's int64
        raise UsageError(f"--seed must be in [0, 2**63 - 1), got {args.seed}")
    if args.sampler == "grid":
        sampler: Any = GridSampler(GRID)
    elif args.sampler == "random":
        sampler = RandomSampler(seed=args.seed)
    else:
        sampler = GPSampler(seed=args.seed, n_startup_trials=min(8, max(1, args.trials // 3)))
    pruner = ASHAPruner.for_budget(args.trials, args.steps) if args.pruner == "asha" else None
    study = create_study(direction="minimize", sampler=sampler, pruner=pruner, storage=args.storage,
                         study_name=args.study_name, load_if_exists=True)
    objective = PendulumObjective(steps=args.steps, samples=args.samples, seed=args.seed, threads=args.threads)
    print(f"tuning lr, width, depth, activation of the pendulum MLP: {args.trials} trials, sampler {args.sampler}, "
          f"pruner {args.pruner}, {args.jobs} job(s), storage {args.storage or 'memory'} (study {study.study_name})")
    study.optimize(objective, total_trials=args.trials, n_jobs=args.jobs, callbacks=[ProgressPrinter()])
    done = study.get_trials([TrialState.COMPLETE])
    counts = {s.name.lower(): len(study.get_trials([s])) for s in (TrialState.COMPLETE, TrialState.PRUNED,
                                                                   TrialState.FAILED)}
    print("trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if done:
        best = study.best_trial
        print("best value by trial: " + " -> ".join(f"{v:.3e} (trial {n})" for n, v in _improvements(study)))
        print(f"best: trial {best.number}, validation mse {best.value:.4e}, params {best.params}")
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        print("wrote", plot_optimization_history(study, os.path.join(args.plots, "history.png")))
        print("wrote", plot_intermediate_values(study, os.path.join(args.plots, "intermediate.png")))
        if len(done) >= 3:
            print("wrote", plot_param_importances(study, os.path.join(args.plots, "importance.png")))
    return 0 if done else 1


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tune`` to the main parser's subcommands."""
    p = subparsers.add_parser("tune", help="tune the built-in job's hyperparameters (grid / random / GP, ASHA)")
    p.add_argument("--trials", type=int, default=12, help="trials in the study (a resumed study runs the rest)")
    p.add_argument("--sampler", choices=["gp", "random", "grid"], default="gp")
    p.add_argument("--pruner", choices=["asha", "none"], default="asha")
    p.add_argument("--steps", type=int, default=300, help="training steps per trial")
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--jobs", type=int, default=1, help="worker processes (needs --storage)")
    p.add_argument("--storage", default=None, help="SQLite file (resumable; default: in memory)")
    p.add_argument("--study-name", default="pendulum")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write history.png, intermediate.png and importance.png there")
    p.add_argument("--threads", type=int, default=1, help="torch threads per trial (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_tune)
    return p
