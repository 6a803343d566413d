"""The Gaussian-process model behind ``GPSampler``: the kernel, the fit of its parameters, log
expected improvement, the output warping, and the encoding of parameters as points of [0, 1]^D.

Float64 numpy/scipy throughout: the matrices are (trials x trials), so the cost is per-call
overhead, which numpy keeps low.

* Inputs (``_Encoder``): log parameters in log space, ints and stepped floats relaxed to a
  continuous interval and rounded back, categoricals one-hot; every column in [0, 1].
* Outputs (``warp_outputs``): standardised, Yeo-Johnson transformed with the maximum-likelihood
  lambda, standardised again. Monotone, so the incumbent is unchanged.
* Prior mean: m(x) = c + b * sum_d (x_d - 1/2)^2 over the continuous columns (a bowl rising towards
  the faces of the cube), b >= 0, (c, b) by generalised least squares given the fitted kernel
  (b = 0 when the data do not support a positive one).
* Kernel: Matern-5/2 with one lengthscale per column (ARD) times a signal variance, plus a noise
  variance >= 1e-6 on the diagonal (exactly 1e-6 for a deterministic objective).
* Fit: maximum of the log marginal likelihood plus a log prior (inverse squared lengthscales a:
  -(0.1/a + 0.1 a); signal variance: Gamma(2, 1); noise: Gamma(1.1, 30)), by L-BFGS-B on the
  logarithms of the parameters with the closed-form gradient, warm-started from a previous fit.
* Acquisition: log EI, finite even where EI underflows (``log h(z)`` of Ament et al., 2023), and
  its closed-form gradient with respect to the inputs.

Why each piece is as it is: docs/tuning-gp-design.md.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special
import scipy.stats
from scipy.stats import qmc
from threadpoolctl import ThreadpoolController

from .space import CategoricalDistribution

__all__ = ["GaussianProcess", "log_expected_improvement", "warp_outputs", "standardise",
           "standardise_or_centre", "sobol_points", "blas_threads"]

_MIN_NOISE = 1e-6
_SQRT5 = math.sqrt(5.0)
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_SQRT_PI_2 = math.sqrt(math.pi / 2)
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_RAW_BOUND = 20.0  # |log kernel parameter| <= 20: e^20 is far past any useful lengthscale or variance


def _log_h_and_slope(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log h(z) = log(phi(z) + z Phi(z)), the log of EI for a unit-variance prediction, stable for
    any z, and its derivative Phi(z) / h(z) (h' = Phi), sharing one erfcx evaluation.

    phi(z) + z Phi(z) = phi(z) (1 + z q) with q = sqrt(pi/2) erfcx(-z/sqrt2), erfcx(x) = exp(x^2) erfc(x):
    the log of phi is exact and erfcx never under- or overflows, so the log stays finite where EI
    itself underflows (z << 0); the slope is q / (1 + z q). The bracket tends to 1/z^2; it loses
    digits as 1e-16 z^2, so below z = -1e4 the asymptote -z^2/2 - log sqrt(2 pi) - 2 log|z| (slope
    -z - 2/z) takes over. Above z = 30, EI = z to within exp(-450): z is capped there so
    erfcx(-z/sqrt2) cannot overflow, and the slope is 0 (as capped)."""
    z = np.asarray(z, dtype=np.float64)
    zc = np.clip(z, -1e4, 30.0)
    q = _SQRT_PI_2 * scipy.special.erfcx(-zc * _INV_SQRT2)
    value = -0.5 * zc * zc - _LOG_SQRT_2PI + np.log1p(zc * q)
    slope = q / (1 + zc * q)
    far = z < -1e4
    if far.any():  # rare: only far from every observation with a tiny variance
        zt = z[far]
        value[far] = -0.5 * zt * zt - _LOG_SQRT_2PI - 2 * np.log(-zt)
        slope[far] = -zt - 2.0 / zt
    slope[z > 30.0] = 0.0
    return value, slope


def _log_h(z: np.ndarray) -> np.ndarray:
    """log(phi(z) + z Phi(z)); see ``_log_h_and_slope``."""
    return _log_h_and_slope(z)[0]


def log_expected_improvement(mean: np.ndarray, var: np.ndarray, best: float) -> np.ndarray:
    """log E[max(best - f, 0)] for f ~ N(mean, var) (minimisation)."""
    sigma = np.sqrt(np.maximum(var, 1e-20))
    return np.log(sigma) + _log_h((best - mean) / sigma)


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


