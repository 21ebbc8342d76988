"""Momentum in recorded trajectories: train_sam records μ, and the trajectory estimators apply the momentum buffer.

Reference: an independent per-example loop with torch.autograd on the module (no torch.func, no FlatModel): for
each training example j a buffer b_j ← μ b_j + c_t ∇ℓ_j(w_t + e_t) per step, and the score Σ_t η_t ∇ℓ_test(w_t)·b_j.
"""
from __future__ import annotations

import pytest
import torch

from plait.plugins.sam_if.influence import TrajectoryEstimator
from plait.plugins.sam_if.sam import load_trajectory, train_sam

RHO, MU = 0.05, 0.9


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _data(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=gen)
    return X, y


def _load(model, w):
    with torch.no_grad():
        off = 0
        for p in model.parameters():
            p.copy_(w[off:off + p.numel()].view_as(p))
            off += p.numel()


def _grad(model, w, x, y):
    _load(model, w)
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x.unsqueeze(0)), y.unsqueeze(0)).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone()


def _hand_tracin(tr, X, y, Xt, yt, in_batch: bool):
    model = _tiny(99)
    n, T = X.shape[0], tr["weights"].shape[0]
    mu = tr["meta"]["momentum"]
    out = torch.zeros(n, Xt.shape[0], dtype=torch.float64)
    for j in range(n):
        buf = torch.zeros(tr["weights"].shape[1], dtype=torch.float64)
        for t in range(T):
            w, e, lr = tr["weights"][t], tr["perturbations"][t, 0], float(tr["lrs"][t])
            batch = [int(b) for b in tr["batch"][t] if b >= 0]
            c = (n / len(batch) if j in batch else 0.0) if in_batch else 1.0
            buf = mu * buf + c * _grad(model, w + e, X[j], y[j])
            for i in range(Xt.shape[0]):
                out[j, i] += lr * torch.dot(_grad(model, w, Xt[i], yt[i]), buf)
    return out


def test_train_sam_records_momentum_and_steps_with_it(tmp_path):
    # the recorded weights follow w_{t+1} = w_t − η_t b_t, b_t = μ b_{t−1} + ∇L_B(w_t + e_t) (hand recomputation)
    X, y = _data(10, 1)
    train_sam(_tiny(), X, y, rho=RHO, lr=0.2, steps=5, momentum=MU, schedule="linear", min_lr_ratio=0.2,
              record_dir=tmp_path)
    tr = load_trajectory(tmp_path)
    assert tr["meta"]["momentum"] == MU
    model = _tiny(99)
    buf = torch.zeros(tr["weights"].shape[1], dtype=torch.float64)
    for t in range(4):
        w, e = tr["weights"][t], tr["perturbations"][t, 0]
        g = sum(_grad(model, w + e, X[j], y[j]) for j in range(10)) / 10
        buf = MU * buf + g
        assert torch.allclose(tr["weights"][t + 1], w - float(tr["lrs"][t]) * buf, rtol=0, atol=1e-12)


@pytest.mark.parametrize("in_batch", [False, True])
def test_tracin_over_momentum_trajectory_equals_buffer_loop(tmp_path, in_batch):
    X, y = _data(8, 2)
    Xt, yt = _data(3, 3)
    train_sam(_tiny(), X, y, rho=RHO, lr=0.3, steps=6, batch_size=4, momentum=MU, seed=5, record_dir=tmp_path)
    tr = load_trajectory(tmp_path)
    ref = _hand_tracin(tr, X, y, Xt, yt, in_batch)
    est = TrajectoryEstimator(trajectory=str(tmp_path), in_batch=in_batch)
    got = est.scores(_tiny(7), (X, y), (Xt, yt))
    assert torch.allclose(got, ref, rtol=0, atol=1e-10)
    assert est.last_info["momentum"] == MU
    # self-influence: the diagonal of the same sum with the test set = the training set
    ref_self = _hand_tracin(tr, X, y, X, y, in_batch).diagonal()
    assert torch.allclose(est.self_influence(_tiny(7), (X, y)), ref_self, rtol=0, atol=1e-10)
    # and the momentum matters: the SGD-weighted sum differs
    tr0 = {**tr, "meta": {**tr["meta"], "momentum": 0.0}}
    plain = TrajectoryEstimator(trajectory=tr0, in_batch=in_batch).scores(_tiny(7), (X, y), (Xt, yt))
    assert (plain - ref).abs().max() > 1e-3


def test_sam_trajectory_coupling_with_momentum_matches_its_vector_form(tmp_path):
    # with μ the coupling enters each buffer as a vector; at μ → 0 the buffer form must equal the scalar form
    X, y = _data(8, 4)
    Xt, yt = _data(2, 5)
    train_sam(_tiny(), X, y, rho=RHO, lr=0.3, steps=4, batch_size=4, seed=1, record_dir=tmp_path)
    tr = load_trajectory(tmp_path)
    scalar = TrajectoryEstimator(trajectory=tr, in_batch=True, coupling=True).scores(_tiny(7), (X, y), (Xt, yt))
    tiny_mu = {**tr, "meta": {**tr["meta"], "momentum": 1e-300}}
    vector = TrajectoryEstimator(trajectory=tiny_mu, in_batch=True, coupling=True).scores(_tiny(7), (X, y), (Xt, yt))
    assert torch.allclose(vector, scalar, rtol=0, atol=1e-12)
    assert (scalar - TrajectoryEstimator(trajectory=tr, in_batch=True).scores(_tiny(7), (X, y), (Xt, yt))
            ).abs().max() > 0
