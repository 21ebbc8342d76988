"""Rényi DP of the Poisson-subsampled Gaussian mechanism: one step's RDP, its composition, the conversion
to (ε, δ), and the running :class:`RDPAccountant`.

Each DP-SGD step samples every example independently with probability ``q`` (Poisson sampling), clips the
per-example gradients to norm ``C`` and adds ``N(0, σ²C²)`` noise to their sum (``σ`` = noise multiplier).
This module tracks the privacy cost of a run of such steps with Rényi differential privacy (RDP) and converts
it to an ``(ε, δ)`` guarantee (the σ search is in :mod:`.accountant`). Only the standard library, numpy and
:mod:`.history` are used (no scipy, no opacus, no torch).

RDP of one step (Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
arXiv:1908.10530).  With ``μ0 = N(0, σ²)``, ``μ1 = N(1, σ²)`` and ``μ = (1−q)μ0 + qμ1``, the RDP at order α is
``RDP(α) = log(A_α) / (α−1)`` with ``A_α = E_{z~μ0}[(μ(z)/μ0(z))^α]``:

* integer α (binomial expansion, summed in log space)::

      A_α = Σ_{k=0..α} C(α,k) (1−q)^(α−k) q^k exp((k²−k) / (2σ²))

* fractional α (two series; ``z0 = σ² log(1/q − 1) + 1/2``; ``C(α,i)`` is the generalised binomial
  coefficient, whose sign alternates once ``i > α``)::

      A_α = Σ_{i≥0} C(α,i) q^i (1−q)^(α−i) exp((i²−i)/(2σ²)) · erfc((i−z0)/(√2 σ)) / 2
          + Σ_{i≥0} C(α,i) q^(α−i) (1−q)^i exp(((α−i)²−(α−i))/(2σ²)) · erfc((z0−(α−i))/(√2 σ)) / 2

  The positive and negative terms are accumulated separately in log space; the series is cut once ``i > α``
  and the newest terms are below ``e^-30`` (``A_α ≥ 1``, so that is a relative cut; the tail alternates, so
  the error is below the first dropped term).

* special cases: ``q = 0`` → 0; ``q = 1`` → ``α / (2σ²)`` (plain Gaussian mechanism); ``σ = 0`` → ∞.

Composition: RDP adds up over steps (``T`` identical steps cost ``T · RDP(α)``).

Conversion to (ε, δ) (minimised over the orders):

* ``"classic"`` (Mironov 2017, Prop. 3; TF-Privacy's historical formula)::

      ε = min_α  RDP(α) + log(1/δ) / (α−1)

* ``"opacus"`` (Balle et al. 2020, "Hypothesis Testing Interpretations and Rényi Differential Privacy",
  arXiv:1905.09982, Thm 21; what ``opacus.accountants.analysis.rdp.get_privacy_spent`` uses)::

      ε = min_α  RDP(α) − (log δ + log α) / (α−1) + log((α−1)/α)

Default orders are Opacus' ``RDPAccountant.DEFAULT_ALPHAS``: ``[1 + x/10 for x in 1..99] + [12..63]``.

Reference values reproduced by ``tests/plugins/flashdp/test_accountant.py``: Opacus'
``accountants_test.py`` (q = 0.04, σ = 1.5, 2250 steps, δ = 1e-5 → ε = 7.32911117143) and the TF-Privacy MNIST
tutorial table (q = 256/60000, σ = 1.12, 60 epochs → ε = 2.92 classic).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np

from .history import StepHistory, _check_sigma, _check_steps, check_delta

__all__ = [
    "CONVERSIONS",
    "DEFAULT_ALPHAS",
    "RDPAccountant",
    "compute_rdp",
    "get_privacy_spent",
    "rdp_sampled_gaussian",
]

DEFAULT_ALPHAS: list[float] = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
CONVERSIONS = ("opacus", "classic")
_LOG_CUTOFF = -30.0          # stop a fractional-order series once its newest terms are below e^-30 (A_α ≥ 1)
_MAX_SERIES_TERMS = 10_000_000


def _check_conversion(conversion: str) -> str:
    if conversion not in CONVERSIONS:
        raise ValueError(f"conversion={conversion!r} must be one of {CONVERSIONS}")
    return conversion



# ----------------------------------------------------------------------------------------------- log maths
def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi, lo = (a, b) if a >= b else (b, a)
    return hi + math.log1p(math.exp(lo - hi))


def _log_erfc(x: float) -> float:
    """log(erfc(x)) for any real x, without underflow for large x."""
    if x < 20.0:
        return math.log(math.erfc(x))
    # erfc(x) = exp(-x²)/(x√π) · Σ_k (-1)^k (2k-1)!! / (2x²)^k; at x ≥ 20 eight terms reach 1e-17.
    inv = 1.0 / (2.0 * x * x)
    term, total = 1.0, 1.0
    for k in range(1, 10):
        term *= -(2 * k - 1) * inv
        total += term
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(total)


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_α for integer α ≥ 2 by the binomial expansion (all terms positive)."""
    log_q, log_1mq = math.log(q), math.log1p(-q)
    two_s2 = 2.0 * sigma * sigma
    log_a = -math.inf
    for k in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        log_a = _logaddexp(log_a, log_binom + k * log_q + (alpha - k) * log_1mq + (k * k - k) / two_s2)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """log A_α for fractional α > 1 by the two series of Mironov et al. (2019), Sec. 3.3."""
    log_q, log_1mq = math.log(q), math.log1p(-q)
    two_s2 = 2.0 * sigma * sigma
    rt2s = math.sqrt(2.0) * sigma
    z0 = sigma * sigma * (math.log(1.0 - q) - log_q) + 0.5
    log_half = math.log(0.5)
    pos, neg = -math.inf, -math.inf        # log of the sums of positive / negative terms
    log_abs_c, sign = 0.0, 1.0             # generalised binomial C(α, i), built by C(α,i) = C(α,i-1)(α-i+1)/i
    i = 0
    while True:
        if i > 0:
            factor = (alpha - i + 1) / i
            if factor == 0.0:          # cannot happen for fractional α, but keeps log() safe
                break
            log_abs_c += math.log(abs(factor))
            if factor < 0:
                sign = -sign
        j = alpha - i
        s1 = (log_abs_c + i * log_q + j * log_1mq + (i * i - i) / two_s2
              + log_half + _log_erfc((i - z0) / rt2s))
        s2 = (log_abs_c + j * log_q + i * log_1mq + (j * j - j) / two_s2
              + log_half + _log_erfc((z0 - j) / rt2s))
        term = _logaddexp(s1, s2)
        if sign > 0:
            pos = _logaddexp(pos, term)
        else:
            neg = _logaddexp(neg, term)
        i += 1
        if i > alpha + 1 and term < _LOG_CUTOFF:
            break
        if i > _MAX_SERIES_TERMS:
            raise RuntimeError(f"RDP series for q={q}, sigma={sigma}, alpha={alpha} did not converge")
    if neg == -math.inf:
        return pos
    return pos + math.log1p(-math.exp(neg - pos))


