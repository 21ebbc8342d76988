"""RDP accountant for the subsampled Gaussian mechanism, against published and independent numbers.

References: Opacus `opacus/tests/accountants_test.py` (ε = 7.32911117143; σ for ε = 8 → 1.416 / 1.3562),
TF-Privacy `tutorials/README.md` (MNIST table), and a direct numerical integration of the Rényi divergence
(the definition A_α = E_{z~N(0,σ²)}[(μ(z)/μ0(z))^α] of Mironov et al. 2019), plus the closed form at q = 1.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from plait.plugins.flashdp.accountant import (
    DEFAULT_ALPHAS,
    RDPAccountant,
    check_delta,
    check_sample_rate,
    compute_rdp,
    get_noise_multiplier,
    get_privacy_spent,
    rdp_sampled_gaussian,
)

MODULE = Path(__file__).resolve().parents[3] / "plugins" / "flashdp" / "accountant.py"
DELTA = 1e-5


def eps_of(sigma: float, q: float, steps: int, delta: float = DELTA, conversion: str = "opacus") -> float:
    acc = RDPAccountant()
    acc.step(sigma, q, steps)
    return acc.get_epsilon(delta, conversion=conversion)


# ------------------------------------------------------------------------------------------ published values
def test_default_alphas_are_opacus():
    assert len(DEFAULT_ALPHAS) == 99 + 52
    assert DEFAULT_ALPHAS[0] == 1.1 and DEFAULT_ALPHAS[98] == 10.9 and DEFAULT_ALPHAS[99] == 12
    assert DEFAULT_ALPHAS[-1] == 63


def test_opacus_rdp_accountant_reference():
    # opacus/tests/accountants_test.py::test_rdp_accountant (assertAlmostEqual, 7 places)
    steps = int(90 / 0.04)
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=1.5, sample_rate=0.04)
    assert len(acc) == 2250 and acc.history == [[1.5, 0.04, 2250]]
    eps = acc.get_epsilon(delta=DELTA)
    assert round(eps - 7.32911117143, 7) == 0
    eps2, alpha = acc.get_privacy_spent(DELTA)
    assert eps2 == eps and alpha in DEFAULT_ALPHAS


@pytest.mark.parametrize("steps, expected", [(int(90 / 0.04), 1.416), (2000, 1.3562)])
def test_opacus_noise_multiplier_reference(steps, expected):
    # opacus/tests/accountants_test.py::test_get_noise_multiplier_rdp_{epochs,steps} (4 places)
    sigma = get_noise_multiplier(target_epsilon=8.0, delta=DELTA, sample_rate=0.04, steps=steps,
                                 epsilon_tolerance=0.01)
    assert round(sigma - expected, 4) == 0
    eps = eps_of(sigma, 0.04, steps)
    assert eps <= 8.0 and 8.0 - eps <= 0.01


MNIST_Q = 256 / 60000


@pytest.mark.parametrize("sigma, steps, classic, published", [
    (1.12, math.ceil(1 * 60000 / 256), 1.0005, 1.00),    # epoch 1
    (1.12, math.ceil(2 * 60000 / 256), 1.0414, 1.04),    # epoch 2
    (1.12, math.ceil(60 * 60000 / 256), 2.9223, 2.92),   # 60 epochs
    (0.6, 7031, 9.7527, 9.74),                            # 30 epochs
    (1.2, 2343, 1.1982, 1.20),                            # 10 epochs
])
def test_tf_privacy_mnist_classic(sigma, steps, classic, published):
    eps = eps_of(sigma, MNIST_Q, steps, conversion="classic")
    assert round(eps - classic, 4) == 0
    # TF-Privacy's README used its own order list; its published values agree to ~0.01
    assert abs(eps - published) < 0.015


@pytest.mark.parametrize("steps, expected", [(235, 0.7067), (469, 0.7476), (14063, 2.5187)])
def test_tf_privacy_mnist_opacus_conversion(steps, expected):
    assert round(eps_of(1.12, MNIST_Q, steps) - expected, 4) == 0


# ------------------------------------------------------------------------------------------ independent maths
@pytest.mark.parametrize("sigma", [0.5, 1.0, 1.7, 10.0])
@pytest.mark.parametrize("alpha", [1.1, 1.5, 2, 3, 7.25, 12, 63])
def test_no_subsampling_is_plain_gaussian(sigma, alpha):
    assert rdp_sampled_gaussian(1.0, sigma, alpha) == alpha / (2 * sigma**2)
    np.testing.assert_allclose(compute_rdp(1.0, sigma, 7, [alpha]), [7 * alpha / (2 * sigma**2)], rtol=1e-15)
    # the general formulas tend to it as q -> 1
    assert rdp_sampled_gaussian(1 - 1e-9, sigma, alpha) == pytest.approx(alpha / (2 * sigma**2), rel=1e-7)


def rdp_by_integration(q: float, sigma: float, alpha: float, n: int = 400_001) -> float:
    """log(∫ N(x;0,σ²)^(1-α) ((1-q)N(x;0,σ²) + qN(x;1,σ²))^α dx) / (α-1) by the trapezoid rule in log space."""
    x = np.linspace(-20 * sigma, alpha + 20 * sigma + 1, n)
    log_ratio = np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * sigma**2))   # log μ/μ0
    log_f = -x * x / (2 * sigma**2) - 0.5 * math.log(2 * math.pi * sigma**2) + alpha * log_ratio
    m = log_f.max()
    return (m + math.log(np.trapezoid(np.exp(log_f - m), x))) / (alpha - 1)


@pytest.mark.parametrize("q, sigma, alpha", [
    (0.04, 1.5, 2), (0.04, 1.5, 63), (0.01, 0.7, 5), (0.3, 2.0, 32), (0.9, 1.0, 3), (0.5, 5.0, 63),   # integer
    (0.04, 1.5, 1.5), (0.01, 0.7, 7.3), (0.3, 2.0, 12.7), (0.9, 1.0, 2.2), (1e-3, 0.5, 1.1),        # fractional
])
def test_matches_numerical_integration(q, sigma, alpha):
    assert rdp_sampled_gaussian(q, sigma, alpha) == pytest.approx(rdp_by_integration(q, sigma, alpha), rel=1e-6)


@pytest.mark.parametrize("alpha", [2, 3, 10, 40])
def test_fractional_series_continuous_at_integers(alpha):
    # the two-series formula (fractional α) must agree with the binomial expansion (integer α) at its limit
    for q, sigma in [(0.04, 1.5), (0.3, 1.3), (0.01, 0.8)]:
        exact = rdp_sampled_gaussian(q, sigma, alpha)
        assert rdp_sampled_gaussian(q, sigma, alpha + 1e-9) == pytest.approx(exact, rel=1e-6, abs=1e-12)
        assert rdp_sampled_gaussian(q, sigma, alpha - 1e-9) == pytest.approx(exact, rel=1e-6, abs=1e-12)


def test_special_cases():
    assert rdp_sampled_gaussian(0.0, 1.0, 3) == 0.0
    assert rdp_sampled_gaussian(0.3, 0.0, 3) == math.inf
    assert rdp_sampled_gaussian(0.3, 1.0, math.inf) == math.inf
    assert rdp_sampled_gaussian(0.3, 1.0, 2.0) == rdp_sampled_gaussian(0.3, 1.0, 2)   # float order → integer path
    # q=0.04, α=2: A = (1-q)² + 2q(1-q) + q² e^(1/σ²) = 1 + q²(e^(1/σ²) - 1)
    assert rdp_sampled_gaussian(0.04, 1.5, 2) == pytest.approx(math.log1p(0.04**2 * math.expm1(1 / 1.5**2)), rel=1e-13)
    assert np.all(compute_rdp(0.04, 1.5, 0, DEFAULT_ALPHAS) == 0)
    assert eps_of(0.0, 0.04, 10) == math.inf
    assert RDPAccountant().get_epsilon(DELTA) == 0.0


def test_conversions_by_hand():
    orders, rdp = [2.0, 3.0, 10.0], [1.0, 2.0, 9.0]
    classic = [r + math.log(1 / DELTA) / (a - 1) for a, r in zip(orders, rdp)]
    balle = [r - (math.log(DELTA) + math.log(a)) / (a - 1) + math.log((a - 1) / a) for a, r in zip(orders, rdp)]
    assert get_privacy_spent(orders, rdp, DELTA, "classic") == (pytest.approx(min(classic)), 3.0)
    assert get_privacy_spent(orders, rdp, DELTA, "opacus") == (pytest.approx(min(balle)), 3.0)
    rdp_big = compute_rdp(0.04, 1.5, 2250, DEFAULT_ALPHAS)
    assert get_privacy_spent(DEFAULT_ALPHAS, rdp_big, DELTA)[0] < get_privacy_spent(DEFAULT_ALPHAS, rdp_big, DELTA,
                                                                                    "classic")[0]
    assert get_privacy_spent([2.0, 3.0], [math.inf, math.inf], DELTA)[0] == math.inf


# ------------------------------------------------------------------------------------------ monotonicity
def test_monotone_in_sigma_q_steps():
    by_sigma = [eps_of(s, 0.01, 1000) for s in (0.6, 0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    by_q = [eps_of(1.0, q, 1000) for q in (0.001, 0.005, 0.01, 0.05, 0.2)]
    assert all(a < b for a, b in zip(by_q, by_q[1:]))
    by_steps = [eps_of(1.0, 0.01, t) for t in (1, 10, 100, 1000, 10000)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:]))
    rdp = [rdp_sampled_gaussian(0.05, 1.2, a) for a in DEFAULT_ALPHAS]            # RDP grows with the order
    assert all(a <= b for a, b in zip(rdp, rdp[1:]))


# ------------------------------------------------------------------------------------------ accountant object
def test_history_merge_and_len():
    acc = RDPAccountant()
    acc.step(1.0, 0.01)
    acc.step(1.0, 0.01, num_steps=4)
    acc.step(1.2, 0.01, num_steps=3)
    acc.step(1.0, 0.01)
    acc.step(1.0, 0.01, num_steps=0)
    assert acc.history == [[1.0, 0.01, 5], [1.2, 0.01, 3], [1.0, 0.01, 1]]
    assert len(acc) == 9
    total = compute_rdp(0.01, 1.0, 6, DEFAULT_ALPHAS) + compute_rdp(0.01, 1.2, 3, DEFAULT_ALPHAS)
    assert acc.get_epsilon(DELTA) == pytest.approx(get_privacy_spent(DEFAULT_ALPHAS, total, DELTA)[0], rel=1e-12)


def test_state_dict_round_trip():
    acc = RDPAccountant()
    acc.step(1.1, 0.02, 100)
    acc.step(0.9, 0.02, 50)
    state = json.loads(json.dumps(acc.state_dict()))
    other = RDPAccountant()
    other.load_state_dict(state)
    assert other.history == acc.history and len(other) == 150
    assert other.get_epsilon(DELTA) == acc.get_epsilon(DELTA)
    other.step(0.9, 0.02)                      # keeps merging after a reload
    assert other.history[-1] == [0.9, 0.02, 51]
    with pytest.raises(ValueError):
        other.load_state_dict({"history": [[1.0, 1.5, 3]]})
    with pytest.raises(ValueError):
        other.load_state_dict({"steps": 3})


# ------------------------------------------------------------------------------------------ errors
def test_noise_multiplier_unreachable():
    with pytest.raises(ValueError, match=r"target_epsilon=0.05 is unreachable.*sigma would exceed 1e\+06"):
        get_noise_multiplier(0.05, DELTA, 0.04, 2250)
    with pytest.raises(ValueError, match="target_epsilon"):
        get_noise_multiplier(0.0, DELTA, 0.04, 2250)
    with pytest.raises(ValueError, match="target_epsilon"):
        get_noise_multiplier(-1.0, DELTA, 0.04, 2250)


def test_delta_and_sample_rate_checks():
    assert check_delta(1e-5, 60000) == 1e-5
    with pytest.raises(ValueError, match=r"privacy.delta=0.001 must be < 1/N = 0.0001 \(N=10000"):
        check_delta(1e-3, 10000)
    with pytest.raises(ValueError, match="privacy.delta"):
        check_delta(1e-4, 10000)                 # δ = 1/N is not allowed either
    for bad in (0.0, 1.0, -1e-5, float("nan")):
        with pytest.raises(ValueError, match="privacy.delta"):
            check_delta(bad)
    assert check_sample_rate(1.0) == 1.0
    for bad in (0.0, -0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="sample rate"):
            check_sample_rate(bad)
        with pytest.raises(ValueError, match="sample rate"):
            RDPAccountant().step(1.0, bad)
        with pytest.raises(ValueError, match="sample rate"):
            get_noise_multiplier(8.0, DELTA, bad, 100)
    with pytest.raises(ValueError):
        RDPAccountant().step(-1.0, 0.1)
    with pytest.raises(ValueError):
        RDPAccountant().step(1.0, 0.1, num_steps=-2)
    with pytest.raises(ValueError):
        RDPAccountant().get_epsilon(1.0)
    with pytest.raises(ValueError, match="conversion"):
        RDPAccountant().get_epsilon(DELTA, conversion="tf")


def test_module_imports_standalone_without_scipy_or_opacus():
    # the accountant facade and the modules it imports (history, rdp), loaded as a bare package: not plait's
    # __init__ (pluggy), not the plugin's (hooks), and not prv (scipy), which it imports only for accountant="prv"
    code = (
        "import importlib, sys, types\n"
        f"pkg = types.ModuleType('acct'); pkg.__path__ = [{str(MODULE.parent)!r}]; sys.modules['acct'] = pkg\n"
        "m = importlib.import_module('acct.accountant')\n"
        "assert not {'scipy', 'opacus', 'torch', 'plait', 'acct.prv'} & set(sys.modules), sorted(sys.modules)\n"
        "a = m.RDPAccountant(); a.step(1.5, 0.04, 2250); print(round(a.get_epsilon(1e-5), 7))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "7.3291112"
