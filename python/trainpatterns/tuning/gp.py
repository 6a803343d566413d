"""Bayesian optimisation with a Gaussian process: ``GPSampler``.

The first ``n_startup_trials`` observations are random (i.i.d. uniform; scrambled Sobol with
``sobol_startup=True``). After that, every trial models the observed trials with the GP of
``gp_model`` over the parameters every COMPLETE trial shares: a Matern-5/2 ARD kernel on inputs
scaled to [0, 1], outputs warped by a fitted Yeo-Johnson transform, and a bowl-shaped prior mean
rising towards the faces of the cube. The next point maximises log expected improvement: the best of
``n_candidates`` scrambled Sobol points, refined by ``n_local_search`` gradient searches inside the
[0, 1] box over the continuous columns. Parameters outside the shared space (conditional ones) are
sampled uniformly.

Large studies: the kernel parameters are refitted (from the last fit) at every trial up to 100
observations, then once the observations have grown by ``refit_growth`` (1%) since the last fit:
every 3rd trial at 300, every 10th at 1000. One more observation barely moves them, and a fit at a
thousand trials costs half a second. In between, the new observations extend the previous GP's
Cholesky factor, O(n^2) per observation instead of a new O(n^3) factorisation.

Parallel workers: trials still RUNNING enter as fantasies at the posterior mean (kriging believer),
at the values they suggested, else their fixed ones, else the proposal stored when they started
(``system_attrs["proposal"]``); the fantasies count for the incumbent, so expected improvement
vanishes at and next to them. The study lets workers propose one at a time (``serial_proposals``),
so workers that claim together still see each other's points.

Pruned trials count (``learn_from_pruned=True``): a PRUNED trial with a finite last reported value
is an observation at that value, as if the trial had ended there. For a training loss that falls
with the steps, the value at the step where the pruner stopped a trial is above what the trial would
have reached at the end: a pessimistic stand-in, on purpose. The pruner stopped the trial because it
was behind its peers at the same step, so charging its region with a value worse than its final one
steers expected improvement away from it, which is the pruner's verdict; leaving pruned trials out
instead throws away most of what an ASHA study measured (with a small budget nearly every trial is
pruned, and the model would see one or two points). Pruned values never set the incumbent, the best
value that expected improvement must beat, while a COMPLETE trial exists: a value read mid-training
is not a result, and an early value below every final one would make the search chase a level no
finished trial reached. Startup counts observations of both kinds.

The reasons behind each choice: docs/tuning-gp-design.md; the design study and the comparison with
Optuna's GPSampler: see bench/RESULTS.md.
"""
from __future__ import annotations

import math
import secrets
from typing import Any, Optional, Sequence

import numpy as np

from .base import Sampler, intersection_search_space, sample_uniform, trial_rng
from .gp_model import (GaussianProcess, _Encoder, blas_threads, log_expected_improvement, sobol_points,
                       standardise_or_centre, warp_outputs)
from .random import RandomSampler
from .space import Distribution
from .trial import FrozenTrial, TrialState

__all__ = ["GPSampler", "GaussianProcess", "log_expected_improvement", "warp_outputs"]


