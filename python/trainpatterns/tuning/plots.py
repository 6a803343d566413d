"""PNG plots of a study (matplotlib, an optional extra: ``pip install "trainpatterns[plot]"``).

* ``plot_optimization_history``: every COMPLETE trial's value by trial number, every PRUNED trial's
  last reported value (marked apart: a value read mid-training, not a result), and the best
  COMPLETE value so far.
* ``plot_intermediate_values``: each trial's reported values against the step (its learning
  curve); pruned trials' curves in grey, ending in a cross where they were stopped.
* ``plot_param_importances``: the main-effect importances of ``param_importances`` (a variance
  decomposition of a GP fitted to the completed trials), as horizontal bars.

Each writes the file and returns its path. matplotlib runs with the non-interactive "Agg" backend.
A value axis spanning more than two decades of positive values is drawn in log scale.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence, Union

from .importance import param_importances
from .trial import TrialState

__all__ = ["plot_optimization_history", "plot_intermediate_values", "plot_param_importances"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or trainpatterns[plot])") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _log_scale_if_wide(ax: Any, values: Sequence[float]) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 100:
        ax.set_yscale("log")


def _save(fig: Any, path: Union[str, os.PathLike]) -> Path:
    out = Path(path)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    return out


def plot_optimization_history(study: Any, path: Union[str, os.PathLike]) -> Path:
    """Objective value per COMPLETE trial (dots), each PRUNED trial's last reported value (grey
    crosses) and the best COMPLETE value so far (line). ValueError when there is neither."""
    plt = _pyplot()
    trials = study.trials
    done = [t for t in trials if t.state is TrialState.COMPLETE]
    pruned = [t for t in trials if t.state is TrialState.PRUNED and t.value is not None]
    if not done and not pruned:
        raise ValueError(f"study {study.study_name!r} has no COMPLETE or PRUNED trial with a value to plot")
    better = min if study.direction == "minimize" else max
    best, running = [], None
    for t in done:
        running = t.value if running is None else better(running, t.value)
        best.append(running)
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        if pruned:
            ax.scatter([t.number for t in pruned], [t.value for t in pruned], s=22, marker="x", color="0.55",
                       label="pruned trial (last reported value)")
        if done:
            ax.scatter([t.number for t in done], [t.value for t in done], s=18, color="C0", label="complete trial")
            # The line runs on to the last trial, so a best found early visibly holds.
            last = max(t.number for t in trials)
            ax.step([t.number for t in done] + [last], best + best[-1:], where="post", color="C3", label="best so far")
        _log_scale_if_wide(ax, [t.value for t in done + pruned])
        ax.set_xlabel("trial")
        ax.set_ylabel("objective")
        ax.set_title(f"optimisation history: {study.study_name} ({study.direction})")
        ax.legend()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_intermediate_values(study: Any, path: Union[str, os.PathLike]) -> Path:
    """Each trial's reported values by step: COMPLETE trials in colour, PRUNED ones in grey with a
    cross at their last report, others (running, failed) dotted. ValueError when no trial reported."""
    plt = _pyplot()
    trials = [t for t in study.trials if t.intermediate_values]
    if not trials:
        raise ValueError(f"study {study.study_name!r} has no trial with reported (intermediate) values to plot")
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        labelled: set = set()
        for t in trials:
            steps = sorted(t.intermediate_values)
            values = [t.intermediate_values[s] for s in steps]
            kind = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned"}.get(t.state, "other")
            style = {"complete": dict(lw=1.4, alpha=0.9), "pruned": dict(color="0.6", lw=1.0, alpha=0.8),
                     "other": dict(color="0.6", lw=1.0, ls=":")}[kind]
            label = None if kind in labelled else f"{kind} trial"
            labelled.add(kind)
            ax.plot(steps, values, label=label, **style)
            if kind == "pruned":
                ax.scatter(steps[-1:], values[-1:], marker="x", s=22, color="0.35")
        _log_scale_if_wide(ax, [v for t in trials for v in t.intermediate_values.values()])
        ax.set_xlabel("step")
        ax.set_ylabel("reported value")
        ax.set_title(f"intermediate values: {study.study_name} ({len(trials)} trials)")
        ax.legend()
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_param_importances(study: Any, path: Union[str, os.PathLike]) -> Path:
    """Main-effect importance of each parameter (sums to 1)."""
    plt = _pyplot()
    imp = param_importances(study)
    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    try:
        ax.barh(names, [imp[n] for n in names])
        ax.set_xlabel("importance (share of the GP mean's main-effect variance)")
        ax.set_title(f"parameter importance: {study.study_name}")
        return _save(fig, path)
    finally:
        plt.close(fig)
