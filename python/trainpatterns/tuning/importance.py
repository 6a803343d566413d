"""Parameter importance: first-order variance decomposition (functional ANOVA main effects) of a
Gaussian process fitted to the completed trials.

For each parameter j, the fitted GP's posterior mean m(x) is averaged over the other parameters
(a scrambled Sobol sample of the unit cube) at ``levels`` values of x_j spread over its range (every
choice of a categorical); the variance of those averages is j's main-effect variance, Var_j =
Var_{x_j}[E_{x_-j} m(x)]. Importances are the Var_j normalised to sum to 1 (interactions are not
attributed). A surrogate-based estimate: it needs a few more completed trials than parameters to
mean anything, and it says which knobs the model thinks matter, not a causal truth.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .base import intersection_search_space
from .gp_model import GaussianProcess, _Encoder, blas_threads, sobol_points, standardise_or_centre
from .space import CategoricalDistribution
from .trial import TrialState

__all__ = ["param_importances"]


def param_importances(study: Any, *, levels: int = 16, samples: int = 256, seed: int = 0) -> dict:
    """{parameter name: importance in [0, 1]} over the shared space of the COMPLETE trials, largest
    first. ValueError with fewer than 2 completed trials or no shared parameter."""
    done = [t for t in study.trials if t.state is TrialState.COMPLETE]
    space = intersection_search_space(done)
    if len(done) < 2 or not space:
        raise ValueError(f"parameter importance needs >= 2 COMPLETE trials sharing parameters; "
                         f"study {study.study_name!r} has {len(done)} COMPLETE trial(s)")
    enc = _Encoder(space)
    x = np.array([enc.encode(t.params) for t in done], dtype=np.float64)
    y = standardise_or_centre(np.array([t.value for t in done], dtype=np.float64))
    with blas_threads(1):
        return _main_effects(enc, x, y, levels, samples, seed)


def _main_effects(enc: _Encoder, x: np.ndarray, y: np.ndarray, levels: int, samples: int, seed: int) -> dict:
    gp = GaussianProcess.fit(x, y, deterministic=False, init=None, iterations=100)
    base_u = sobol_points(len(enc.columns), samples, seed)
    variances = {}
    for j, (name, d, c, w) in enumerate(enc.columns):
        grid = ([(i + 0.5) / w for i in range(w)] if isinstance(d, CategoricalDistribution)
                else [(i + 0.5) / levels for i in range(levels)])
        means = []
        for g in grid:
            u = base_u.copy()
            u[:, j] = g
            means.append(float(gp.posterior(enc.from_unit_cube(u))[0].mean()))
        variances[name] = float(np.var(means))
    total = sum(variances.values())
    if total <= 0:
        return {name: 1.0 / len(variances) for name in variances}
    return dict(sorted(((k, v / total) for k, v in variances.items()), key=lambda kv: -kv[1]))
