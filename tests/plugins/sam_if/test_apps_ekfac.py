"""EK-FAC with a black-box per-example loss (`apps_ekfac.AnyEKFAC`, ``plait attribute RUN estimator=ekfac``).

Reference: `ekfac.EKFACEstimator(fisher="empirical")` on a tiny MLP with one position per example (the same
estimator written from the logits). The verb on an sft run (sequence inputs) is tested in test_apps.py.
"""
from __future__ import annotations

import pytest
import torch

from plait.plugins.sam_if.apps_ekfac import AnyEKFAC
from plait.plugins.sam_if.ekfac import EKFACEstimator


def _mlp_case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(14, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (14,), generator=g)
    return model, X, y


@pytest.mark.parametrize("params, ratio", [(["2"], 0.0), (["*"], 0.1)])
def test_one_position_equals_ekfac_estimator_empirical(params, ratio):
    model, X, y = _mlp_case()
    ref = EKFACEstimator(params=params, damping=1e-2, damping_ratio=ratio, fisher="empirical")
    want = ref.scores(model, (X[:10], y[:10]), (X[10:], y[10:]))
    want_self = ref.self_influence(model, (X[:10], y[:10]))

    def tr(m, i):
        return torch.nn.functional.cross_entropy(m(X[i:i + 1]), y[i:i + 1])

    def te(m, i):
        return torch.nn.functional.cross_entropy(m(X[10 + i:11 + i]), y[10 + i:11 + i])
    est = AnyEKFAC(params=params, damping=1e-2, damping_ratio=ratio)
    got = est.scores(model, tr, 10, te, 4)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()))
    assert torch.allclose(est.scores(model, tr, 10), want_self, rtol=1e-10, atol=0)
