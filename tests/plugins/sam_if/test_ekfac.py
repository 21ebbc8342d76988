"""EK-FAC (`ekfac.EKFACEstimator`) against exact damped influence.

One linear layer under ½‖Wx + b − y‖² has the Hessian E[a aᵀ] ⊗ I exactly (a = [x, 1]), so EK-FAC must equal
g_tᵀ (H + λI)⁻¹ g_j with H from torch.autograd.functional.hessian and per-example autograd gradients (fp64).
"""
from __future__ import annotations

import pytest
import torch

from plait.plugins.sam_if.ekfac import EKFACEstimator

LAM = 1e-3


def _case(n=20, d_in=5, d_out=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n + 4, d_in, generator=gen, dtype=torch.float64)
    Y = torch.randn(n + 4, d_out, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    return torch.nn.Linear(d_in, d_out).double(), X[:n], Y[:n], X[n:], Y[n:]


def _exact(model, X, Y, Xt, Yt, lam):
    d_out, d_in = model.weight.shape
    theta0 = torch.cat([model.weight.detach(), model.bias.detach().unsqueeze(1)], 1).reshape(-1)

    def loss(theta, x, y):
        W = theta.view(d_out, d_in + 1)
        z = x @ W[:, :d_in].T + W[:, d_in]
        return 0.5 * ((z - y) ** 2).sum(1).mean()

    H = torch.autograd.functional.hessian(lambda t: loss(t, X, Y), theta0)

    def g(x, y):
        t = theta0.clone().requires_grad_(True)
        return torch.autograd.grad(loss(t, x.unsqueeze(0), y.unsqueeze(0)), t)[0]
    Gtr = torch.stack([g(X[i], Y[i]) for i in range(len(X))])
    Gte = torch.stack([g(Xt[i], Yt[i]) for i in range(len(Xt))])
    sol = torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), Gtr.T)
    return (Gte @ sol).T, (Gtr * sol.T).sum(1)


def test_one_linear_layer_equals_exact_damped_influence():
    model, X, Y, Xt, Yt = _case()
    ref, ref_self = _exact(model, X, Y, Xt, Yt, LAM)
    est = EKFACEstimator(params=["*"], damping=LAM, loss="mse", batch_size=7)
    got = est.scores(model, (X, Y), (Xt, Yt))
    assert torch.allclose(got, ref, rtol=0, atol=1e-8 * ref.abs().max())
    assert torch.allclose(est.self_influence(model, (X, Y)), ref_self, rtol=1e-8, atol=0)
    # damping is used: a different λ gives different scores
    assert not torch.allclose(EKFACEstimator(damping=1.0, loss="mse").scores(model, (X, Y), (Xt, Yt)), got)


def test_cross_entropy_mlp_tracks_exact_gauss_newton_influence():
    # an MLP under cross-entropy: EK-FAC is an approximation of the block-diagonal GGN; on the last layer alone
    # (one block, exact GGN from the logits' covariance) it must rank like the exact damped GGN influence
    from scipy.stats import spearmanr
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    got = EKFACEstimator(params=["2"], damping=1e-2).scores(model, (X[:32], y[:32]), (X[32:], y[32:]))
    h = model[1](model[0](X)).detach()
    a = torch.cat([h, torch.ones(40, 1, dtype=h.dtype)], 1)
    p = torch.softmax(model(X).detach(), 1)
    G = ((p - torch.nn.functional.one_hot(y, 3)).unsqueeze(2) * a.unsqueeze(1)).flatten(1)  # vec(r aᵀ)
    C = torch.diag_embed(p[:32]) - p[:32].unsqueeze(2) * p[:32].unsqueeze(1)
    F = sum(torch.kron(C[i], torch.outer(a[i], a[i])) for i in range(32)) / 32
    ref = G[32:] @ torch.linalg.solve(F + 1e-2 * torch.eye(F.shape[0], dtype=F.dtype), G[:32].T)
    assert spearmanr(got.reshape(-1).numpy(), ref.T.reshape(-1).numpy()).statistic >= 0.9


def test_params_matching_no_linear_is_a_clear_error():
    model, X, Y, Xt, Yt = _case()
    with pytest.raises(ValueError, match=r"params: \['lm_head'\] match no Linear module \(Linear modules: <root>\)"):
        EKFACEstimator(params=["lm_head"], loss="mse").scores(model, (X, Y), (Xt, Yt))
