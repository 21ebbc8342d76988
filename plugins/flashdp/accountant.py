"""Privacy accounting for DP-SGD: the facade callers import, and the noise search on top of both accountants.

Each DP-SGD step samples every example independently with probability ``q`` (Poisson sampling), clips the
per-example gradients to norm ``C`` and adds ``N(0, σ²C²)`` noise to their sum (``σ`` = noise multiplier).
The privacy cost of a run of such steps is tracked by one of two accountants, in modules whose imports point
one way (each imports only the ones above it)::

    history.py     StepHistory (the steps seen, state_dict), check_delta / check_sample_rate
    rdp.py         Rényi DP of the subsampled Gaussian, its (ε, δ) conversion, RDPAccountant  (numpy)
    prv.py         privacy loss random variables, compose_epsilon, PRVAccountant             (scipy)
    accountant.py  this facade: the history and RDP names re-exported, and get_noise_multiplier

The RDP names stay importable from here (``from .accountant import RDPAccountant, check_delta``), and this
module imports :mod:`.prv` only inside :func:`get_noise_multiplier` when ``accountant="prv"``, so the RDP
path needs no more than the standard library and numpy (no scipy, no opacus, no torch).

Noise search (:func:`get_noise_multiplier`) follows ``opacus.accountants.utils.get_noise_multiplier``:
``σ_low = 0``, ``σ_high = 10``; double ``σ_high`` (before the first evaluation as well, as Opacus does) until
``ε(σ_high) < target``; then bisect until ``target − ε(σ_high) ≤ epsilon_tolerance`` and return ``σ_high``
(so the returned σ always satisfies ``ε(σ) ≤ target``). It therefore reproduces Opacus' values, e.g.
σ = 1.416015625 for ε = 8, δ = 1e-5, q = 0.04, 2250 steps.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .history import StepHistory, _check_steps, check_delta, check_sample_rate
from .rdp import (
    CONVERSIONS,
    DEFAULT_ALPHAS,
    RDPAccountant,
    _check_conversion,
    compute_rdp,
    get_privacy_spent,
    rdp_sampled_gaussian,
)

__all__ = [
    "CONVERSIONS",
    "DEFAULT_ALPHAS",
    "MAX_SIGMA",
    "RDPAccountant",
    "StepHistory",
    "check_delta",
    "check_sample_rate",
    "compute_rdp",
    "get_noise_multiplier",
    "get_privacy_spent",
    "rdp_sampled_gaussian",
]

MAX_SIGMA = 1e6


# ----------------------------------------------------------------------------------------------- σ search
def _epsilon(sigma: float, q: float, steps: int, delta: float, conversion: str,
             alphas: Sequence[float], accountant: str = "rdp") -> float:
    if accountant == "prv":
        from .prv import compose_epsilon

        return compose_epsilon([(sigma, q, steps)], delta)[2]
    return get_privacy_spent(alphas, compute_rdp(q, sigma, steps, alphas), delta, conversion)[0]


def get_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         epsilon_tolerance: float = 0.01, conversion: str = "opacus",
                         alphas: Sequence[float] | None = None, accountant: str = "rdp") -> float:
    """Smallest σ (up to the bisection tolerance) whose ε after ``steps`` steps at rate ``sample_rate`` is at
    most ``target_epsilon``; Opacus' search (see the module docstring). Raises ValueError if it is unreachable.
    ``accountant="prv"`` measures ε with :mod:`.prv` (its upper bound) instead of RDP."""
    _check_conversion(conversion)
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant {accountant!r}; allowed: rdp, prv")
    delta = check_delta(delta)
    q = check_sample_rate(sample_rate)
    steps = _check_steps(steps)
    target = float(target_epsilon)
    if not (target > 0.0) or math.isinf(target):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be a finite number > 0")
    if not (epsilon_tolerance > 0.0):
        raise ValueError(f"epsilon_tolerance={epsilon_tolerance!r} must be > 0")
    orders = list(DEFAULT_ALPHAS) if alphas is None else list(alphas)
    if steps == 0:
        return 0.0
    sigma_low, sigma_high = 0.0, 10.0
    eps_high = math.inf
    while eps_high > target:
        sigma_high *= 2.0
        if sigma_high > MAX_SIGMA:
            raise ValueError(
                f"target_epsilon={target:g} is unreachable for delta={delta:g}, sample_rate={q:g}, steps={steps}: "
                f"sigma would exceed {MAX_SIGMA:g} (eps at sigma={sigma_high / 2:g} is {eps_high:.4g})")
        eps_high = _epsilon(sigma_high, q, steps, delta, conversion, orders, accountant)
    while target - eps_high > epsilon_tolerance:
        sigma = (sigma_low + sigma_high) / 2.0
        eps = _epsilon(sigma, q, steps, delta, conversion, orders, accountant)
        if eps < target:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
