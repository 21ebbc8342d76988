"""Applications: the vectorised SAM trainer vs train_sam, warm-start retraining to SAM's fixed point, the one-step
influence update vs retraining, harmful-vs-random removal, and dŵ/dρ vs finite differences in ρ."""
from __future__ import annotations

import copy

import pytest
import torch

from plait.plugins.sam_if.data import TabularMLP, load_tabular
from plait.plugins.sam_if.editing import (
    edit,
    mean_loss,
    removal_update,
    replay_training,
    retrain_removed,
    rho_derivative,
    sam_descent,
    sam_options,
    select_rho,
    solve_fixed_point,
)
from plait.plugins.sam_if.functional import Objective
from plait.plugins.sam_if.influence import IFEstimator, SAMHessianEstimator, TrajectoryEstimator
from plait.plugins.sam_if.sam import train_sam
from plait.plugins.sam_if.solvers import SolverError

SAM = sam_options(rho=0.05, m=40)
L2 = 0.05


@pytest.fixture(scope="module")
def convex():
    """Breast-cancer logistic regression (62 parameters), 10 % flipped labels, at its m-sharpness SAM fixed point."""
    torch.set_num_threads(1)
    d = load_tabular("breast_cancer", n_train=200, n_test=100, flip_fraction=0.1, seed=2)
    model = TabularMLP(30, 2, seed=0)
    obj = Objective(model, d.train, L2)
    w, _ = sam_descent(obj, obj.fm.flat(), SAM, lr=1.0, steps=30)  # then Newton/chord to the fixed point
    w, info = solve_fixed_point(obj, w, SAM)
    obj.fm.load(w)
    return d, model, obj


def test_sam_descent_equals_train_sam(convex):
    d, _, _ = convex
    a, b = TabularMLP(30, 2, seed=1), TabularMLP(30, 2, seed=1)
    train_sam(a, d.train.X, d.train.y, rho=0.05, m=40, l2=L2, lr=0.3, steps=5)
    obj = Objective(b, d.train, L2)
    w, traj = sam_descent(obj, obj.fm.flat(), SAM, lr=0.3, steps=5)
    assert torch.allclose(w, Objective(a, d.train, L2).fm.flat(), rtol=0, atol=1e-13)
    assert traj["weights"].shape == (5, 62) and traj["perturbations"].shape == (5, 5, 62)
    assert TrajectoryEstimator(trajectory=traj).self_influence(b, d.train).shape == (200,)


@pytest.mark.slow
def test_fixed_point_retraining_matches_sam_iterations(convex):
    """The warm-start fixed-point solve and plain SAM iterations (heavy ball, same fixed points) agree."""
    d, model, obj = convex
    w_hat = obj.fm.flat()
    assert float(obj.sam_field(w_hat, **SAM).norm()) < 1e-11
    w_fp, info = retrain_removed(obj, w_hat, [3, 17], SAM)
    assert info["residual"] < 1e-11
    c = torch.ones(200, dtype=torch.float64)
    c[[3, 17]] = 0.0
    m2 = copy.deepcopy(model)
    r = train_sam(m2, d.train.X, d.train.y, rho=0.05, m=40, l2=L2, lr=1.0, momentum=0.9, steps=800, tol=1e-10,
                  sample_weight=c)
    w_it = Objective(m2, d.train, L2).fm.flat()
    assert r["update_norm"] < 1e-9
    assert float((w_it - w_fp).abs().max()) < 1e-8 * float(w_fp.abs().max())
    assert float((w_fp - w_hat).norm()) > 1e-3  # the removal moved the weights


@pytest.mark.slow
def test_fixed_point_refuses_full_batch_sam_on_convex_loss(convex):
    _, _, obj = convex
    with pytest.raises(SolverError, match="no SAM fixed point"):
        solve_fixed_point(obj, obj.fm.flat(), sam_options(rho=0.05), maxiter=8)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sam_hessian", "if"])
