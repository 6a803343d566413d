"""The jobs the command line runs: the built-in damped-pendulum task, or the user's ``.npz`` arrays.

A :class:`Job` holds the training and validation tensors, builds the MLP that fits them and picks
the loss. ``pendulum_data`` generates the built-in task (no download, deterministic, noise-free);
``trainpatterns train``, ``overfit-check``, ``tune``, the examples and the tests all draw on it, so
it lives apart from the argument parsing and imports neither the command line nor the tuning package.

Bad input (a missing or malformed file, shape or dtype mismatches) raises :class:`UsageError`,
which the command line reports as one line with exit code 2.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

__all__ = ["DEFAULTS", "Job", "UsageError", "pendulum_data"]


class UsageError(Exception):
    """Bad input from the command line: reported as one line, exit code 2."""


# The built-in job's settings. Width 64 rather than wider: the full-batch L-BFGS finish of
# interpolation mode costs time in proportion to width squared, and on one CPU thread a 64-wide MLP
# after 3000 FusedAdamW steps reaches a max error near 1e-3 in 1500 L-BFGS iterations (about 15 s),
# where a 128-wide one is still near 3e-3 after as long.
DEFAULTS = dict(data=None, samples=8192, steps=3000, batch_size=256, lr=3e-3, hidden=64, checkpoints=10,
                seed=0, interpolation=None)


def pendulum_data(n: int, t: float = 1.0, damping: float = 0.3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (angle, angular velocity) uniform over [-pi, pi] x [-2, 2]; targets: the state after
    time ``t`` of theta'' = -sin(theta) - damping * theta', integrated with RK4 (200 steps).
    Deterministic and noise-free, so the best model interpolates it exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64)
    x[:, 0] = (x[:, 0] * 2 - 1) * math.pi
    x[:, 1] = (x[:, 1] * 2 - 1) * 2.0

    def deriv(s: torch.Tensor) -> torch.Tensor:
        return torch.stack([s[:, 1], -torch.sin(s[:, 0]) - damping * s[:, 1]], dim=1)

    s, steps = x.clone(), 200
    h = t / steps
    for _ in range(steps):
        k1 = deriv(s)
        k2 = deriv(s + h / 2 * k1)
        k3 = deriv(s + h / 2 * k2)
        k4 = deriv(s + h * k3)
        s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x.float(), s.float()


def _load_npz(path: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"data file {path} not found")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile.BadZipFile, ValueError (object arrays), OSError...
        raise UsageError(f"{path} is not a readable .npz file of numeric arrays ({type(e).__name__}: {e})") from None
    aliases = [("x", "y"), ("inputs", "targets"), ("X", "Y")]
    pair = next(((a, b) for a, b in aliases if a in arrays and b in arrays), None)
    if pair is None:
        raise UsageError(f"{path} holds arrays {sorted(arrays)}: it needs 'x' and 'y' (inputs and targets)")
    out = {"x": arrays[pair[0]], "y": arrays[pair[1]]}
    if "x_val" in arrays or "y_val" in arrays:
        if not ("x_val" in arrays and "y_val" in arrays):
            raise UsageError(f"{path} has only one of 'x_val' and 'y_val'")
        out["x_val"], out["y_val"] = arrays["x_val"], arrays["y_val"]
    return out


def _check_arrays(x: np.ndarray, y: np.ndarray, what: str) -> None:
    if x.ndim < 2:
        raise UsageError(f"{what}x must have shape (rows, features...), got {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise UsageError(f"{what}x has {x.shape[0]} rows but {what}y has {y.shape[0]}")
    if x.shape[0] == 0:
        raise UsageError(f"{what}x has no rows")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise UsageError(f"{what}x must be real numbers, got dtype {x.dtype}")
    if not (np.issubdtype(y.dtype, np.floating) or np.issubdtype(y.dtype, np.integer)):
        raise UsageError(f"{what}y must be floats (regression) or integers (class labels), got dtype {y.dtype}")
    if not np.isfinite(x).all() or (np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all()):
        raise UsageError(f"{what}x or {what}y contains NaN or infinity")


# Up to this many output classes the labels may be sparse (say, 10 of 1000 ImageNet classes);
# beyond it at least half of the classes 0..max must occur.
_MAX_SPARSE_CLASSES = 4096


def _check_labels(y: np.ndarray, y_val: Optional[np.ndarray]) -> None:
    """Class labels index the model's output layer, which has ``max label + 1`` outputs: they must
    be >= 0 and dense enough that this layer is not mostly classes that never occur (labels such as
    10**9 would ask for a billion outputs: no memory for it, and no data to train them)."""
    labels = y if y_val is None else np.concatenate([y.ravel(), y_val.ravel()])
    if labels.min() < 0:
        raise UsageError(f"class labels in y{'' if y_val is None else ' and y_val'} must be >= 0, got {labels.min()}")
    classes = int(labels.max()) + 1
    present = len(np.unique(labels))
    if classes > max(_MAX_SPARSE_CLASSES, 2 * present):
        raise UsageError(f"class labels go up to {classes - 1} but only {present} distinct labels occur: "
                         f"labels must be 0..C-1 for C classes (remap them, e.g. with "
                         f"np.unique(y, return_inverse=True))")


class Job:
    """What ``train`` and ``overfit-check`` run: tensors, a model factory and the loss.

    ``cfg`` holds every key of :data:`DEFAULTS`. Without ``cfg["data"]`` the job is the pendulum task
    (``samples`` training rows, an eighth as many validation rows, interpolation mode by default);
    with it, the arrays of that ``.npz`` file (a seeded tenth held out for validation when it has no
    ``x_val``/``y_val``; integer ``y`` makes it a classification job)."""

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        if cfg["data"] is None:
            self.name = "pendulum"
            x, y = pendulum_data(cfg["samples"], seed=cfg["seed"])
            xv, yv = pendulum_data(max(cfg["samples"] // 8, 1), seed=cfg["seed"] + 1)
            self.classes = None
        else:
            self.name = os.path.splitext(os.path.basename(cfg["data"]))[0]
            arrays = _load_npz(cfg["data"])
            _check_arrays(arrays["x"], arrays["y"], "")
            classification = np.issubdtype(arrays["y"].dtype, np.integer)
            if classification and arrays["y"].ndim != 1:
                raise UsageError(f"integer y (class labels) must be 1-D, got shape {arrays['y'].shape}")
            if "x_val" in arrays:
                _check_arrays(arrays["x_val"], arrays["y_val"], "val ")
                if arrays["x_val"].shape[1:] != arrays["x"].shape[1:] or arrays["y_val"].shape[1:] != arrays["y"].shape[1:]:
                    raise UsageError(f"x_val/y_val rows have shapes {arrays['x_val'].shape[1:]}/{arrays['y_val'].shape[1:]}"
                                     f" but x/y rows {arrays['x'].shape[1:]}/{arrays['y'].shape[1:]}")
                if classification and not np.issubdtype(arrays["y_val"].dtype, np.integer):
                    raise UsageError(f"y holds class labels (integers) but y_val has dtype {arrays['y_val'].dtype}")
            if classification:
                _check_labels(arrays["y"], arrays.get("y_val"))
            if "x_val" in arrays:
                xs, ys, xv, yv = arrays["x"], arrays["y"], arrays["x_val"], arrays["y_val"]
            else:  # hold out a tenth, seeded
                n = arrays["x"].shape[0]
                perm = np.random.default_rng(cfg["seed"]).permutation(n)
                n_val = n // 10
                xs, ys = arrays["x"][perm[n_val:]], arrays["y"][perm[n_val:]]
                xv, yv = arrays["x"][perm[:n_val]], arrays["y"][perm[:n_val]]
            to_y = (lambda a: torch.from_numpy(np.ascontiguousarray(a)).long()) if classification else (
                lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
            x = torch.from_numpy(np.ascontiguousarray(xs, dtype=np.float32))
            y = to_y(ys)
            xv = torch.from_numpy(np.ascontiguousarray(xv, dtype=np.float32)) if len(xv) else None
            yv = to_y(yv) if xv is not None else None
            self.classes = int(max(int(ys.max()), int(yv.max()) if yv is not None else 0)) + 1 if classification else None
        self.x, self.y, self.x_val, self.y_val = x, y, xv, yv
        self.loss_fn = torch.nn.CrossEntropyLoss() if self.classes else torch.nn.MSELoss()
        self.loss_name = "loss" if self.classes else "mse"
        default_interp = cfg["data"] is None  # the pendulum is noise-free and complete
        self.interpolation = default_interp if cfg["interpolation"] is None else cfg["interpolation"]

    def model(self) -> torch.nn.Module:
        """A fresh two-hidden-layer tanh MLP of width ``cfg["hidden"]``, shaped to this job's rows."""
        d_in = int(math.prod(self.x.shape[1:]))
        d_out = self.classes or int(math.prod(self.y.shape[1:]) if self.y.dim() > 1 else 1)
        h = self.cfg["hidden"]
        layers = [torch.nn.Flatten(), torch.nn.Linear(d_in, h), torch.nn.Tanh(), torch.nn.Linear(h, h),
                  torch.nn.Tanh(), torch.nn.Linear(h, d_out)]
        if not self.classes and self.y.dim() == 1:
            layers.append(torch.nn.Flatten(0))
        elif not self.classes and self.y.dim() > 2:
            layers.append(torch.nn.Unflatten(1, tuple(self.y.shape[1:])))
        return torch.nn.Sequential(*layers)
