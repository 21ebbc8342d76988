"""PRV accountant against the closed-form Gaussian privacy curve, Opacus' PRVAccountant and the RDP bound."""
from __future__ import annotations

import json
import math

import pytest
from scipy.optimize import brentq

from plait.config import load_config
from plait.plugins.flashdp.accountant import RDPAccountant, get_noise_multiplier
from plait.plugins.flashdp.prv import PRVAccountant, compose_epsilon, gaussian_delta, prv_cdf, prv_mean
from plait.run import execute

DELTA = 1e-5


def _gaussian_eps(mu: float, delta: float) -> float:
    return brentq(lambda e: gaussian_delta(e, mu) - delta, 0.0, 100.0, xtol=1e-12)


@pytest.mark.parametrize("sigma,steps", [(5.0, 10), (1.0, 1), (2.0, 300)])
def test_no_subsampling_matches_closed_form_gaussian_curve(sigma, steps):
    # q = 1: N steps of the Gaussian mechanism are one Gaussian mechanism with μ = √N/σ (Balle & Wang 2018)
    true = _gaussian_eps(math.sqrt(steps) / sigma, DELTA)
    est, lo, up = compose_epsilon([(sigma, 1.0, steps)], DELTA)
    assert lo <= true <= up
    assert abs(est - true) < 2e-3


def test_cdf_and_mean_against_monte_carlo():
    # independent oracle: sample X ~ (1−q)N(0,σ²) + qN(1,σ²) and evaluate the privacy loss directly
    import numpy as np

    q, sigma = 0.1, 0.8
    rng = np.random.default_rng(0)
    n = 2_000_000
    x = rng.normal(size=n) * sigma + (rng.random(n) < q)
    y = np.logaddexp(math.log1p(-q), math.log(q) + (2 * x - 1) / (2 * sigma**2))
    assert prv_mean(q, sigma) == pytest.approx(y.mean(), abs=4 * y.std() / math.sqrt(n))
    for t in (-0.05, 0.0, 0.3, 1.0):
        p = float((y <= t).mean())
        assert prv_cdf(np.array([t]), q, sigma)[0] == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n) + 1e-6)
        assert prv_cdf(np.array([t]), q, sigma, upper=True)[0] == pytest.approx(1 - p, abs=4e-3)


@pytest.mark.slow
@pytest.mark.parametrize("phases", [[(1.5, 0.04, 2250)], [(1.1, 0.01, 500), (2.0, 0.05, 300)]])
def test_matches_opacus_prv_accountant(phases):
    from opacus.accountants import PRVAccountant as OpacusPRV

    ours, theirs = PRVAccountant(), OpacusPRV()
    for sigma, q, n in phases:
        ours.step(sigma, q, n)
        theirs.history.append((sigma, q, n))
    assert ours.get_epsilon(DELTA) == pytest.approx(theirs.get_epsilon(DELTA), abs=2e-3)


def test_tighter_than_rdp_and_monotone():
    def prv(sigma, q, n):
        return compose_epsilon([(sigma, q, n)], DELTA)[2]

    base = prv(1.5, 0.04, 2250)
    rdp = RDPAccountant()
    rdp.step(1.5, 0.04, 2250)
    assert base < rdp.get_epsilon(DELTA)  # 6.78 vs 7.33: the PRV curve is tight, RDP's conversion is not
    assert prv(2.0, 0.04, 2250) < base  # more noise
    assert prv(1.5, 0.02, 2250) < base  # lower sampling rate
    assert prv(1.5, 0.04, 1000) < base  # fewer steps


def test_split_history_composes_like_one_phase():
    one = compose_epsilon([(1.2, 0.02, 400)], DELTA)
    acc = PRVAccountant()
    acc.step(1.2, 0.02, 150)
    acc.step(1.2, 0.02, 250)
    assert acc.history == [[1.2, 0.02, 400]]
    two = compose_epsilon([(1.2, 0.02, 150), (1.2, 0.02, 250)], DELTA)
    assert two == pytest.approx(one, abs=1e-6)  # same grid, transforms multiplied


def test_state_round_trip_and_mechanism_check():
    acc = PRVAccountant()
    acc.step(1.0, 0.1, 7)
    again = PRVAccountant()
    again.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert again.history == acc.history and len(again) == 7
    with pytest.raises(ValueError, match="not 'prv'"):
        again.load_state_dict(RDPAccountant().state_dict())


@pytest.mark.slow
def test_noise_search_with_prv_meets_target_and_needs_less_noise():
    sigma_prv = get_noise_multiplier(3.0, DELTA, 0.02, 200, accountant="prv")
    sigma_rdp = get_noise_multiplier(3.0, DELTA, 0.02, 200)
    assert compose_epsilon([(sigma_prv, 0.02, 200)], DELTA)[2] <= 3.0
    assert sigma_prv < sigma_rdp


@pytest.mark.slow
def test_dp_run_with_prv_logs_its_epsilon(tmp_path, fresh_host):
    fresh_host()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
run: {{name: prv, seed: 0, steps: 3, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {tmp_path}, progress: false}}
recipe: {{name: sft, optimizer: sgd, lr: 1.0e-2, batch_size: 8, eval_batch_size: 16}}
model: {{name: hf_causal_lm, arch: gpt2, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 64, n_eval: 8}}
grad_transform: {{name: flashdp, noise_multiplier: 1.0, delta: 1.0e-3, accountant: prv}}
""")
    run = execute(load_config(cfg))
    expected = compose_epsilon([(1.0, 8 / 64, 3)], 1e-3)[2]
    assert run.summary["privacy/epsilon"] == pytest.approx(expected)