def test_one_step_update_tracks_retraining(convex, name):
    """Remove the 4 most harmful examples by the one-step influence update and by warm-start retraining; the
    update is the exact linearisation in the removal weight: its error vanishes faster than the removal."""
    d, model, obj = convex
    est = SAMHessianEstimator(l2=L2, **SAM) if name == "sam_hessian" else IFEstimator(l2=L2)
    scores = est.scores(model, d.train, d.test)
    w_hat = obj.fm.flat()
    report = edit(model, d.train, d.test, scores, 4, lambda rows: retrain_removed(obj, w_hat, rows, SAM)[0],
                  estimator=est, random_draws=5, seed=0)
    h, S = report["harmful"], report["removed"]
    print(f"\n{name}: {h}, random {report['random']['retrained_mean']:.3e}")
    dw = removal_update(est, model, d.train, S)

    def rel_err(t):  # weight 1 − t on the removed rows (t = 1: removal)
        true = retrain_removed(obj, w_hat, S, SAM, weight=1.0 - t)[0] - w_hat
        return float((t * dw - true).norm() / true.norm())

    big, small = rel_err(1.0), rel_err(0.01)
    print(f"relative weight error: removal {big:.3e}, 1 % of it {small:.3e}")
    if name == "sam_hessian":  # same fixed point, linearised: only the second-order error remains
        assert small < 0.02 * big + 1e-6 and big < 0.5
        assert h["one_step"] == pytest.approx(h["retrained"], rel=0.3)
        assert h["one_step"] < 0 and h["predicted"] < 0
    else:  # plain IF linearises the ERM optimum, not SAM's fixed point: a first-order error stays
        assert small > 0.01
    # removing the predicted-harmful examples beats every random draw of the same size (retrained)
    assert h["retrained"] < min(r["retrained"] for r in report["random"]["draws"])


def test_replay_training_reproduces_the_run(convex):
    d, _, _ = convex
    init = TabularMLP(30, 2, seed=4)
    kw = dict(rho=0.05, l2=L2, lr=0.5, steps=6, m=None, schedule="linear", min_lr_ratio=0.1)
    ref = copy.deepcopy(init)
    train_sam(ref, d.train.X, d.train.y, **kw)
    assert torch.equal(replay_training(init, d.train, kw), Objective(ref, d.train, L2).fm.flat())
    assert not torch.equal(replay_training(init, d.train, kw, rows=[0]), Objective(ref, d.train, L2).fm.flat())


def test_rho_derivative_matches_finite_difference(convex):
    d, _, obj = convex
    w_hat = obj.fm.flat()
    dw = rho_derivative(obj, w_hat, SAM)
    h = 1e-4
    ws = [solve_fixed_point(obj, w_hat, {**SAM, "rho": SAM["rho"] + s * h}, tol=1e-13)[0] for s in (1, -1)]
    fd = (ws[0] - ws[1]) / (2 * h)
    assert float(dw @ fd / (dw.norm() * fd.norm())) > 0.999999
    assert float((dw - fd).norm() / fd.norm()) < 1e-5


def test_select_rho_predicts_validation_loss(convex):
    d, model, obj = convex
    w_hat = obj.fm.flat()
    grid = [0.03, 0.04, 0.05, 0.06, 0.07]
    out = select_rho(model, d.train, d.test, grid, SAM, L2,
                     retrain=lambda r: solve_fixed_point(obj, w_hat, {**SAM, "rho": r})[0])
    assert out["stationarity"] < 1e-11 and out["chosen"] in grid
    at0 = next(r for r in out["grid"] if r["rho"] == 0.05)
    assert at0["predicted"] == pytest.approx(at0["actual"], rel=1e-9)
    for row in out["grid"]:  # first order in ρ: small error near ρ₀
        assert row["predicted"] == pytest.approx(row["actual"], rel=2e-3)
    assert out["regret"] >= 0.0
    assert mean_loss(obj.fm, w_hat, d.test) == pytest.approx(at0["actual"], rel=1e-12)
