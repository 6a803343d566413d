"""The Gaussian-process model behind ``GPSampler``: the kernel, the fit of its parameters, log
expected improvement. (Its inputs and outputs, encoded and warped: ``gp_data``.)

Float64 numpy/scipy throughout. The matrices are (trials x trials): at a hundred trials the cost is
per-call overhead, at a thousand the O(n^3) factorisations and the passes over n x n matrices, so
the likelihood needs no n x n x D array, and the factor is extended rather than recomputed where
the kernel parameters stay (``GaussianProcess(extends=...)``).

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
from typing import Iterator, Optional

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.special
from threadpoolctl import ThreadpoolController

# Re-exported: the sampler, the importance module and the tests take the whole model from here.
from .gp_data import _Encoder, sobol_points, standardise, standardise_or_centre, warp_outputs  # noqa: F401

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


def _matern52(d2: np.ndarray, signal: float) -> tuple[np.ndarray, np.ndarray]:
    """signal * (1 + sqrt5 r + 5/3 r^2) exp(-sqrt5 r) at scaled squared distances ``d2`` = r^2, and
    its derivative with respect to d2: -(5/6) signal (1 + sqrt5 r) exp(-sqrt5 r). In place on fresh
    temporaries: at a thousand trials each pass over the n x n matrices is a few milliseconds."""
    t = np.sqrt(d2)
    t *= _SQRT5
    e = np.exp(-t)
    t += 1.0
    t *= e  # (1 + sqrt5 r) e
    k = d2 * e
    k *= 5.0 / 3.0
    k += t
    k *= signal
    t *= -5.0 / 6.0 * signal
    return k, t


def _lower_inverse(chol: np.ndarray) -> np.ndarray:
    """L^-1 of a lower Cholesky factor (LAPACK trtri), zeros above the diagonal."""
    inv, info = scipy.linalg.lapack.dtrtri(chol, lower=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"trtri failed (info={info})")
    return inv


def _times_lower_t(a: np.ndarray, low: np.ndarray) -> np.ndarray:
    """a @ low.T for a lower-triangular ``low`` (BLAS trmm: reads only the triangle, half the work of
    a general product). ``low`` column-major, as LAPACK returns factors: any other layout is copied
    on every call."""
    return scipy.linalg.blas.dtrmm(1.0, low, a, side=1, lower=1, trans_a=1)


def _times_lower(a: np.ndarray, low: np.ndarray) -> np.ndarray:
    """a @ low for a lower-triangular, column-major ``low`` (BLAS trmm, as ``_times_lower_t``)."""
    return scipy.linalg.blas.dtrmm(1.0, low, a, side=1, lower=1, trans_a=0)


def _pair_sums(mv: np.ndarray, xc: np.ndarray) -> np.ndarray:
    """sum_ij M_ij (x_il - x_jl)^2 per column l, for a symmetric M given as mv = M @ [1, x]: expanding
    the square, 2 sum_i x_il^2 (M 1)_i - 2 sum_i x_il (M x)_il."""
    return 2.0 * (xc * xc * mv[:, :1]).sum(0) - 2.0 * (xc * mv[:, 1:]).sum(0)


class GaussianProcess:
    """An exact GP with a Matern-5/2 ARD kernel on inputs in [0, 1]^D, outputs already standardised.

    ``x``: (n, D) float64, ``y``: (n,) float64. ``raw``: log inverse squared lengthscales (D), log
    signal variance, log(noise - 1e-6) (ignored with ``deterministic``: the noise is 1e-6).
    ``mean_columns``: (D,) bool, the columns of the quadratic prior mean (module docstring); None:
    a zero prior mean. ``mean_coef``: its (c, b) fixed instead of estimated (fantasies keep them).
    ``extends``: a GP with the same kernel parameters whose inputs are the first rows of ``x``; its
    factor is extended by the new rows (O(n^2) per row) instead of refactorised (O(n^3))."""

    def __init__(self, x: np.ndarray, y: np.ndarray, raw: np.ndarray, *, deterministic: bool,
                 mean_columns: Optional[np.ndarray] = None, mean_coef: Optional[tuple] = None,
                 extends: Optional["GaussianProcess"] = None) -> None:
        self.x = np.ascontiguousarray(x, dtype=np.float64)
        self.y = np.ascontiguousarray(y, dtype=np.float64)
        self.deterministic = deterministic
        self.mean_columns = None if mean_columns is None else np.asarray(mean_columns, dtype=bool)
        self.raw = np.array(raw, dtype=np.float64)
        self.inv_sq_ls, self.signal, self.noise = self.unpack(self.raw, self.deterministic)
        self.scale = np.sqrt(self.inv_sq_ls)
        self.xw = self.x * self.scale
        self.xw_sq = (self.xw * self.xw).sum(1)
        # Prediction needs L^-1 k* (L the Cholesky factor of K): a product with the cached L^-1 is
        # cheaper than a triangular solve per call, and stable in float64 with the noise floor of
        # 1e-6. Solves with K are two products with it: K^-1 v = L^-T (L^-1 v). Column-major, for BLAS.
        self.chol_inv = self._extended_factor(extends) if self._extends(extends) else self._factor()
        self.mean_coef = self._estimate_mean() if mean_coef is None else (float(mean_coef[0]), float(mean_coef[1]))
        self.alpha = self.solve(self.y - self.prior_mean(self.x))

    @staticmethod
    def unpack(raw: np.ndarray, deterministic: bool) -> tuple[np.ndarray, float, float]:
        d = raw.shape[0] - 2
        noise = _MIN_NOISE if deterministic else _MIN_NOISE + math.exp(raw[d + 1])
        return np.exp(raw[:d]), math.exp(raw[d]), noise

    @staticmethod
    def loss_and_grad(raw: np.ndarray, x: np.ndarray, y: np.ndarray,
                      deterministic: bool) -> tuple[float, np.ndarray]:
        """-(log marginal likelihood + log prior) of the kernel parameters ``raw`` on inputs ``x``
        (n x D) and outputs ``y``, and its gradient, in closed form.

        No n x n x D array of per-column distances: every term of the gradient is a sum over pairs
        that reduces to products of n x n matrices with n x (D + 1) ones (``_pair_sums``), and the
        signal and noise terms to traces, so memory stays O(n^2) and each evaluation is one kernel
        matrix, one Cholesky factorisation and one inverse."""
        d = raw.shape[0] - 2
        n = y.shape[0]
        a, s = np.exp(raw[:d]), math.exp(raw[d])
        noise = _MIN_NOISE if deterministic else _MIN_NOISE + math.exp(raw[d + 1])
        # Centred inputs: the pair sums are differences of terms that grow with |x|^2.
        xc = x - 0.5
        xw = xc * np.sqrt(a)
        sq = (xw * xw).sum(1)
        k, dk_dd2 = _matern52(np.maximum(sq[:, None] + sq - 2.0 * (xw @ xw.T), 0.0), s)
        k.flat[:: n + 1] += noise
        chol = scipy.linalg.cholesky(k, lower=True, check_finite=False)
        # The lower triangle of K^-1; the upper stays zero (cholesky cleared it), so the symmetric
        # matrix is low + low' - diag(low).
        inv_low, info = scipy.linalg.lapack.dpotri(chol, lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"potri failed (info={info})")
        alpha = scipy.linalg.cho_solve((chol, True), y, check_finite=False)
        inv_diag = np.diagonal(inv_low).copy()
        y_alpha, alpha_sq, tr_inv = float(y @ alpha), float(alpha @ alpha), float(inv_diag.sum())
        # NLL = y' K^-1 y / 2 + log det K / 2 + n log sqrt(2 pi); log prior as in the module docstring.
        nll = 0.5 * y_alpha + float(np.log(np.diagonal(chol)).sum()) + n * _LOG_SQRT_2PI
        log_prior = -float((0.1 / a + 0.1 * a).sum()) + math.log(s) - s
        if not deterministic:
            log_prior += 0.1 * math.log(noise) - 30.0 * noise
        # dNLL/dK = W = (K^-1 - alpha alpha') / 2, and dK_ij/da_l = dk/dd2_ij (x_il - x_jl)^2, so
        # dNLL/da_l = sum_ij W_ij dk/dd2_ij (x_il - x_jl)^2: the K^-1 part and the alpha part separately.
        v = np.column_stack([np.ones(n), xc])
        q = inv_low * dk_dd2
        mv = q @ v + q.T @ v - (np.diagonal(q)[:, None] * v)
        # (diag(alpha) dK diag(alpha)) @ v = alpha * (dK @ (alpha * v)).
        av = alpha[:, None] * (dk_dd2 @ (alpha[:, None] * v))
        g_a = 0.5 * (_pair_sums(mv, xc) - _pair_sums(av, xc))
        grad = np.empty_like(raw)
        # Chain rule through a = exp(raw): d/draw = a * d/da; prior terms enter with a minus sign.
        grad[:d] = (g_a - (0.1 / (a * a) - 0.1)) * a
        # dK/draw_s = K - noise I: sum(W * (K - noise I)) = (n - y'alpha - noise (tr K^-1 - alpha'alpha)) / 2.
        tr_w = 0.5 * (tr_inv - alpha_sq)
        grad[d] = 0.5 * (n - y_alpha) - noise * tr_w - (1.0 - s)
        if deterministic:
            grad[d + 1] = 0.0
        else:
            grad[d + 1] = (tr_w - (0.1 / noise - 30.0)) * (noise - _MIN_NOISE)
        return nll - log_prior, grad

    def _extends(self, base: Optional["GaussianProcess"]) -> bool:
        """Whether ``base`` has this kernel and this GP's first inputs, so its factor can be extended."""
        if base is None or base.deterministic != self.deterministic or not np.array_equal(base.raw, self.raw):
            return False
        m = base.x.shape[0]
        return 0 < m <= self.x.shape[0] and np.array_equal(base.x, self.x[:m])

    def _kernel(self, xsw: np.ndarray, xsw_sq: np.ndarray) -> np.ndarray:
        """The kernel between lengthscale-scaled rows ``xsw`` (squared norms ``xsw_sq``, m x 1) and
        the training inputs (m x n), without the noise."""
        return _matern52(self._scaled_d2(xsw, xsw_sq), self.signal)[0]

    def _factor(self) -> np.ndarray:
        n = self.x.shape[0]
        k = self._kernel(self.xw, self.xw_sq[:, None])
        k.flat[:: n + 1] += self.noise
        return _lower_inverse(scipy.linalg.cholesky(k, lower=True, check_finite=False))

    def _extended_factor(self, base: "GaussianProcess") -> np.ndarray:
        """L^-1 of [[K11, K21'], [K21, K22]] from base's L11^-1: with B = K21 L11^-T and C the Cholesky
        factor of K22 - B B', L = [[L11, 0], [B, C]] and L^-1 = [[L11^-1, 0], [-C^-1 B L11^-1, C^-1]].
        A refactorisation when the Schur complement is not numerically positive definite."""
        m, n = base.x.shape[0], self.x.shape[0]
        if m == n:
            return base.chol_inv
        k = self._kernel(self.xw[m:], self.xw_sq[m:, None])
        new = np.arange(n - m)
        k[new, m + new] += self.noise
        b = _times_lower_t(k[:, :m], base.chol_inv)
        try:
            c_inv = _lower_inverse(scipy.linalg.cholesky(k[:, m:] - b @ b.T, lower=True, check_finite=False))
        except np.linalg.LinAlgError:
            return self._factor()
        out = np.zeros((n, n), order="F")
        out[:m, :m] = base.chol_inv
        out[m:, m:] = c_inv
        out[m:, :m] = -c_inv @ _times_lower(b, base.chol_inv)
        return out

    def solve(self, v: np.ndarray) -> np.ndarray:
        """K^-1 v (v: n or n x k) through the cached L^-1."""
        w = self.chol_inv @ v
        return self.chol_inv.T @ w

    def _bowl(self, xs: np.ndarray) -> np.ndarray:
        """sum over the mean's columns of (x_d - 1/2)^2, per row of ``xs``."""
        return ((xs[:, self.mean_columns] - 0.5) ** 2).sum(1)

    def _estimate_mean(self) -> tuple[float, float]:
        """(c, b) of the prior mean by generalised least squares, beta = (H' K^-1 H)^-1 H' K^-1 y
        with H = [1, bowl(x)]: correlated (clustered) observations count less than spread ones.
        b < 0 (a mean falling towards the faces) or a singular system: b = 0 and c by GLS alone."""
        if self.mean_columns is None:
            return 0.0, 0.0
        n = self.x.shape[0]
        h = np.stack([np.ones(n), self._bowl(self.x)], 1)
        kh = self.solve(h)
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
        """The same kernel with extra (fantasy) observations (this GP's factor, extended)."""
        return GaussianProcess(np.concatenate([self.x, x_new]), np.concatenate([self.y, y_new]), self.raw,
                               deterministic=self.deterministic, mean_columns=self.mean_columns,
                               mean_coef=self.mean_coef, extends=self)

    def posterior(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and variance of the latent function at ``xs`` (m x D).

        In blocks of 256 rows: the m x n temporaries then stay in cache instead of being fresh
        megabyte allocations (3.5x faster for 2048 candidates at 100 trials)."""
        mean, var = np.empty(xs.shape[0]), np.empty(xs.shape[0])
        for i in range(0, xs.shape[0], 256):
            xsw = xs[i:i + 256] * self.scale
            ks = self._kernel(xsw, (xsw * xsw).sum(1, keepdims=True))
            v = _times_lower_t(ks, self.chol_inv)
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
        v = _times_lower_t(ks, self.chol_inv)
        b = _times_lower(v, self.chol_inv)  # k* K^-1
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
        default = cls.default_params(d)
        starts = [default]
        if init is not None and np.shape(init) == default.shape and np.all(np.isfinite(init)):
            starts.insert(0, np.clip(np.asarray(init, dtype=np.float64), -_RAW_BOUND, _RAW_BOUND))
        bounds = [(-_RAW_BOUND, _RAW_BOUND)] * (d + 2)
        for start in starts:
            try:
                raw, loss, info = scipy.optimize.fmin_l_bfgs_b(
                    cls.loss_and_grad, start, args=(x, y, deterministic), bounds=bounds,
                    pgtol=1e-2, maxiter=max(1, iterations))
            except np.linalg.LinAlgError:
                continue
            if math.isfinite(loss) and np.all(np.isfinite(raw)):
                return cls(x, y, raw, deterministic=deterministic, mean_columns=mean_columns)
        return cls(x, y, default, deterministic=deterministic, mean_columns=mean_columns)


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
