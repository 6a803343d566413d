"""Tune the built-in job (the damped-pendulum MLP) with a Gaussian-process sampler and ASHA.

The study lives in an SQLite file: stop this script at any moment (Ctrl-C, kill -9) and run it
again, and it continues where it stopped -- the trial that was running is retried with the same
parameters and resumes from the checkpoint it saved in ``trial.checkpoint_dir``. Run several copies
at once and they share the study. ``trainpatterns tune`` is the same thing as a command.

    python examples/tune_builtin.py [--trials 16] [--db tune_pendulum.db] [--plots plots/]
"""
from __future__ import annotations

import argparse

from trainpatterns.tuning import ASHAPruner, GPSampler, TrialState, create_study
from trainpatterns.tuning.cli import PendulumObjective, ProgressPrinter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--db", default="tune_pendulum.db")
    p.add_argument("--plots", default=None)
    args = p.parse_args()

    study = create_study(direction="minimize", sampler=GPSampler(seed=0, n_startup_trials=6),
                         pruner=ASHAPruner.for_budget(args.trials, args.steps),
                         storage=args.db, study_name="pendulum-example", load_if_exists=True)
    # total_trials (not n_trials): a rerun after a kill finishes the same 16-trial study.
    study.optimize(PendulumObjective(steps=args.steps), total_trials=args.trials, callbacks=[ProgressPrinter()])
    print("best:", study.best_trial.number, study.best_value, study.best_params)
    print("pruned:", len(study.get_trials([TrialState.PRUNED])), "of", len(study.trials))
    if args.plots:
        import os

        from trainpatterns.tuning.plots import plot_optimization_history, plot_param_importances

        os.makedirs(args.plots, exist_ok=True)
        plot_optimization_history(study, os.path.join(args.plots, "history.png"))
        plot_param_importances(study, os.path.join(args.plots, "importance.png"))


if __name__ == "__main__":
    main()
