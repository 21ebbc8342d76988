"""`prv.gaussian_delta(eps, mu)`, the "true ε" of test_prv.py, against the closed form written out here and
against the hockey-stick divergence it stands for, integrated numerically."""
from __future__ import annotations

import math

import pytest
from scipy.integrate import quad
from scipy.stats import norm

from plait.plugins.flashdp.prv import gaussian_delta

MUS = (0.05, 0.3, 1.0, 2.0, 5.0)
EPSS = (0.0, 0.1, 0.5, 1.0, 2.0, 4.0, 8.0)


def _closed_form(eps: float, mu: float) -> float:
    # μ-GDP privacy curve (Balle & Wang 2018, Thm 8; Dong, Roth & Su, GDP Cor. 2.13)
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


def _hockey_stick(eps: float, mu: float) -> float:
    # δ(ε) = ∫ max(0, p(x) − e^ε q(x)) dx with p = N(μ, 1), q = N(0, 1): the integrand is positive exactly for
    # x > x0 = ε/μ + μ/2, where p(x)/q(x) = e^{μx − μ²/2} exceeds e^ε
    x0 = eps / mu + mu / 2
    val, _ = quad(lambda x: norm.pdf(x - mu) - math.exp(eps) * norm.pdf(x), x0, math.inf,
                  epsabs=1e-15, epsrel=1e-10)
    return val


@pytest.mark.parametrize("mu", MUS)
def test_gaussian_delta_equals_closed_form(mu):
    for eps in EPSS:
        ref = _closed_form(eps, mu)
        got = gaussian_delta(eps, mu)
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-300), (eps, mu)
        assert got == pytest.approx(_hockey_stick(eps, mu), rel=1e-6, abs=1e-15), (eps, mu)


def test_gaussian_delta_known_values():
    # ε = 0: δ is the total-variation distance of N(μ,1) and N(0,1), 2Φ(μ/2) − 1 = erf(μ/(2√2))
    for mu in MUS:
        assert gaussian_delta(0.0, mu) == pytest.approx(math.erf(mu / (2 * math.sqrt(2))), rel=1e-12)
    # argument order is (eps, mu): swapping them gives a different number
    assert gaussian_delta(1.0, 2.0) != pytest.approx(gaussian_delta(2.0, 1.0), rel=1e-3)
    # decreasing in ε, increasing in μ
    assert gaussian_delta(0.5, 1.0) > gaussian_delta(1.0, 1.0) and gaussian_delta(1.0, 2.0) > gaussian_delta(1.0, 1.0)
