"""PNG plots of a study (matplotlib, an optional extra: ``pip install "trainpatterns[plot]"``).

* ``plot_optimization_history``: every COMPLETE trial's value by trial number, and the best so far.
* ``plot_param_importances``: the main-effect importances of ``param_importances`` (a variance
  decomposition of a GP fitted to the completed trials), as horizontal bars.

Both write the file and return its path. matplotlib runs with the non-interactive "Agg" backend.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from .importance import param_importances
from .trial import TrialState

__all__ = ["plot_optimization_history", "plot_param_importances"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install matplotlib (or trainpatterns[plot])") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_optimization_history(study: Any, path: Union[str, os.PathLike]) -> Path:
    """Objective value per COMPLETE trial (dots) and the best value so far (line)."""
    plt = _pyplot()
    done = [t for t in study.trials if t.state is TrialState.COMPLETE]
    if not done:
        raise ValueError(f"study {study.study_name!r} has no COMPLETE trial to plot")
    better = min if study.direction == "minimize" else max
    best, running = [], None
    for t in done:
        running = t.value if running is None else better(running, t.value)
        best.append(running)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter([t.number for t in done], [t.value for t in done], s=14, label="trial value")
    ax.step([t.number for t in done], best, where="post", color="C3", label="best so far")
    values = [t.value for t in done]
    if min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("trial")
    ax.set_ylabel("objective")
    ax.set_title(f"optimisation history: {study.study_name} ({study.direction})")
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_param_importances(study: Any, path: Union[str, os.PathLike]) -> Path:
    """Main-effect importance of each parameter (sums to 1)."""
    plt = _pyplot()
    imp = param_importances(study)
    names = list(imp)[::-1]
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5))
    ax.barh(names, [imp[n] for n in names])
    ax.set_xlabel("importance (share of the GP mean's main-effect variance)")
    ax.set_title(f"parameter importance: {study.study_name}")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
