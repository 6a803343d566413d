"""Bayesian optimisation with a Gaussian process: ``GPSampler``.

The model (float64 torch throughout, no dependency beyond torch):

* Inputs: the search space every COMPLETE trial shares, mapped to [0, 1] (log parameters in log
  space; ints and stepped floats relaxed to a continuous interval and rounded back; categoricals
  one-hot). Outputs: the objective (negated for "maximize"), standardised to mean 0, std 1.
* Kernel: Matern-5/2 with one lengthscale per input column (ARD) times a signal variance, plus a
  noise variance >= 1e-6 on the diagonal (fixed at 1e-6 with ``deterministic_objective=True``).
* Fit: the kernel parameters maximise the log marginal likelihood plus the log prior Optuna uses
  (inverse squared lengthscales: -(0.1/a + 0.1 a); signal variance: Gamma(2, 1); noise: Gamma(1.1, 30)),
  with torch L-BFGS (strong Wolfe line search) on their logarithms, warm-started from the previous
  fit and capped at ``fit_iterations``.
* Acquisition: log expected improvement over the best observed value, computed stably for very
  negative z via the scaled complementary error function (``log h(z)`` of Ament et al., 2023).
  Maximised from ``n_candidates`` scrambled Sobol points (categorical columns decoded to valid
  one-hot choices); ``n_local_search`` starts (the best observed point, the best candidate, the rest
  drawn by EI roulette as Optuna does) are each refined by L-BFGS over the continuous columns, with
  closed-form gradients, preconditioned by the lengthscales, and kept inside [0, 1] by a triangle-wave
  reparametrisation (x = 1 - |1 - (u mod 2)|: unconstrained for the optimiser, slope +-1
  everywhere, so optima on the boundary are reachable).
* Pending trials (parallel workers): trials still RUNNING with all parameters known are added as
  fantasies at the GP's posterior mean ("kriging believer"), which collapses the variance there and
  steers the next suggestion elsewhere without refitting.
* The first ``n_startup_trials`` trials come from a scrambled Sobol sequence (``RandomSampler(sobol=True)``).

Parameters outside the shared space (conditional ones) are sampled uniformly at random.
"""
from __future__ import annotations

import math
import secrets
from contextlib import contextmanager
from typing import Any, Optional, Sequence

import torch

from .base import Sampler, intersection_search_space, sample_uniform, trial_rng
from .random import RandomSampler
from .space import CategoricalDistribution, Distribution
from .trial import FrozenTrial, TrialState

__all__ = ["GPSampler", "GaussianProcess", "log_expected_improvement"]

_MIN_NOISE = 1e-6
_SQRT5 = math.sqrt(5.0)
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_SQRT_PI_2 = math.sqrt(math.pi / 2)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


def _log_h(z: torch.Tensor) -> torch.Tensor:
    """log(phi(z) + z Phi(z)), the log of EI for a unit-variance prediction, stable for any z.

    phi(z) + z Phi(z) = phi(z) (1 + z sqrt(pi/2) erfcx(-z/sqrt2)), with erfcx(x) = exp(x^2) erfc(x):
    the log of phi is exact and erfcx never under- or overflows, so the log stays finite where EI
    itself underflows (z << 0). The bracket tends to 1/z^2; it loses digits as 1e-16 z^2, so below
    z = -1e4 the asymptote -z^2/2 - log sqrt(2 pi) - 2 log|z| takes over. Above z = 30, EI = z to
    within exp(-450); z is capped there so erfcx(-z/sqrt2) cannot overflow."""
    zc = z.clamp(-1e4, 30.0)
    bracket = torch.log1p(zc * (_SQRT_PI_2 * torch.special.erfcx(-zc * _INV_SQRT2)))
    body = -0.5 * zc * zc - _LOG_SQRT_2PI + bracket
    tail = -0.5 * z * z - _LOG_SQRT_2PI - 2 * torch.log(-z.clamp_max(-1e4))
    return torch.where(z >= -1e4, body, tail)