def rdp_sampled_gaussian(q: float, sigma: float, alpha: float) -> float:
    """RDP at order ``alpha`` (> 1) of one step of the Poisson-subsampled Gaussian mechanism with sampling rate
    ``q`` and noise multiplier ``sigma`` (sensitivity 1, noise std ``sigma``)."""
    q = float(q)
    if not (0.0 <= q <= 1.0):
        raise ValueError(f"sample rate q={q!r} must be in [0, 1]")
    sigma = _check_sigma(sigma)
    alpha = float(alpha)
    if not alpha > 1.0:
        raise ValueError(f"RDP order alpha={alpha!r} must be > 1")
    if q == 0.0:
        return 0.0
    if sigma == 0.0:
        return math.inf
    if math.isinf(alpha):
        return math.inf
    if q == 1.0:
        return alpha / (2.0 * sigma * sigma)
    if alpha.is_integer():
        log_a = _log_a_int(q, sigma, int(alpha))
    else:
        log_a = _log_a_frac(q, sigma, alpha)
    return max(log_a, 0.0) / (alpha - 1.0)   # A_α ≥ 1 in exact arithmetic; clamp rounding below zero


def compute_rdp(q: float, noise_multiplier: float, steps: int, orders: float | Sequence[float]) -> np.ndarray:
    """RDP at each of ``orders`` of ``steps`` compositions of the subsampled Gaussian mechanism (an array the
    shape of ``np.atleast_1d(orders)``)."""
    steps = _check_steps(steps)
    orders_arr = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    rdp = _one_step_rdp(float(q), float(noise_multiplier), tuple(orders_arr.tolist()))
    if steps == 0:
        return np.zeros_like(rdp)
    return rdp * steps