def _matern52(d2: np.ndarray, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """signal * (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r) at scaled squared distances ``d2`` = r^2, and
    its derivative with respect to d2: -(5/6) signal (1 + sqrt5 r) exp(-sqrt5 r)."""
    r = np.sqrt(np.maximum(d2, 0.0))
    e = np.exp(-_SQRT5 * r)
    return signal * (1 + _SQRT5 * r + (5.0 / 3.0) * d2) * e, (-5.0 / 6.0) * signal * (1 + _SQRT5 * r) * e


def _inverse_from_cholesky(chol: np.ndarray) -> np.ndarray:
    """K^-1 from K's lower Cholesky factor (LAPACK potri: a third of the flops of two solves)."""
    inv, info = scipy.linalg.lapack.dpotri(chol, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"potri failed (info={info})")
    return np.tril(inv) + np.tril(inv, -1).T


class GaussianProcess:
    """An exact GP with a Matern-5/2 ARD kernel on inputs in [0, 1]^D, outputs already standardised.

    ``x``: (n, D) float64, ``y``: (n,) float64. ``raw``: log inverse squared lengthscales (D), log
    signal variance, log(noise - 1e-6) (ignored with ``deterministic``: the noise is 1e-6).
    ``mean_columns``: (D,) bool, the columns of the quadratic prior mean (module docstring); None:
    a zero prior mean. ``mean_coef``: its (c, b) fixed instead of estimated (fantasies keep them)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, raw: np.ndarray, *, deterministic: bool,
                 mean_columns: Optional[np.ndarray] = None, mean_coef: Optional[tuple] = None) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        self.y = np.ascontiguousarray(y, dtype=np.float64)
        self.deterministic = deterministic
        self.mean_columns = None if mean_columns is None else np.asarray(mean_columns, dtype=bool)
        self.set_params(raw, mean_coef)

    @staticmethod
    def unpack(raw: np.ndarray, deterministic: bool) -> tuple[np.ndarray, float, float]:
        d = raw.shape[0] - 2
        noise = _MIN_NOISE if deterministic else _MIN_NOISE + math.exp(raw[d + 1])
        return np.exp(raw[:d]), math.exp(raw[d]), noise

    @staticmethod
    def sq_diffs(x: np.ndarray) -> np.ndarray:
        """(x_i - x_j)^2 per column, flattened to (n*n, D): computed once per fit, so each likelihood
        evaluation's distances are one matrix-vector product with the inverse squared lengthscales."""
        return ((x[:, None, :] - x[None, :, :]) ** 2).reshape(-1, x.shape[1])

    @staticmethod
    def loss_and_grad(raw: np.ndarray, sqd: np.ndarray, y: np.ndarray,
                      deterministic: bool) -> tuple[float, np.ndarray]:
        """-(log marginal likelihood + log prior) of the kernel parameters ``raw`` and its gradient,
        in closed form (``sqd`` from ``sq_diffs`` of the inputs)."""
        d = raw.shape[0] - 2
        n = y.shape[0]
        a, s = np.exp(raw[:d]), math.exp(raw[d])
        noise = _MIN_NOISE if deterministic else _MIN_NOISE + math.exp(raw[d + 1])
        kf, dk_dd2 = _matern52((sqd @ a).reshape(n, n), s)
        k = kf.copy()
        k.flat[:: n + 1] += noise
        chol = scipy.linalg.cholesky(k, lower=True, check_finite=False)
        k_inv = _inverse_from_cholesky(chol)
        alpha = k_inv @ y
        # NLL = y' K^-1 y / 2 + log det K / 2 + n log sqrt(2 pi); log prior as in the module docstring.
        nll = 0.5 * float(y @ alpha) + float(np.log(np.diagonal(chol)).sum()) + n * _LOG_SQRT_2PI
        log_prior = -float((0.1 / a + 0.1 * a).sum()) + math.log(s) - s
        if not deterministic:
            log_prior += 0.1 * math.log(noise) - 30.0 * noise
        # dNLL/dK = (K^-1 - alpha alpha') / 2; each kernel entry depends on a through d2 = sqd @ a.
        w = 0.5 * (k_inv - np.outer(alpha, alpha))
        g_a = sqd.T @ (w * dk_dd2).reshape(-1)
        grad = np.empty_like(raw)
        # Chain rule through a = exp(raw): d/draw = a * d/da; prior terms enter with a minus sign.
        grad[:d] = (g_a - (0.1 / (a * a) - 0.1)) * a
        grad[d] = float((w * kf).sum()) - (1.0 - s)
        if deterministic:
            grad[d + 1] = 0.0
        else:
            grad[d + 1] = (float(np.trace(w)) - (0.1 / noise - 30.0)) * (noise - _MIN_NOISE)
        return nll - log_prior, grad

    def set_params(self, raw: np.ndarray, mean_coef: Optional[tuple] = None) -> None:
        self.raw = np.array(raw, dtype=np.float64)
        self.inv_sq_ls, self.signal, self.noise = self.unpack(self.raw, self.deterministic)
        n = self.x.shape[0]
        self.scale = np.sqrt(self.inv_sq_ls)
        self.xw = self.x * self.scale
        self.xw_sq = (self.xw * self.xw).sum(1)
        k = _matern52(self._scaled_d2(self.xw, self.xw_sq[:, None]), self.signal)[0]
        k.flat[:: n + 1] += self.noise
        chol = scipy.linalg.cholesky(k, lower=True, check_finite=False)
        self.mean_coef = self._estimate_mean(chol) if mean_coef is None else (float(mean_coef[0]), float(mean_coef[1]))
        self.alpha = scipy.linalg.cho_solve((chol, True), self.y - self.prior_mean(self.x), check_finite=False)
        # Prediction needs L^-1 k*: one matrix product with L^-1 (cached) is cheaper than a
        # triangular solve per call, and stable in float64 with the noise floor of 1e-6.
        self.chol_inv = scipy.linalg.solve_triangular(chol, np.eye(n), lower=True, check_finite=False)

    def _bowl(self, xs: np.ndarray) -> np.ndarray:
        """sum over the mean's columns of (x_d - 1/2)^2, per row of ``xs``."""
        return ((xs[:, self.mean_columns] - 0.5) ** 2).sum(1)

    def _estimate_mean(self, chol: np.ndarray) -> tuple[float, float]:
        """(c, b) of the prior mean by generalised least squares, beta = (H' K^-1 H)^-1 H' K^-1 y
        with H = [1, bowl(x)]: correlated (clustered) observations count less than spread ones.
        b < 0 (a mean falling towards the faces) or a singular system: b = 0 and c by GLS alone."""
        if self.mean_columns is None:
            return 0.0, 0.0
        n = self.x.shape[0]
        h = np.stack([np.ones(n), self._bowl(self.x)], 1)
        kh = scipy.linalg.cho_solve((chol, True), h, check_finite=False)
        gram, rhs = h.T @ kh, kh.T @ self.y
        if self.mean_columns.any() and abs(np.linalg.det(gram)) > 1e-12 * gram[0, 0] * gram[1, 1]:
            c, b = np.linalg.solve(gram, rhs)
            if b > 0 and math.isfinite(c) and math.isfinite(b):
                return float(c), float(b)
        return float(rhs[0] / gram[0, 0]), 0.0

    def prior_mean(self, xs: np.ndarray) -> np.ndarray:
        """The prior mean at the rows of ``xs``: c + b * bowl(x) (zero without ``mean_columns``)."""
        c, b = self.mean_coef
        return c + b * self._bowl(xs) if self.mean_columns is not None else np.zeros(xs.shape[0])

    def _scaled_d2(self, xsw: np.ndarray, xsw_sq: np.ndarray) -> np.ndarray:
        """Scaled squared distances (m x n) from lengthscale-scaled rows ``xsw`` (with their squared
        norms, m x 1) to the training inputs: |a|^2 + |b|^2 - 2 a.b, one matrix product, clamped
        against rounding below 0."""
        return np.maximum(xsw_sq + self.xw_sq - 2.0 * (xsw @ self.xw.T), 0.0)

    def condition_on(self, x_new: np.ndarray, y_new: np.ndarray) -> "GaussianProcess":
        """The same kernel with extra (fantasy) observations."""
        return GaussianProcess(np.concatenate([self.x, x_new]), np.concatenate([self.y, y_new]), self.raw,
                               deterministic=self.deterministic, mean_columns=self.mean_columns,
                               mean_coef=self.mean_coef)

    def posterior(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of the latent function at ``xs`` (m x D).

        In blocks of 256 rows: the m x n temporaries then stay in cache instead of being fresh
        megabyte allocations (3.5x faster for 2048 candidates at 100 trials)."""
        mean, var = np.empty(xs.shape[0]), np.empty(xs.shape[0])
        for i in range(0, xs.shape[0], 256):
            xsw = xs[i:i + 256] * self.scale
            ks = _matern52(self._scaled_d2(xsw, (xsw * xsw).sum(1, keepdims=True)), self.signal)[0]
            v = ks @ self.chol_inv.T
            mean[i:i + 256] = ks @ self.alpha + self.prior_mean(xs[i:i + 256])
            var[i:i + 256] = np.maximum(self.signal - (v * v).sum(1), 1e-12)
        return mean, var

    def log_ei(self, xs: np.ndarray, best: float) -> np.ndarray:
        """log EI at ``xs`` (m x D): the improvement below ``best`` (minimisation)."""
        mean, var = self.posterior(xs)
        return log_expected_improvement(mean, var, best)

    def log_ei_and_grad(self, xs: np.ndarray, best: float) -> tuple[np.ndarray, np.ndarray]:
        """log EI at ``xs`` (m x D) and its gradient with respect to ``xs``, in closed form.

        mean = k* alpha and var = s - k* K^-1 k*'; every k*_j depends on x through the scaled squared
        distance d2_j = sum_l a_l (x_l - X_jl)^2, so d/dx_l = 2 a_l sum_j w_j (x_l - X_jl), with
        w_j = (dlogEI/dmean alpha_j - 2 dlogEI/dvar (k* K^-1)_j) dk/d(d2_j)."""
        xsw = xs * self.scale
        ks, dk_dd2 = _matern52(self._scaled_d2(xsw, (xsw * xsw).sum(1, keepdims=True)), self.signal)
        mean = ks @ self.alpha + self.prior_mean(xs)
        v = ks @ self.chol_inv.T
        b = v @ self.chol_inv  # k* K^-1
        var_raw = self.signal - (v * v).sum(1)
        var = np.maximum(var_raw, 1e-12)
        sigma = np.sqrt(var)
        z = (best - mean) / sigma
        log_h, g = _log_h_and_slope(z)
        value = np.log(sigma) + log_h
        g_mean = -g / sigma
        # d logEI / d sigma = (1 - z g) / sigma; d sigma / d var = 1 / (2 sigma) (0 where clamped).
        g_var = np.where(var_raw > 1e-12, (1 - z * g) / (2 * var), 0.0)
        w = (g_mean[:, None] * self.alpha - 2 * g_var[:, None] * b) * dk_dd2
        grad = 2 * self.inv_sq_ls * (xs * w.sum(1, keepdims=True) - w @ self.x)
        if self.mean_columns is not None:  # the prior mean's slope: d/dx_d of b (x_d - 1/2)^2 on its columns
            grad[:, self.mean_columns] += g_mean[:, None] * (2 * self.mean_coef[1]) * (xs[:, self.mean_columns] - 0.5)
        return value, grad

    @classmethod
    def default_params(cls, dim: int) -> np.ndarray:
        """The cold start: lengthscales 1, signal variance 1, noise 1e-2 (raw, see the class doc)."""
        raw = np.zeros(dim + 2)
        raw[dim + 1] = math.log(1e-2)
        return raw

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, *, deterministic: bool, init: Optional[np.ndarray] = None,
            iterations: int = 200, mean_columns: Optional[np.ndarray] = None) -> "GaussianProcess":
        """Maximise the log posterior of the kernel parameters by L-BFGS-B (at most ``iterations``
        iterations, gradient tolerance 1e-2 as Optuna uses: tighter only chases rounding in the
        log determinant). From ``init`` (the previous fit) when given, from ``default_params``
        when that fails or none is given; the defaults themselves if both fail. The kernel is fitted
        with a zero mean; ``mean_columns`` (see the class) then adds the GLS prior mean given it."""
        x = np.ascontiguousarray(x, dtype=np.float64)
        y = np.ascontiguousarray(y, dtype=np.float64)
        d = x.shape[1]
        sqd = cls.sq_diffs(x)
        default = cls.default_params(d)
        starts = [default]
        if init is not None and np.shape(init) == default.shape and np.all(np.isfinite(init)):
            starts.insert(0, np.clip(np.asarray(init, dtype=np.float64), -_RAW_BOUND, _RAW_BOUND))
        bounds = [(-_RAW_BOUND, _RAW_BOUND)] * (d + 2)
        for start in starts:
            try:
                raw, loss, info = scipy.optimize.fmin_l_bfgs_b(
                    cls.loss_and_grad, start, args=(sqd, y, deterministic), bounds=bounds,
                    pgtol=1e-2, maxiter=max(1, iterations))
            except np.linalg.LinAlgError:
                continue
            if math.isfinite(loss) and np.all(np.isfinite(raw)):
                return cls(x, y, raw, deterministic=deterministic, mean_columns=mean_columns)
        return cls(x, y, default, deterministic=deterministic, mean_columns=mean_columns)


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


_blas_controller: Optional[ThreadpoolController] = None


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run a block with at most ``n`` BLAS threads (numpy's and scipy's OpenBLAS), restoring the
    previous counts afterwards; ``n <= 0`` leaves them alone. The GP's matrices are small (n trials
    squared): BLAS threads only add synchronisation, and on a busy machine their spinning makes a
    suggestion several times slower (figures in docs/tuning-gp-design.md)."""
    global _blas_controller
    if n <= 0:
        yield
        return
    if _blas_controller is None:  # scans the loaded libraries once per process (milliseconds)
        _blas_controller = ThreadpoolController()
    with _blas_controller.limit(limits=n, user_api="blas"):
        yield