def log_expected_improvement(mean: torch.Tensor, var: torch.Tensor, best: float) -> torch.Tensor:
    """log E[max(best - f, 0)] for f ~ N(mean, var) (minimisation)."""
    sigma = var.clamp_min(1e-20).sqrt()
    return torch.log(sigma) + _log_h((best - mean) / sigma)


def _dlog_h(z: torch.Tensor) -> torch.Tensor:
    """d/dz log h(z) = Phi(z) / h(z) = q / (1 + z q) with q = sqrt(pi/2) erfcx(-z/sqrt2) (h' = Phi);
    the asymptote's derivative -z - 2/z below z = -1e4, 0 above the cap at 30."""
    zc = z.clamp(-1e4, 30.0)
    q = _SQRT_PI_2 * torch.special.erfcx(-zc * _INV_SQRT2)
    body = q / (1 + zc * q)
    zt = z.clamp_max(-1e4)
    tail = -zt - 2.0 / zt
    return torch.where(z > 30.0, torch.zeros_like(z), torch.where(z >= -1e4, body, tail))


class GaussianProcess:
    """An exact GP with a Matern-5/2 ARD kernel on inputs in [0, 1]^D, outputs already standardised.

    ``raw``: log inverse squared lengthscales (D), log signal variance, log(noise - 1e-6)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, raw: torch.Tensor, *, deterministic: bool) -> None:
        self.x, self.y, self.deterministic = x, y, deterministic
        self.set_params(raw)

    @staticmethod
    def unpack(raw: torch.Tensor, deterministic: bool) -> tuple:
        d = raw.shape[0] - 2
        inv_sq_ls = raw[:d].exp()
        signal = raw[d].exp()
        noise = raw.new_tensor(_MIN_NOISE) if deterministic else _MIN_NOISE + raw[d + 1].exp()
        return inv_sq_ls, signal, noise

    @staticmethod
    def matern52(d2: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        """signal * (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r) at scaled squared distances ``d2`` = r^2."""
        r = d2.clamp_min(1e-30).sqrt()
        return signal * (1 + _SQRT5 * r + (5.0 / 3.0) * d2) * torch.exp(-_SQRT5 * r)

    @staticmethod
    def sq_diffs(x: torch.Tensor) -> torch.Tensor:
        """(x_i - x_j)^2 per column, flattened to (n*n, D): fitted once, so each likelihood
        evaluation's distances are one matrix-vector product with the inverse squared lengthscales."""
        return ((x.unsqueeze(1) - x.unsqueeze(0)) ** 2).reshape(-1, x.shape[1])

    @staticmethod
    def loss_and_grad(raw: torch.Tensor, sqd: torch.Tensor, y: torch.Tensor,
                      deterministic: bool) -> tuple[float, torch.Tensor]:
        """-(log marginal likelihood + log prior) of the kernel parameters ``raw`` and its gradient,
        in closed form (a handful of n x n operations instead of an autograd graph; ``sqd`` from
        ``sq_diffs`` of the inputs)."""
        d = raw.shape[0] - 2
        n = y.shape[0]
        a, signal = raw[:d].exp(), raw[d].exp()
        noise = _MIN_NOISE if deterministic else _MIN_NOISE + float(raw[d + 1].exp())
        d2 = (sqd @ a).reshape(n, n)
        r = d2.clamp_min(0.0).sqrt()
        e = torch.exp(-_SQRT5 * r)
        kf = signal * (1 + _SQRT5 * r + (5.0 / 3.0) * d2) * e
        chol = torch.linalg.cholesky(kf + noise * torch.eye(n, dtype=y.dtype))
        k_inv = torch.cholesky_inverse(chol)
        alpha = k_inv @ y
        # NLL = y' K^-1 y / 2 + log det K / 2 + n log sqrt(2 pi); log prior as in the module docstring.
        nll = 0.5 * float(y @ alpha) + float(torch.log(torch.diagonal(chol)).sum()) + n * _LOG_SQRT_2PI
        s = float(signal)
        log_prior = -float((0.1 / a + 0.1 * a).sum()) + math.log(s) - s
        if not deterministic:
            log_prior += 0.1 * math.log(noise) - 30.0 * noise
        # dNLL/dK = (K^-1 - alpha alpha') / 2; dk/d(d2) of the Matern-5/2 = -(5/6) s (1 + sqrt5 r) e^(-sqrt5 r).
        w = 0.5 * (k_inv - torch.outer(alpha, alpha))
        dk_dd2 = (-5.0 / 6.0) * signal * (1 + _SQRT5 * r) * e
        g_a = sqd.T @ (w * dk_dd2).reshape(-1)
        grad = torch.empty_like(raw)
        # Chain rule through a = exp(raw): d/draw = a * d/da; prior terms enter with a minus sign.
        grad[:d] = (g_a - (0.1 / (a * a) - 0.1)) * a
        grad[d] = float((w * kf).sum()) - (1.0 - s)
        if deterministic:
            grad[d + 1] = 0.0
        else:
            ex = noise - _MIN_NOISE
            grad[d + 1] = (float(torch.diagonal(w).sum()) - (0.1 / noise - 30.0)) * ex
        return nll - log_prior, grad

    def set_params(self, raw: torch.Tensor) -> None:
        self.raw = raw.detach()
        self.inv_sq_ls, self.signal, self.noise = self.unpack(self.raw, self.deterministic)
        n = self.x.shape[0]
        k = self.matern52((self.sq_diffs(self.x) @ self.inv_sq_ls).reshape(n, n), self.signal)
        chol = torch.linalg.cholesky(k + self.noise * torch.eye(n, dtype=self.x.dtype))
        self.alpha = torch.cholesky_solve(self.y.unsqueeze(-1), chol).squeeze(-1)
        # Prediction needs L^-1 k*: one matrix product with L^-1 is much cheaper than a triangular
        # solve per batch of candidates, and stable in float64 with the noise floor of 1e-6.
        self.chol_inv_t = torch.linalg.solve_triangular(chol, torch.eye(n, dtype=self.x.dtype), upper=False).T
        self.scale = self.inv_sq_ls.sqrt()
        self.xw = self.x * self.scale
        self.xw_sq = (self.xw * self.xw).sum(1)

    def condition_on(self, x_new: torch.Tensor, y_new: torch.Tensor) -> "GaussianProcess":
        """The same kernel with extra (fantasy) observations."""
        return GaussianProcess(torch.cat([self.x, x_new]), torch.cat([self.y, y_new]), self.raw,
                               deterministic=self.deterministic)

    def posterior(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of the latent function at ``xs`` (m x D)."""
        xsw = xs * self.scale
        # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b (one matrix product; clamped against rounding below 0).
        d2 = ((xsw * xsw).sum(1, keepdim=True) + self.xw_sq - 2 * xsw @ self.xw.T).clamp_min(0.0)
        ks = self.matern52(d2, self.signal)
        mean = ks @ self.alpha
        v = ks @ self.chol_inv_t
        var = (self.signal - (v * v).sum(1)).clamp_min(1e-12)
        return mean, var

    def log_ei(self, xs: torch.Tensor, best: float) -> torch.Tensor:
        """log EI at ``xs`` (m x D): the improvement below ``best`` (minimisation)."""
        mean, var = self.posterior(xs)
        return log_expected_improvement(mean, var, best)

    def log_ei_and_grad(self, xs: torch.Tensor, best: float) -> tuple[torch.Tensor, torch.Tensor]:
        """log EI at ``xs`` (m x D) and its gradient with respect to ``xs``, in closed form.

        mean = k* alpha and var = s - k* K^-1 k*'; every k*_j depends on x through the scaled squared
        distance d2_j = sum_l a_l (x_l - X_jl)^2, so d/dx_l = 2 a_l sum_j w_j (x_l - X_jl), with
        w_j = (dlogEI/dmean alpha_j - 2 dlogEI/dvar (k* K^-1)_j) dk/d(d2_j)."""
        xsw = xs * self.scale
        d2 = ((xsw * xsw).sum(1, keepdim=True) + self.xw_sq - 2 * xsw @ self.xw.T).clamp_min(0.0)
        r = d2.sqrt()
        e = torch.exp(-_SQRT5 * r)
        ks = self.signal * (1 + _SQRT5 * r + (5.0 / 3.0) * d2) * e
        dk_dd2 = (-5.0 / 6.0) * self.signal * (1 + _SQRT5 * r) * e
        mean = ks @ self.alpha
        v = ks @ self.chol_inv_t
        b = v @ self.chol_inv_t.T  # k* K^-1
        var_raw = self.signal - (v * v).sum(1)
        var = var_raw.clamp_min(1e-12)
        sigma = var.sqrt()
        z = (best - mean) / sigma
        g = _dlog_h(z)
        value = torch.log(sigma) + _log_h(z)
        g_mean = -g / sigma
        # d logEI / d sigma = (1 - z g) / sigma; d sigma / d var = 1 / (2 sigma) (0 where clamped).
        g_var = torch.where(var_raw > 1e-12, (1 - z * g) / (2 * var), torch.zeros_like(var))
        w = (g_mean.unsqueeze(1) * self.alpha - 2 * g_var.unsqueeze(1) * b) * dk_dd2
        grad = 2 * self.inv_sq_ls * (xs * w.sum(1, keepdim=True) - w @ self.x)
        return value, grad

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, *, deterministic: bool, init: Optional[torch.Tensor],
            iterations: int, warm_iterations: int = 10) -> "GaussianProcess":
        """Maximise the log posterior of the kernel parameters with L-BFGS: from ``init`` (the
        previous fit) for at most ``warm_iterations``, else from the defaults (lengthscales 1,
        signal 1, noise 1e-2) for at most ``iterations``."""
        d = x.shape[1]
        sqd = cls.sq_diffs(x)
        default = torch.zeros(d + 2, dtype=torch.float64)
        default[d + 1] = math.log(1e-2)
        starts = [init, default] if init is not None and init.shape == default.shape else [default]
        best, best_loss = None, math.inf
        for start in starts:
            raw = start.clone().requires_grad_(True)
            # A warm start is only a few steps from the new optimum (one more observation): a short
            # run, continued at the next suggestion, amortises the fit across trials.
            max_iter = iterations if start is not init else max(1, min(iterations, warm_iterations))
            opt = torch.optim.LBFGS([raw], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-4, tolerance_change=1e-9)

            def closure() -> torch.Tensor:
                loss, grad = cls.loss_and_grad(raw.detach(), sqd, y, deterministic)
                raw.grad = grad
                return torch.tensor(loss, dtype=torch.float64)

            try:
                opt.step(closure)
                with torch.no_grad():
                    raw.clamp_(-20.0, 20.0)
                loss = cls.loss_and_grad(raw.detach(), sqd, y, deterministic)[0]
            except (torch.linalg.LinAlgError, RuntimeError):
                continue
            if math.isfinite(loss) and loss < best_loss:
                best, best_loss = raw.detach().clone(), loss
            if best is not None and start is init:
                break  # a warm start that converged is as good as a cold one, at a fraction of the cost
        if best is None:
            best = default
        return cls(x, y, best, deterministic=deterministic)


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
        self.continuous = torch.zeros(col, dtype=torch.bool)
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

    def from_unit_cube(self, u: torch.Tensor) -> torch.Tensor:
        """Candidates: a point per row of ``u`` (m x n_params, uniform in [0, 1)), categorical
        coordinates turned into one-hot choices."""
        x = torch.zeros(u.shape[0], self.dim, dtype=torch.float64)
        for j, (name, d, c, w) in enumerate(self.columns):
            if isinstance(d, CategoricalDistribution):
                idx = (u[:, j] * w).long().clamp_(0, w - 1)
                x[torch.arange(u.shape[0]), c + idx] = 1.0
            else:
                x[:, c] = u[:, j]
        return x


@contextmanager
def torch_threads(n: int):
    """Run a block with ``torch.set_num_threads(n)``, restoring the previous count afterwards. The
    GP's matrices are small (n trials squared): intra-op threads only add synchronisation, and on a
    busy machine their spinning costs 10x (measured: 1.8 s vs 0.16 s per suggestion at 30 trials)."""
    old = torch.get_num_threads()
    if n <= 0 or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class GPSampler(Sampler):
    """Gaussian-process Bayesian optimisation (see the module docstring for the model).

    seed: makes the suggestions reproducible (trial k's draw depends on (seed, k)).
    n_startup_trials: Sobol trials before the GP takes over. deterministic_objective: the objective
    has no noise (noise variance fixed at 1e-6). n_candidates / n_local_search / fit_iterations /
    acq_iterations: the cost-accuracy knobs of the fit and the acquisition optimisation.
    threads: torch threads while proposing (restored afterwards; 0 leaves torch's setting alone).
    """

    def __init__(self, seed: Optional[int] = None, *, n_startup_trials: int = 10, deterministic_objective: bool = False,
                 n_candidates: int = 512, n_local_search: int = 5, fit_iterations: int = 50,
                 acq_iterations: int = 20, warm_iterations: int = 10, threads: int = 1) -> None:
        if n_startup_trials < 1:
            raise ValueError(f"n_startup_trials must be >= 1, got {n_startup_trials}")
        self.seed = secrets.randbits(32) if seed is None else int(seed)
        self.n_startup_trials = int(n_startup_trials)
        self.deterministic_objective = bool(deterministic_objective)
        self.n_candidates = int(n_candidates)
        self.n_local_search = int(n_local_search)
        self.fit_iterations = int(fit_iterations)
        self.acq_iterations = int(acq_iterations)
        self.threads = int(threads)
        self.warm_iterations = int(warm_iterations)
        self._startup = RandomSampler(self.seed, sobol=True)
        self._warm: dict = {}  # space key -> last fitted raw kernel parameters (list of floats)

    def sample_independent(self, study: Any, number: int, name: str, dist: Distribution,
                           history: Sequence[FrozenTrial]) -> Any:
        return sample_uniform(dist, float(trial_rng(self.seed, number, name).random()))

    def before_trial(self, study: Any, number: int, history: Sequence[FrozenTrial]) -> dict:
        space = intersection_search_space(history)
        done = [t for t in history if t.state is TrialState.COMPLETE and t.value is not None]
        if not space or len(done) < self.n_startup_trials:
            return self._startup.before_trial(study, number, history)
        sign = -1.0 if getattr(study, "direction", "minimize") == "maximize" else 1.0
        with torch_threads(self.threads):
            return self.propose(space, [t.params for t in done], [sign * t.value for t in done],
                                [t.params for t in history if t.state is TrialState.RUNNING
                                 and all(k in t.params for k in space)], number)

    def propose(self, space: dict, params: Sequence[dict], values: Sequence[float], pending: Sequence[dict],
                number: int) -> dict:
        """The next point for minimising ``values`` observed at ``params``, avoiding ``pending``."""
        enc = _Encoder(space)
        x = torch.tensor([enc.encode(p) for p in params], dtype=torch.float64)
        y = torch.tensor(values, dtype=torch.float64)
        std = float(y.std()) if len(values) > 1 else 1.0
        y = (y - y.mean()) / (std if std > 0 and math.isfinite(std) else 1.0)
        key = tuple((k, repr(d)) for k, d in space.items())
        init = self._warm.get(key)
        gp = GaussianProcess.fit(x, y, deterministic=self.deterministic_objective,
                                 init=None if init is None else torch.tensor(init, dtype=torch.float64),
                                 iterations=self.fit_iterations, warm_iterations=self.warm_iterations)
        self._warm[key] = gp.raw.tolist()
        best = float(y.min())
        if pending:
            xp = torch.tensor([enc.encode(p) for p in pending], dtype=torch.float64)
            gp = gp.condition_on(xp, gp.posterior(xp)[0])
        row = self._maximise_acquisition(gp, enc, best, x, y, number)
        return enc.decode(row.tolist())

    def _maximise_acquisition(self, gp: GaussianProcess, enc: _Encoder, best: float, x: torch.Tensor,
                              y: torch.Tensor, number: int) -> torch.Tensor:
        n_params = len(enc.columns)
        engine = torch.quasirandom.SobolEngine(n_params, scramble=True, seed=(self.seed + 7919 * number) & 0x7FFFFFFF)
        cand = enc.from_unit_cube(engine.draw(self.n_candidates, dtype=torch.float64))
        acq = gp.log_ei(cand, best)
        # Local-search starts (as Optuna does): the best observed point, the best candidate, and
        # candidates drawn with probability proportional to their EI (roulette), for diversity.
        i_best = int(torch.argmax(acq))
        starts = [x[int(torch.argmin(y))], cand[i_best]]
        probs = torch.exp(acq - acq[i_best])
        probs[i_best] = 0.0
        n_extra = min(self.n_local_search - 2, int((probs > 0).sum()))
        if n_extra > 0:
            g = torch.Generator().manual_seed((self.seed * 31 + number) & 0x7FFFFFFF)
            starts += list(cand[torch.multinomial(probs, n_extra, replacement=False, generator=g)])
        best_x, best_acq = cand[i_best].clone(), float(acq[i_best])
        cont = enc.continuous
        if not bool(cont.any()) or self.acq_iterations <= 0:
            return best_x
        # Precondition by the lengthscales: in z = x / l the acquisition is equally curved along
        # every axis, which is what a quasi-Newton method converges fastest on.
        ls = gp.inv_sq_ls[cont].rsqrt()
        xr, v = self._local_search(gp, torch.stack(starts[: self.n_local_search]), cont, ls, best)
        i = int(torch.argmax(v))
        if float(v[i]) > best_acq:
            best_x = xr[i].clone()
        return best_x

    def _local_search(self, gp: GaussianProcess, x0: torch.Tensor, cont: torch.Tensor, ls: torch.Tensor,
                      best: float) -> tuple[torch.Tensor, torch.Tensor]:
        """L-BFGS on log EI from the rows of ``x0`` over the continuous columns (categoricals stay
        fixed), all starts at once: they are independent, so minimising the sum of their negated
        values optimises each (a block-diagonal problem, one batched evaluation per step)."""
        full = x0.clone()
        u = (x0[:, cont] / ls).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([u], lr=1.0, max_iter=self.acq_iterations, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-7, tolerance_change=1e-12)

        def assemble(uu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Triangle wave: any real x = l z maps into [0, 1], with slope dx/dz = l sign(1 - (x mod 2)).
            t = torch.remainder(uu * ls, 2.0)
            out = full.clone()
            out[:, cont] = 1.0 - (1.0 - t).abs()
            return out, torch.sign(1.0 - t) * ls

        def closure() -> torch.Tensor:
            xs, slope = assemble(u.detach())
            value, grad = gp.log_ei_and_grad(xs, best)
            u.grad = -(grad[:, cont] * slope)
            return -value.sum()

        try:
            opt.step(closure)
        except (torch.linalg.LinAlgError, RuntimeError):
            return x0.clone(), torch.full((x0.shape[0],), -math.inf, dtype=torch.float64)
        xr = assemble(u.detach())[0]
        v = gp.log_ei(xr, best)
        return xr, torch.where(torch.isfinite(v), v, torch.full_like(v, -math.inf))