@functools.lru_cache(maxsize=256)
def _one_step_rdp(q: float, sigma: float, orders: tuple) -> np.ndarray:
    """One step's RDP per order, cached: a run reads ε every step with the same (q, σ), and RDP composes
    linearly in the number of steps, so the series are evaluated once per (q, σ)."""
    rdp = np.array([rdp_sampled_gaussian(q, sigma, a) for a in orders], dtype=np.float64)
    rdp.setflags(write=False)
    return rdp


# ----------------------------------------------------------------------------------------------- conversion
def get_privacy_spent(orders: float | Sequence[float], rdp: float | Sequence[float], delta: float,
                      conversion: str = "opacus") -> tuple[float, float]:
    """Convert RDP values (one per order) to ``(ε, best_α)`` at ``delta``; see the module docstring for the
    two conversions. Returns ``(inf, nan)`` when no order gives a finite ε."""
    _check_conversion(conversion)
    delta = check_delta(delta)
    a = np.atleast_1d(np.asarray(orders, dtype=np.float64))
    r = np.atleast_1d(np.asarray(rdp, dtype=np.float64))
    if a.shape != r.shape:
        raise ValueError(f"orders ({a.shape}) and rdp ({r.shape}) must have the same length")
    if np.any(a <= 1.0):
        raise ValueError("RDP orders must all be > 1")
    with np.errstate(invalid="ignore", over="ignore"):
        if conversion == "classic":
            eps = r + math.log(1.0 / delta) / (a - 1.0)
        else:
            eps = r - (math.log(delta) + np.log(a)) / (a - 1.0) + np.log((a - 1.0) / a)
    eps = np.where(np.isnan(eps), np.inf, eps)
    if not np.isfinite(eps).any():
        return math.inf, math.nan
    idx = int(np.argmin(eps))
    return float(eps[idx]), float(a[idx])



# ----------------------------------------------------------------------------------------------- accountant
class RDPAccountant(StepHistory):
    """Running RDP accountant: record steps with :meth:`step`, read ε with :meth:`get_epsilon`."""

    DEFAULT_ALPHAS = DEFAULT_ALPHAS
    mechanism = "rdp"

    def __init__(self, alphas: Sequence[float] | None = None):
        super().__init__()
        self.alphas = list(alphas) if alphas is not None else list(DEFAULT_ALPHAS)

    def get_rdp(self, alphas: Sequence[float] | None = None) -> np.ndarray:
        orders = self.alphas if alphas is None else list(alphas)
        total = np.zeros(len(orders), dtype=np.float64)
        for sigma, q, n in self.history:
            total = total + compute_rdp(q, sigma, n, orders)
        return total

    def get_privacy_spent(self, delta: float, conversion: str = "opacus",
                          alphas: Sequence[float] | None = None) -> tuple[float, float]:
        """``(ε, best_α)`` spent so far at ``delta``; ``(0.0, nan)`` before any step."""
        check_delta(delta)
        _check_conversion(conversion)
        if not self.history:
            return 0.0, math.nan
        orders = self.alphas if alphas is None else list(alphas)
        return get_privacy_spent(orders, self.get_rdp(orders), delta, conversion)

    def get_epsilon(self, delta: float, conversion: str = "opacus", alphas: Sequence[float] | None = None) -> float:
        return self.get_privacy_spent(delta, conversion, alphas)[0]

    def state_dict(self) -> dict:
        return self._history_state()
