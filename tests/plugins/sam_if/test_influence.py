"""sam_if influence: ρ=0 ≡ IF, ASAM(T=I) ≡ SAM, SAM-IF vs finite-difference retraining, solver agreement,
IF/TracIn vs independent loops, mislabel detection."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from plait.plugins.sam_if import solvers
from plait.plugins.sam_if.data import TabularMLP, load_tabular
from plait.plugins.sam_if.functional import Objective, perturbation
from plait.plugins.sam_if.influence import IFEstimator, SAMHessianEstimator, TrajectoryEstimator
from plait.plugins.sam_if.sam import load_trajectory, sam_step, train_sam


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _lbfgs(model, data, l2):
    obj = Objective(model, data, l2)
    w = obj.fm.flat().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], max_iter=300, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = obj.loss(w)
        loss.backward()
        return loss

    opt.step(closure)
    obj.fm.load(w.detach())
    return model


@pytest.fixture(scope="module")
def cancer():
    d = load_tabular("breast_cancer", n_train=40, n_test=10, seed=1)
    keep = slice(0, 10)  # 10 features -> 22 parameters
    d.train.X, d.test.X = d.train.X[:, keep].contiguous(), d.test.X[:, keep].contiguous()
    return d


def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def test_rho_zero_sam_influence_is_plain_if(cancer):
    torch.set_num_threads(1)
    model = TabularMLP(10, 2, seed=3)
    train_sam(model, cancer.train.X, cancer.train.y, rho=0.0, l2=0.05, lr=0.5, steps=50)
    a = IFEstimator(l2=0.05)
    b = SAMHessianEstimator(rho=0.0, l2=0.05)
    sa, sb = a.scores(model, cancer.train, cancer.test), b.scores(model, cancer.train, cancer.test)
    assert torch.allclose(sa, sb, rtol=1e-12, atol=1e-14 * float(sa.abs().max()))
    ia, ib = a.self_influence(model, cancer.train), b.self_influence(model, cancer.train)
    assert torch.allclose(ia, ib, rtol=1e-12, atol=1e-14 * float(ia.abs().max()))
    assert (ia > 0).all()  # (H + λI) is positive definite


def test_asam_with_identity_scaling_equals_sam(cancer):
    X, y = cancer.train.X, cancer.train.y
    base = TabularMLP(10, 2, seed=0)
    with torch.no_grad():  # |w| = 1 and η = 0: ASAM's T = diag(|w| + η) is the identity
        for p in base.parameters():
            p.copy_(torch.where(torch.rand_like(p) < 0.5, -1.0, 1.0))
    steps = {}
    for adaptive in (False, True):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss_fn = lambda: torch.nn.functional.cross_entropy(model(X), y)  # noqa: E731
        out = sam_step(model, loss_fn, opt, rho=0.05, adaptive=adaptive, eta=0.0)
        steps[adaptive] = (_flat(model), out["perturbations"])
    assert torch.allclose(steps[True][0], steps[False][0], rtol=0, atol=1e-15)
    assert torch.allclose(steps[True][1], steps[False][1], rtol=0, atol=1e-15)
    # the perturbation's data dependence (∂e/∂g, in b_j) is the same; only ASAM's dT/dw term in A differs
    obj = Objective(base, cancer.train, 0.01)
    w = obj.fm.flat()
    rhs = [obj.sam_rhs(w, X, y, rho=0.05, adaptive=a, eta=0.0) for a in (False, True)]
    assert torch.allclose(rhs[0], rhs[1], rtol=1e-12, atol=1e-15)
    g = obj.gradient(w)
    assert torch.allclose(perturbation(w, g, 0.05, True, 0.0), 0.05 * g / g.norm(), rtol=1e-13)


def test_sam_influence_matches_finite_difference_retraining(cancer):
    """Upweight z_j by ±δ, retrain with SAM (m-sharpness: 4 groups, so a SAM fixed point exists) from the warm
    start, central difference of the weights vs −A⁻¹ b_j."""
    X, y = cancer.train.X, cancer.train.y
    n, j, delta, kw = X.shape[0], 5, 1e-4, dict(rho=0.05, l2=0.1, m=10)
    model = TabularMLP(10, 2, seed=0)
    r = train_sam(model, X, y, lr=2.0, steps=3000, tol=1e-13, **kw)
    est = SAMHessianEstimator(**kw)
    ift = est.param_influence(model, cancer.train, rows=[j])[:, 0]
    print(f"\nSAM stationarity residual ‖F(ŵ)‖ = {est.last_info['stationarity']:.2e} after {r['steps']} steps")
    assert est.last_info["stationarity"] < 1e-11
    ws = []
    for s in (1, -1):
        m2 = copy.deepcopy(model)
        c = torch.ones(n, dtype=X.dtype)
        c[j] += s * delta * n  # L + sδ ℓ_j with L = (1/n) Σ c_i ℓ_i
        train_sam(m2, X, y, lr=2.0, steps=3000, tol=1e-13, sample_weight=c, **kw)
        ws.append(_flat(m2))
    fd = (ws[0] - ws[1]) / (2 * delta)
    plain = IFEstimator(l2=0.1).param_influence(model, cancer.train, rows=[j])[:, 0]
    naive = SAMHessianEstimator(variant="naive", **kw).param_influence(model, cancer.train, rows=[j])[:, 0]
    print(f"cosine(SAM-IF, FD) = {_cos(ift, fd):.12f}, rel err {float((ift - fd).norm() / fd.norm()):.2e}; "
          f"plain IF {_cos(plain, fd):.6f}, naive {_cos(naive, fd):.6f}")
    assert _cos(ift, fd) > 0.99
    assert float((ift - fd).norm() / fd.norm()) < 1e-4
    assert float((ift - fd).norm()) < float((plain - fd).norm())


def test_full_batch_sam_has_no_fixed_point_on_a_convex_loss(cancer):
    """Normalised full-batch SAM bounces around the minimiser: the reported residual stays large, and the
    max_stationarity guard refuses to score."""
    model = TabularMLP(10, 2, seed=0)
    train_sam(model, cancer.train.X, cancer.train.y, rho=0.05, l2=0.1, lr=1.0, steps=400)
    st = SAMHessianEstimator(rho=0.05, l2=0.1).stationarity(model, cancer.train)
    assert st["stationarity_rel"] > 0.1
    with pytest.raises(ValueError, match="not a SAM fixed point"):
        SAMHessianEstimator(rho=0.05, l2=0.1, max_stationarity=1e-6).scores(model, cancer.train, cancer.test)


@pytest.fixture(scope="module")
def digits_lr():
    torch.set_num_threads(1)
    d = load_tabular("digits", n_train=300, n_test=3, seed=0)
    model = _lbfgs(TabularMLP(64, 10, seed=0), d.train, 0.05)  # 650 parameters
    return d, model


def test_iterative_solvers_agree_with_explicit_solve(digits_lr):
    d, model = digits_lr
    ref = IFEstimator(l2=0.05, solver="explicit").scores(model, d.train, d.test)
    for solver in ("cg", "gmres", "lissa"):
        est = IFEstimator(l2=0.05, solver=solver, tol=1e-7)
        s = est.scores(model, d.train, d.test)
        rel = float((s - ref).norm() / ref.norm())
        print(f"\n{solver}: rel err {rel:.2e}, {est.last_info}")
        assert rel < 1e-4 and est.last_info["residual"] <= 1e-7


def test_sam_solvers_agree_with_explicit_solve(cancer):
    model = TabularMLP(10, 2, seed=0)
    train_sam(model, cancer.train.X, cancer.train.y, rho=0.05, l2=0.1, lr=1.0, steps=100, m=10)
    kw = dict(rho=0.05, l2=0.1, m=10)
    ref = SAMHessianEstimator(**kw).scores(model, cancer.train, cancer.test)
    for solver in ("gmres", "normal_cg"):
        est = SAMHessianEstimator(solver=solver, tol=1e-9, **kw)
        s = est.scores(model, cancer.train, cancer.test)
        assert float((s - ref).norm() / ref.norm()) < 1e-6, solver
    ref_self = SAMHessianEstimator(**kw).self_influence(model, cancer.train)
    got = SAMHessianEstimator(solver="gmres", tol=1e-9, **kw).self_influence(model, cancer.train)
    assert float((got - ref_self).norm() / ref_self.norm()) < 1e-6


def test_unconverged_solver_raises(digits_lr):
    d, model = digits_lr
    with pytest.raises(solvers.SolverError, match="did not converge"):
        IFEstimator(l2=0.05, solver="cg", maxiter=3).scores(model, d.train, d.test)
    with pytest.raises(solvers.SolverError, match="did not converge"):
        IFEstimator(l2=0.05, solver="lissa", lissa_depth=100).scores(model, d.train, d.test)


# --- independent references ----------------------------------------------------------------------------
def _manual_logreg_loss(theta, X, y, C, D):
    """Cross-entropy of a linear model written out by hand (weights [C, D] then bias [C])."""
    W, b = theta[:C * D].view(C, D), theta[C * D:]
    z = X @ W.T + b
    return -(z.gather(1, y[:, None])[:, 0] - torch.logsumexp(z, 1))


def test_plain_if_matches_independent_loop(cancer):
    model = _lbfgs(TabularMLP(10, 2, seed=1), cancer.train, 0.05)
    C, D, l2 = 2, 10, 0.05
    theta = _flat(model)
    X, y, Xt, yt = cancer.train.X, cancer.train.y, cancer.test.X, cancer.test.y
    total = lambda th: _manual_logreg_loss(th, X, y, C, D).mean() + 0.5 * l2 * (th * th).sum()  # noqa: E731
    H = torch.autograd.functional.hessian(total, theta).numpy()

    def g(x, lab):
        th = theta.clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(_manual_logreg_loss(th, x[None], lab[None], C, D)[0], th)
        return gr.numpy()

    ref = np.zeros((len(X), len(Xt)))
    for t in range(len(Xt)):
        v = np.linalg.solve(H, g(Xt[t], yt[t]))
        for j in range(len(X)):
            ref[j, t] = g(X[j], y[j]) @ v
    got = IFEstimator(l2=l2).scores(model, cancer.train, cancer.test).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12 * np.abs(ref).max())


def test_tracin_matches_independent_loop(cancer, tmp_path):
    X, y = cancer.train.X, cancer.train.y
    model = TabularMLP(10, 2, seed=2)
    w0 = copy.deepcopy(model)
    train_sam(model, X, y, rho=0.05, l2=0.01, lr=0.3, steps=12, batch_size=16, schedule="linear",
              min_lr_ratio=0.1, seed=4, record_dir=tmp_path / "traj")
    tr = load_trajectory(tmp_path / "traj")
    assert tr["weights"].shape == (12, 22) and tr["meta"]["rho"] == 0.05
    # replay the recorded trajectory independently: every w_{t+1} = w_t − η_t ∇L_B(w_t + ρ g/‖g‖)
    ref = np.zeros((len(X), len(cancer.test)))
    probe = copy.deepcopy(w0)
    params = list(probe.parameters())

    def load(v):
        with torch.no_grad():
            off = 0
            for p in params:
                p.copy_(v[off:off + p.numel()].view_as(p))
                off += p.numel()

    def grad_at(v, xb, yb, reg):
        load(v)
        loss = torch.nn.functional.cross_entropy(probe(xb), yb) + reg * 0.5 * 0.01 * sum((p * p).sum() for p in params)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    for t in range(12):
        w, lr = tr["weights"][t], float(tr["lrs"][t])
        b = tr["batch"][t][tr["batch"][t] >= 0]
        gb = grad_at(w, X[b], y[b], 1.0)
        e = 0.05 * gb / (gb.norm() + 1e-12)
        assert torch.allclose(tr["perturbations"][t, 0], e, rtol=1e-12, atol=1e-15)
        if t + 1 < 12:
            nxt = w - lr * grad_at(w + e, X[b], y[b], 1.0)
            assert torch.allclose(tr["weights"][t + 1], nxt, rtol=1e-12, atol=1e-14)
        for j in range(len(X)):
            gj = grad_at(w + e, X[j:j + 1], y[j:j + 1], 0.0)
            for k in range(len(cancer.test)):
                ref[j, k] += lr * float(gj @ grad_at(w, cancer.test.X[k:k + 1], cancer.test.y[k:k + 1], 0.0))
    got = TrajectoryEstimator(trajectory=str(tmp_path / "traj")).scores(model, cancer.train, cancer.test).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13 * np.abs(ref).max())
    self_tr = TrajectoryEstimator(trajectory=str(tmp_path / "traj")).self_influence(model, cancer.train)
    np.testing.assert_allclose(self_tr.numpy(), np.array([ref_self for ref_self in _self_ref(tr, X, y, grad_at)]),
                               rtol=1e-10)


def _self_ref(tr, X, y, grad_at):
    for j in range(len(X)):
        total = 0.0
        for t in range(tr["weights"].shape[0]):
            w, e = tr["weights"][t], tr["perturbations"][t, 0]
            total += float(tr["lrs"][t]) * float(grad_at(w + e, X[j:j + 1], y[j:j + 1], 0.0)
                                                 @ grad_at(w, X[j:j + 1], y[j:j + 1], 0.0))
        yield total


def test_self_influence_ranks_flipped_labels(tmp_path):
    from sklearn.metrics import roc_auc_score

    d = load_tabular("digits", n_train=300, n_test=50, flip_fraction=0.1, seed=0)
    model = TabularMLP(64, 10, seed=0)
    train_sam(model, d.train.X, d.train.y, rho=0.05, l2=0.01, lr=0.5, steps=150, record_dir=tmp_path / "t",
              record_every=10)
    truth = d.flip_mask.numpy()
    aucs = {}
    for name, est in [("if", IFEstimator(l2=0.01)), ("sam_hessian", SAMHessianEstimator(rho=0.05, l2=0.01)),
                      ("tracin", TrajectoryEstimator(trajectory=str(tmp_path / "t")))]:
        aucs[name] = roc_auc_score(truth, est.self_influence(model, d.train).numpy())
    print(f"\nmislabel AUC (10% flipped, digits n=300): {aucs}")
    assert all(a > 0.8 for a in aucs.values()), aucs


def test_sam_trajectory_coupling_matches_one_step_finite_difference(cancer, tmp_path):
    """One full-batch SAM step from w0: score[j, t] = −∇ℓ_t(w0)·dw1/dδ_j including the perturbation's data
    dependence; compare with a central difference of the step itself (upweighted z_j)."""
    X, y = cancer.train.X, cancer.train.y
    n, lr, kw = X.shape[0], 0.4, dict(rho=0.1, l2=0.01)
    base = TabularMLP(10, 2, seed=5)
    model = copy.deepcopy(base)
    train_sam(model, X, y, lr=lr, steps=1, record_dir=tmp_path / "one", **kw)
    est = TrajectoryEstimator(trajectory=str(tmp_path / "one"), in_batch=True, coupling=True)
    got = est.scores(base, cancer.train, cancer.test)
    plain = TrajectoryEstimator(trajectory=str(tmp_path / "one"), in_batch=True).scores(base, cancer.train,
                                                                                         cancer.test)
    obj = Objective(base, cancer.test, 0.0)
    gt = obj.fm.example_grads(obj.fm.flat(), cancer.test.X, cancer.test.y)  # [n_test, p]
    delta = 1e-6
    for j in (0, 7):
        ws = []
        for s in (1, -1):
            m2 = copy.deepcopy(base)
            c = torch.ones(n, dtype=X.dtype)
            c[j] += s * delta * n
            train_sam(m2, X, y, lr=lr, steps=1, sample_weight=c, **kw)
            ws.append(_flat(m2))
        ref = -(gt @ ((ws[0] - ws[1]) / (2 * delta)))
        assert torch.allclose(got[j], ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
        assert not torch.allclose(plain[j], ref, rtol=1e-3)  # the coupling term matters
    rho0 = TrajectoryEstimator(trajectory=str(tmp_path / "one"), in_batch=True, coupling=True)
    assert rho0.self_influence(base, cancer.train).shape == (n,)
