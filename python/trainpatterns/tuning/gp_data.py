"""What the GP of ``GPSampler`` is fitted on, and where it looks: trial parameters encoded as
points of [0, 1]^D (``_Encoder``), objective values warped towards a normal sample
(``warp_outputs``), and the scrambled Sobol candidates of the acquisition (``sobol_points``).

* Inputs: log parameters in log space, ints and stepped floats relaxed to a continuous interval and
  rounded back, categoricals one-hot; every column in [0, 1].
* Outputs: standardised, Yeo-Johnson transformed with the maximum-likelihood lambda, standardised
  again. Monotone, so the incumbent is unchanged.

Why: docs/tuning-gp-design.md. The model itself: ``gp_model``.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import scipy.stats
from scipy.stats import qmc

from .space import CategoricalDistribution

__all__ = ["warp_outputs", "standardise", "standardise_or_centre", "sobol_points"]


_MAX_LAMBDA = 5.0  # |Yeo-Johnson lambda| cap: beyond it the power overflows long before it helps


def standardise(y: np.ndarray) -> Optional[np.ndarray]:
    """(y - mean) / std, or None when the values are constant or not finite."""
    std = float(y.std())
    if not (std > 0 and math.isfinite(std)):
        return None
    return (y - y.mean()) / std


def standardise_or_centre(y: np.ndarray) -> np.ndarray:
    """``standardise(y)``, or ``y - mean`` where that is None (a zero or non-finite spread)."""
    z = standardise(y)
    return y - y.mean() if z is None else z


def warp_outputs(y: np.ndarray) -> np.ndarray:
    """The values the GP models: ``y`` standardised, Yeo-Johnson transformed with the lambda of
    maximum likelihood (scipy's ``yeojohnson_normmax``, clipped to +-5), standardised again.

    Monotone increasing, so the order of the values (the incumbent) is kept. Zeros when ``y`` is
    constant; the standardised values alone when the transform fails or degenerates."""
    y = np.asarray(y, dtype=np.float64)
    z = standardise(y)
    if z is None:
        return np.zeros_like(y)
    try:
        with np.errstate(all="ignore"):
            lam = float(np.clip(scipy.stats.yeojohnson_normmax(z), -_MAX_LAMBDA, _MAX_LAMBDA))
            w = standardise(scipy.stats.yeojohnson(z, lmbda=lam))
    except (ValueError, FloatingPointError, ArithmeticError):
        return z
    return z if w is None or not np.all(np.isfinite(w)) else w


def sobol_points(dim: int, n: int, seed: Any) -> np.ndarray:
    """``n`` points of a scrambled Sobol sequence in [0, 1)^dim: the first n of the next power of
    two (scipy warns about unbalanced draws of other sizes, once per call)."""
    return qmc.Sobol(dim, scramble=True, seed=seed).random_base2(max(0, (n - 1).bit_length()))[:n]


class _Encoder:
    """Maps parameter dicts of a fixed space to rows of [0, 1]^D and back."""

    def __init__(self, space: dict) -> None:
        self.space = space
        self.columns: list = []  # per param: (name, dist, first column, width)
        col = 0
        for name, d in space.items():
            width = len(d.choices) if isinstance(d, CategoricalDistribution) else 1
            self.columns.append((name, d, col, width))
            col += width
        self.dim = col
        self.continuous = np.zeros(col, dtype=bool)
        for name, d, c, w in self.columns:
            if not isinstance(d, CategoricalDistribution):
                self.continuous[c] = True

    def encode(self, params: dict) -> list:
        row = [0.0] * self.dim
        for name, d, c, w in self.columns:
            if isinstance(d, CategoricalDistribution):
                row[c + d.index(params[name])] = 1.0
            else:
                row[c] = d.to_unit(params[name])
        return row

    def decode(self, row: Sequence[float]) -> dict:
        out = {}
        for name, d, c, w in self.columns:
            if isinstance(d, CategoricalDistribution):
                seg = list(row[c:c + w])
                out[name] = d.choices[max(range(w), key=seg.__getitem__)]
            else:
                out[name] = d.from_unit(row[c])
        return out

    def from_unit_cube(self, u: np.ndarray) -> np.ndarray:
        """Candidates: a point per row of ``u`` (m x n_params, uniform in [0, 1)), categorical
        coordinates turned into one-hot choices."""
        x = np.zeros((u.shape[0], self.dim))
        for j, (name, d, c, w) in enumerate(self.columns):
            if isinstance(d, CategoricalDistribution):
                idx = np.clip((u[:, j] * w).astype(np.int64), 0, w - 1)
                x[np.arange(u.shape[0]), c + idx] = 1.0
            else:
                x[:, c] = u[:, j]
        return x
