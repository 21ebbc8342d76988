"""EK-FAC on layers that see a sequence of positions (a transformer block's tokens), against a brute-force build.

The reference assembles EK-FAC from its definition with nothing but autograd and loops (fp64): A = Σ_{n,t} a aᵀ/n
from the layer's input rows, S = Σ_n Σ_t J_tᵀ C_n J_t / n with J_t the Jacobian of the logits in the layer's
output at position t and C_n = diag(p) − p pᵀ the predictive covariance of the logits gradient, Λ from the
Jacobian of the logits in the layer's *weights* (autograd on the parameters, not the hook's Σ_t s_t a_tᵀ),
Λ_ij = Σ_n Σ_cc' C_n[c, c'] (Q_Sᵀ J_c Q_A)_ij (Q_Sᵀ J_c' Q_A)_ij / n, and each example's gradient of its own loss
from autograd; the influence is ⟨Q_S ((Q_Sᵀ G Q_A) / (Λ + λ)) Q_Aᵀ, G'⟩ summed over the chosen layers.
"""
from __future__ import annotations

import pytest
import torch

from plait.plugins.sam_if.ekfac import EKFACEstimator

LAM = 1e-2


class TokenNet(torch.nn.Module):
    """Tokens [n, T, d] → Linear → tanh → mean over T → Linear: one logit vector per example."""

    def __init__(self, d=4, h=5, c=3):
        super().__init__()
        self.mix = torch.nn.Linear(d, h)
        self.head = torch.nn.Linear(h, c)

    def forward(self, x):
        return self.head(torch.tanh(self.mix(x)).mean(1))


def _data(n=12, T=3, d=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = TokenNet(d, 5, c).double()
    X = torch.randn(n, T, d, generator=g, dtype=torch.float64)
    y = torch.randint(c, (n,), generator=g)
    return model, X, y


def _wb(layer):
    return [layer.weight, layer.bias]


def _flat_grad(out, layer, **kw):
    gw, gb = torch.autograd.grad(out, _wb(layer), **kw)
    return torch.cat([gw, gb.unsqueeze(1)], 1)  # [out, in+1]


def _reference(model, X, y, Xt, yt, names):
    n = X.shape[0]
    layers = {nm: getattr(model, nm) for nm in names}
    feats = {}  # layer inputs, augmented with a 1, [n, T, in+1] (or [n, 1, in+1])
    with torch.no_grad():
        h = torch.tanh(model.mix(X))
        feats["mix"] = torch.cat([X, torch.ones(*X.shape[:-1], 1, dtype=X.dtype)], -1)
        pooled = h.mean(1, keepdim=True)
        feats["head"] = torch.cat([pooled, torch.ones(n, 1, 1, dtype=X.dtype)], -1)
    stats = {}
    for nm, layer in layers.items():
        A = sum(feats[nm][i, t, :, None] * feats[nm][i, t, None, :] for i in range(n)
                for t in range(feats[nm].shape[1])) / n
        S = 0.0
        for i in range(n):
            x = X[i:i + 1]
            z = model(x)[0]
            C = torch.diag(torch.softmax(z.detach(), 0)) - torch.outer(*[torch.softmax(z.detach(), 0)] * 2)
            # the layer's output at each position, as a leaf so that the logits' Jacobian in it is autograd's
            if nm == "mix":
                u = model.mix(x).detach().requires_grad_(True)
                zz = model.head(torch.tanh(u).mean(1))[0]
            else:  # one position: the head's output is the logits
                u = model.head(torch.tanh(model.mix(x)).mean(1, keepdim=True)).detach().requires_grad_(True)
                zz = u[0, 0]
            J = torch.stack([torch.autograd.grad(zz[c], u, retain_graph=True)[0][0] for c in range(len(zz))])
            for t in range(J.shape[1]):  # J [C, T, out]
                S = S + J[:, t].T @ C @ J[:, t] / n
        eA, QA = torch.linalg.eigh(A)
        eS, QS = torch.linalg.eigh(S)
        L = 0.0
        for i in range(n):
            z = model(X[i:i + 1])[0]
            p = torch.softmax(z.detach(), 0)
            C = torch.diag(p) - torch.outer(p, p)
            R = torch.stack([QS.T @ _flat_grad(z[c], layer, retain_graph=True) @ QA for c in range(len(z))])
            L = L + torch.einsum("cd,cij,dij->ij", C, R, R) / n
        stats[nm] = (QA, QS, L)

    def grads(Xs, ys):
        out = {nm: [] for nm in names}
        for i in range(Xs.shape[0]):
            loss = torch.nn.functional.cross_entropy(model(Xs[i:i + 1]), ys[i:i + 1])
            for nm in names:
                out[nm].append(_flat_grad(loss, layers[nm], retain_graph=True))
        return {nm: torch.stack(v) for nm, v in out.items()}
    Gtr, Gte = grads(X, y), grads(Xt, yt)
    self_inf, scores = 0.0, 0.0
    for nm in names:
        QA, QS, L = stats[nm]
        P = QS @ ((QS.T @ Gtr[nm] @ QA) / (L + LAM)) @ QA.T
        self_inf = self_inf + (P * Gtr[nm]).sum((1, 2))
        scores = scores + P.flatten(1) @ Gte[nm].flatten(1).T
    return self_inf, scores


@pytest.mark.parametrize("names", [["mix"], ["mix", "head"]])
def test_token_layers_equal_brute_force_ekfac(names):
    model, X, y = _data()
    _, Xt, yt = _data(n=4, seed=1)
    ref_self, ref_scores = _reference(model, X, y, Xt, yt, names)
    est = EKFACEstimator(params=names, damping=LAM, loss="ce", batch_size=5)
    got = est.self_influence(model, (X, y))
    assert torch.allclose(got, ref_self, rtol=1e-8, atol=0)
    assert torch.allclose(est.scores(model, (X, y), (Xt, yt)), ref_scores, rtol=0, atol=1e-8 * ref_scores.abs().max())


def test_one_position_sequence_equals_flat_inputs():
    # [n, 1, d] through the token path must give what [n, d] gives through the one-position path
    torch.manual_seed(0)
    flat = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).double()
    X = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(3, (10,))

    class Seq(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = flat

        def forward(self, x):
            return self.net(x)[:, 0]
    est = EKFACEstimator(params=["*"], damping=LAM, batch_size=4)
    a = est.self_influence(flat, (X, y))
    b = EKFACEstimator(params=["*"], damping=LAM, batch_size=4).self_influence(Seq(), (X[:, None], y))
    assert torch.allclose(a, b, rtol=1e-10, atol=0)


def test_module_not_called_as_a_module_is_named():
    # MultiheadAttention applies out_proj's weights functionally: its hook never fires
    torch.manual_seed(0)

    class Att(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(4, 1, batch_first=True)
            self.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))
    X, y = torch.randn(6, 3, 4), torch.randint(2, (6,))
    with pytest.raises(ValueError, match="attn.out_proj are not called as modules"):
        EKFACEstimator(params=["attn.out_proj"]).self_influence(Att(), (X, y))