class GPSampler(Sampler):
    """Gaussian-process Bayesian optimisation (the model: module docstring and ``gp_model``).

    seed: makes the suggestions reproducible (trial k's draw depends on (seed, k)).
    n_startup_trials: random trials before the GP takes over (i.i.d. uniform; scrambled Sobol with
    ``sobol_startup=True``). deterministic_objective: the objective has no noise (noise variance
    fixed at 1e-6). warp_outputs / quadratic_mean: the Yeo-Johnson output warping and the bowl-shaped
    prior mean of ``gp_model`` (both on by default; off gives a zero-mean GP on
    standardised values, as Optuna's). n_candidates / n_local_search / fit_iterations /
    acq_iterations: the cost-accuracy knobs of the fit and of the acquisition optimisation (the
    defaults follow Optuna's: 2048 Sobol candidates, 10 local searches, both searches run to a
    gradient tolerance of 1e-2, at most 200 iterations).
    threads: BLAS threads while proposing (restored afterwards; 0 leaves the setting alone).
    learn_from_pruned: PRUNED trials enter the model at their last reported value (module docstring).
    refit_growth: refit the kernel parameters once the observations have grown by this fraction
    since the last fit (at least one new observation; 0: at every trial; module docstring).
    """

    serial_proposals = True  # the study proposes one trial at a time, so each sees the others as pending

    def __init__(self, seed: Optional[int] = None, *, n_startup_trials: int = 10, deterministic_objective: bool = False,
                 n_candidates: int = 2048, n_local_search: int = 10, fit_iterations: int = 200,
                 acq_iterations: int = 200, threads: int = 1, sobol_startup: bool = False,
                 warp_outputs: bool = True, quadratic_mean: bool = True, learn_from_pruned: bool = True,
                 refit_growth: float = 0.01) -> None:
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be >= 1, got {n_startup_trials}")
        if isinstance(refit_growth, bool) or not (isinstance(refit_growth, (int, float))
                                                  and 0.0 <= refit_growth <= 1.0):
            raise ValueError(f"refit_growth must be a fraction in [0, 1], got {refit_growth!r}")
        for name, value, low in (("n_candidates", n_candidates, 1), ("n_local_search", n_local_search, 0),
                                 ("fit_iterations", fit_iterations, 1), ("acq_iterations", acq_iterations, 0)):
            if int(value) < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.seed = secrets.randbits(32) if seed is None else int(seed)
        self.n_startup_trials = int(n_startup_trials)
        self.deterministic_objective = bool(deterministic_objective)
        self.n_candidates = int(n_candidates)
        self.n_local_search = int(n_local_search)
        self.fit_iterations = int(fit_iterations)
        self.acq_iterations = int(acq_iterations)
        self.threads = int(threads)
        self.sobol_startup = bool(sobol_startup)
        self.warp_outputs = bool(warp_outputs)
        self.quadratic_mean = bool(quadratic_mean)
        self.learn_from_pruned = bool(learn_from_pruned)
        self.refit_growth = float(refit_growth)
        self._startup = RandomSampler(self.seed, sobol=self.sobol_startup)
        self._warm: dict = {}  # space key -> (last fitted raw kernel parameters, observations then)
        self._last: Optional[GaussianProcess] = None  # the last proposal's GP, whose factor may be extended

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_last"] = None  # n x n matrices: a worker process builds its own
        return d

    def sample_independent(self, study: Any, number: int, name: str, dist: Distribution,
                           history: Sequence[FrozenTrial]) -> Any:
        return sample_uniform(dist, float(trial_rng(self.seed, number, name).random()))

    def model_space(self, history: Sequence[FrozenTrial]) -> dict:
        """The parameters the GP models for the next trial: those every COMPLETE trial of ``history``
        shares (name-sorted); empty while the sampler is still in its startup trials."""
        space = intersection_search_space(history)
        return space if space and len(self.observations(history, space)) >= self.n_startup_trials else {}

    def observations(self, history: Sequence[FrozenTrial], space: dict) -> list:
        """The trials the GP learns from: COMPLETE ones, and (``learn_from_pruned``) PRUNED ones with a
        finite value that have every parameter of ``space`` with the same distribution."""
        out = []
        for t in history:
            if t.value is None or not math.isfinite(t.value):
                continue
            if t.state is TrialState.COMPLETE or (
                    self.learn_from_pruned and t.state is TrialState.PRUNED
                    and all(t.distributions.get(k) == d for k, d in space.items())):
                out.append(t)
        return out

    def before_trial(self, study: Any, number: int, history: Sequence[FrozenTrial]) -> dict:
        space = self.model_space(history)
        if not space:
            return self._startup.before_trial(study, number, history)
        # In the order they finished: the newest observations are then the last rows, and the
        # previous proposal's factor extends to them.
        seen = sorted(self.observations(history, space),
                      key=lambda t: (t.datetime_complete is None, t.datetime_complete or 0.0, t.number))
        sign = -1.0 if getattr(study, "direction", "minimize") == "maximize" else 1.0
        pending = [_pending_point(t, space) for t in history if t.state is TrialState.RUNNING]
        with blas_threads(self.threads):
            return self.propose(space, [t.params for t in seen], [sign * t.value for t in seen],
                                [p for p in pending if p is not None], number,
                                pruned=[t.state is TrialState.PRUNED for t in seen])

    def propose(self, space: dict, params: Sequence[dict], values: Sequence[float], pending: Sequence[dict],
                number: int, *, pruned: Sequence[bool] = ()) -> dict:
        """The next point for minimising ``values`` observed at ``params``, avoiding ``pending``.
        ``pruned``: which observations are pruned trials' last values (they never set the incumbent
        while a finished observation exists)."""
        if len(pruned) not in (0, len(values)):
            raise ValueError(f"propose: pruned has {len(pruned)} flags for {len(values)} values")
        enc = _Encoder(space)
        x = np.array([enc.encode(p) for p in params], dtype=np.float64).reshape(len(params), enc.dim)
        y = np.array(values, dtype=np.float64)
        y = warp_outputs(y) if self.warp_outputs else standardise_or_centre(y)
        gp = self._model(tuple((k, repr(d)) for k, d in space.items()), x, y, enc)
        final = ~np.array(pruned, dtype=bool) if len(pruned) else np.ones(len(y), dtype=bool)
        if not final.any():
            final[:] = True
        best = float(y[final].min())
        if pending:
            # Kriging believer: each pending point observed at its posterior mean, which also
            # counts for the incumbent, so expected improvement vanishes there and next to it.
            xp = np.array([enc.encode(p) for p in pending], dtype=np.float64)
            fantasy = gp.posterior(xp)[0]
            gp = gp.condition_on(xp, fantasy)
            best = min(best, float(fantasy.min()))
        row = self._maximise_acquisition(gp, enc, best, x[final], y[final], number)
        return enc.decode(row.tolist())

    def _model(self, key: tuple, x: np.ndarray, y: np.ndarray, enc: _Encoder) -> GaussianProcess:
        """The GP for this proposal. Its kernel parameters are refitted, from the last fit on this space,
        once the observations have grown by ``refit_growth`` (at least one) since that fit; until
        then the last fit's parameters stay, and the previous GP's factor is extended by the new
        rows when its inputs are the first rows of ``x`` (O(n^2) instead of O(n^3)). Also refitted
        when the new rows make the kept kernel numerically singular."""
        n = len(y)
        warm = self._warm.get(key)
        opts = dict(deterministic=self.deterministic_objective,
                    mean_columns=enc.continuous if self.quadratic_mean else None)
        gp = None
        if warm is not None and 0 <= n - warm[1] < max(1.0, self.refit_growth * warm[1]):
            try:
                gp = GaussianProcess(x, y, np.array(warm[0]), extends=self._last, **opts)
            except np.linalg.LinAlgError:
                gp = None
        if gp is None:
            gp = GaussianProcess.fit(x, y, init=None if warm is None else np.array(warm[0]),
                                     iterations=self.fit_iterations, **opts)
            self._warm[key] = (gp.raw.tolist(), n)
        self._last = gp
        return gp

    def _maximise_acquisition(self, gp: GaussianProcess, enc: _Encoder, best: float, x: np.ndarray,
                              y: np.ndarray, number: int) -> np.ndarray:
        """The point maximising log EI over ``best``; ``x``, ``y``: the observations the incumbent
        is chosen from (a local search starts at the best of them)."""
        rng = trial_rng(self.seed, number, "gp-acquisition")
        cand = enc.from_unit_cube(sobol_points(len(enc.columns), self.n_candidates, rng))
        acq = gp.log_ei(cand, best)
        # Local-search starts (as Optuna does): the best observed point, the best candidate, and
        # candidates drawn with probability proportional to their EI (roulette), for diversity.
        i_best = int(np.argmax(acq))
        best_x, best_acq = cand[i_best].copy(), float(acq[i_best])
        if self.n_local_search <= 0 or self.acq_iterations <= 0 or not enc.continuous.any():
            return best_x
        starts = [cand[i_best], x[int(np.argmin(y))]][: self.n_local_search]
        probs = np.exp(acq - acq[i_best])
        probs[i_best] = 0.0
        n_extra = min(self.n_local_search - len(starts), int(np.count_nonzero(probs > 0)))
        if n_extra > 0:
            starts += list(cand[rng.choice(len(cand), size=n_extra, replace=False, p=probs / probs.sum())])
        # Precondition by the lengthscales: in z = x / l the acquisition is equally curved along
        # every axis, which is what a quasi-Newton method converges fastest on.
        ls = 1.0 / gp.scale[enc.continuous]
        xr, v = self._local_search(gp, np.array(starts), enc.continuous, ls, best)
        i = int(np.argmax(v))
        return xr[i] if v[i] > best_acq else best_x

    def _local_search(self, gp: GaussianProcess, x0: np.ndarray, cont: np.ndarray, ls: np.ndarray,
                      best: float) -> tuple[np.ndarray, np.ndarray]:
        """Maximise log EI from every row of ``x0`` at once over the continuous columns (categoricals
        stay fixed), in the preconditioned coordinates z = x / l, inside the box 0 <= z <= 1 / l.

        Spectral projected gradient (Birgin, Martinez & Raydan, 2000), one independent search per
        start, vectorised: a step of length t along the gradient, projected onto the box, is taken
        if it gains at least 1e-4 of its first-order prediction (else t halves); after a step, t is
        the Barzilai-Borwein estimate of the inverse curvature, s.s / -(s.dg). A search stops when
        its projected gradient max|P(z + g) - z| is below 1e-2 (Optuna's L-BFGS-B tolerance), its
        step underflows, or after ``acq_iterations`` rounds. Every round is one batched evaluation
        of the still-active starts, instead of a scipy call per start with ~0.2 ms of overhead per
        iteration. Returns the final points and their log EI."""
        upper = 1.0 / ls
        xs = x0.copy()

        def evaluate(rows: np.ndarray, zz: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            pts = xs[rows].copy()
            pts[:, cont] = zz * ls
            value, grad = gp.log_ei_and_grad(pts, best)
            return value, grad[:, cont] * ls  # chain rule: dx/dz = l

        z = x0[:, cont] / ls
        f, g = evaluate(np.arange(len(z)), z)
        # A first step of unit length in the largest gradient component: one lengthscale, at most.
        t = 1.0 / np.maximum(np.abs(g).max(1), 1e-12)
        active = np.isfinite(f) & np.all(np.isfinite(g), axis=1)
        for _ in range(self.acq_iterations):
            active &= np.abs(np.clip(z + g, 0.0, upper) - z).max(1) >= 1e-2
            rows = np.flatnonzero(active)
            if rows.size == 0:
                break
            step = np.clip(z[rows] + t[rows, None] * g[rows], 0.0, upper) - z[rows]
            f_new, g_new = evaluate(rows, z[rows] + step)
            gain = (g[rows] * step).sum(1)
            ok = np.isfinite(f_new) & (f_new >= f[rows] + 1e-4 * gain)
            acc = rows[ok]
            s, dg = step[ok], g_new[ok] - g[acc]
            curv = -(s * dg).sum(1)
            z[acc] += s
            f[acc], g[acc] = f_new[ok], g_new[ok]
            # BB step where the curvature along s is negative (a maximum ahead), else a long step
            # that the box and the backtracking will cut back.
            t[acc] = np.where(curv > 1e-300, (s * s).sum(1) / np.maximum(curv, 1e-300), 1e3)
            rej = rows[~ok]
            t[rej] *= 0.5
            active[rej] &= t[rej] > 1e-12
        out = x0.copy()
        out[:, cont] = np.clip(z * ls, 0.0, 1.0)
        return out, np.where(np.isfinite(f), f, -np.inf)


def _pending_point(trial: FrozenTrial, space: dict) -> Optional[dict]:
    """Where a RUNNING trial evaluates the objective, over ``space``: the values it suggested, else
    its fixed ones (enqueued, grid), else the sampler's proposal stored when it started; None when a
    parameter is missing or outside its distribution."""
    point = {**trial.system_attrs.get("proposal", {}), **trial.system_attrs.get("fixed_params", {}), **trial.params}
    if all(k in point and d.contains(point[k]) for k, d in space.items()):
        return {k: point[k] for k in space}
    return None
