"""Applications of SAM influence: exact retraining oracles, model editing and ρ selection.

Removing a set S of training examples is the sample weighting c_S = 0 of the objective (`functional.Objective`,
L = (1/n) Σ c_i ℓ_i + (l2/2)‖w‖²), i.e. the upweighting δ_j = −1/n that influence functions linearise (the
same as retraining on the n − |S| rest with l2 scaled by n/(n − |S|)). Two ways to retrain:

* `solve_fixed_point` — *warm-start retraining to convergence*: from the full-data weights, solve SAM's
  stationarity F_c(w) = Σ_k π_k ∇L_k(w + e_k(w)) = 0 for the new weights (chord / Newton iterations
  w ← w − A⁻¹F_c(w) with A = ∂F/∂w, refreshed when the residual stops shrinking). The answer is defined by
  F_c = 0 alone — A only sets the speed — and its residual ‖F_c‖ is reported. It needs a SAM fixed point to
  exist: with m-sharpness (several perturbation groups) it does; full-batch normalised SAM on a strictly
  convex loss has none (see docs/sam_if.md), and the solve then raises `SolverError` with the residual.
* `replay_training` — *same-schedule retraining*: rerun `sam.train_sam` from the initial weights with the run's
  schedule and the removed rows weighted 0 (what ``plait attribute --remove`` does on a ``sam_train`` run).

Model editing (`edit`): rank training examples by their predicted effect on the test loss (Δℓ_test ≈ mean_t
score[j, t] / n for removing z_j), remove the k most harmful by (a) the one-step influence update
ŵ + (1/n) Σ_{j∈S} A⁻¹ b_j (`removal_update`) and (b) retraining, against k random examples (retrained).

ρ selection (`select_rho`): implicit differentiation of the fixed point in ρ, dŵ/dρ = −A⁻¹ ∂F/∂ρ, predicts
the validation loss L_val(ŵ + (ρ − ρ₀) dŵ/dρ) of every candidate ρ from one trained model; the prediction is
compared with the validation loss of a model retrained at each ρ.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch.func import grad, jvp, vmap

from .functional import FlatModel, Objective, as_xy, groups, perturbation
from .solvers import SolverError

SAMKw = dict  # rho, adaptive, eta, eps, m


def sam_options(rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12,
                m: int | None = None) -> SAMKw:
    return dict(rho=float(rho), adaptive=bool(adaptive), eta=float(eta), eps=float(eps), m=None if not m else int(m))


def mean_loss(fm: FlatModel, w: torch.Tensor, data: Any) -> float:
    X, y = as_xy(data)
    with torch.no_grad():
        return float(fm.losses(w, X, y).mean())


def field_and_perturbations(obj: Objective, w: torch.Tensor, sam: SAMKw) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F(w), E)``: the SAM update direction of `Objective.sam_field` and the perturbations e_k [K, p]."""
    idx, mask = groups(obj.n, sam["m"])
    gl = grad(obj.group_loss)
    G = vmap(lambda i, mk: gl(w, i, mk))(idx, mask)
    E = vmap(lambda g: perturbation(w, g, sam["rho"], sam["adaptive"], sam["eta"], sam["eps"]))(G)
    Gp = vmap(lambda e, i, mk: gl(w + e, i, mk))(E, idx, mask)
    pi = mask.sum(1) / obj.n
    return (pi.unsqueeze(1) * Gp).sum(0), E


def sam_descent(obj: Objective, w0: torch.Tensor, sam: SAMKw, lr: float, steps: int, record_every: int = 1,
                ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Full-batch SAM with plain SGD, w ← w − lr·F(w), vectorised over the m-sharpness groups (several times
    faster than `sam.train_sam` on small models; the same iterates). Returns the weights and the trajectory
    in the in-memory form of `sam.load_trajectory` (for `influence.TrajectoryEstimator`)."""
    w = w0.clone()
    rec: dict[str, list] = {"w": [], "e": [], "lr": [], "step": []}
    for k in range(steps):
        F, E = field_and_perturbations(obj, w, sam)
        if k % record_every == 0:
            rec["w"].append(w.clone())
            rec["e"].append(E)
            rec["lr"].append(lr)
            rec["step"].append(k)
        w = w - lr * F
    T = len(rec["w"])
    traj = {"weights": torch.stack(rec["w"]), "perturbations": torch.stack(rec["e"]),
            "lrs": torch.tensor(rec["lr"], dtype=torch.float64),
            "batch": torch.arange(obj.n).expand(T, obj.n).clone(), "steps": torch.tensor(rec["step"]),
            "meta": {**sam, "l2": obj.l2, "batch_size": None, "record_every": record_every, "n_train": obj.n,
                     "steps": steps, "records": T}}
    return w, traj


def solve_fixed_point(obj: Objective, w0: torch.Tensor, sam: SAMKw, A: torch.Tensor | None = None,
                      tol: float = 1e-11, maxiter: int = 60) -> tuple[torch.Tensor, dict[str, Any]]:
    """w with ‖F(w)‖ ≤ tol (F = ``obj.sam_field``; ρ = 0: ∇L), from ``w0``; ``A`` ≈ ∂F/∂w (default: at w0).

    Raises `SolverError` (with the residual) when the iteration does not converge.
    """
    field = lambda u: obj.sam_field(u, **sam)  # noqa: E731
    jac = lambda u: torch.func.jacfwd(field)(u)  # noqa: E731
    w = w0.clone()
    lu = torch.linalg.lu_factor(A if A is not None else jac(w))
    F = field(w)
    res, refreshed = float(F.norm()), 0
    it = 0
    for it in range(1, maxiter + 1):
        if res <= tol:
            it -= 1
            break
        step = torch.linalg.lu_solve(*lu, F.unsqueeze(1))[:, 0]
        w_new = w - step
        F_new = field(w_new)
        res_new = float(F_new.norm())
        if res_new < 0.5 * res:  # the chord step contracts well: keep the factorisation
            w, F, res = w_new, F_new, res_new
            continue
        # slow or diverging: Newton step with a fresh Jacobian, backtracking on ‖F‖ (far from the fixed point)
        refreshed += 1
        lu = torch.linalg.lu_factor(jac(w))
        step = torch.linalg.lu_solve(*lu, F.unsqueeze(1))[:, 0]
        for t in (2.0 ** -i for i in range(13)):
            w_new = w - t * step
            F_new = field(w_new)
            res_new = float(F_new.norm())
            if res_new < (1 - 0.25 * t) * res:
                break
        if not res_new < res:
            break
        w, F, res = w_new, F_new, res_new
    if not res <= tol:
        raise SolverError(f"fixed point: ‖F(w)‖ = {res:.3e} > tol {tol:.1e} after {it} iterations; the objective "
                          f"may have no SAM fixed point (full-batch SAM on a convex loss has none: use m-sharpness "
                          f"or same-schedule retraining)")
    return w, {"iterations": it, "residual": res, "jacobian_refreshes": refreshed}


def retrain_removed(obj: Objective, w_hat: torch.Tensor, rows, sam: SAMKw, A: torch.Tensor | None = None,
                    tol: float = 1e-11, weight: float = 0.0) -> tuple[torch.Tensor, dict[str, Any]]:
    """Warm-start retraining to the SAM fixed point with ``rows`` weighted ``weight`` (0: removed)."""
    c = obj.c.clone()
    c[torch.as_tensor(rows, dtype=torch.long)] = weight
    sub = Objective(obj.fm, (obj.X, obj.y), obj.l2, sample_weight=c)
    return solve_fixed_point(sub, w_hat, sam, A=A, tol=tol)


def removal_update(estimator, model: torch.nn.Module, train: Any, rows) -> torch.Tensor:
    """One-step influence update Δw for removing ``rows``: −(1/n) Σ_j dŵ/dδ_j (a Hessian estimator)."""
    if not hasattr(estimator, "param_influence"):
        raise ValueError(f"{type(estimator).__name__} has no parameter influence; the one-step update needs "
                         f"estimator=if or sam_hessian")
    n = as_xy(train)[0].shape[0]
    return -estimator.param_influence(model, train, rows=list(rows)).sum(1) / n


def predicted_removal_effect(scores: torch.Tensor) -> torch.Tensor:
    """Predicted change of the mean test loss when each training example is removed: mean_t score[j, t] / n."""
    return scores.mean(1) / scores.shape[0]


def harmful(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k training examples whose removal is predicted to lower the mean test loss most."""
    return torch.argsort(predicted_removal_effect(scores), stable=True)[:k]


def edit(model: torch.nn.Module, train: Any, test: Any, scores: torch.Tensor, k: int,
         retrain: Callable[[torch.Tensor], torch.Tensor], estimator=None, random_draws: int = 3, seed: int = 0
         ) -> dict[str, Any]:
    """Remove the k most harmful examples (by ``scores``) vs k random ones; test-loss changes.

    ``retrain(rows) -> weights`` is the retraining oracle (`retrain_removed` or `replay_training` bound to the
    run); ``estimator`` (if or sam_hessian) adds the one-step influence update.
    """
    fm = FlatModel(model)
    w = fm.flat()
    n = scores.shape[0]
    if not 0 < k < n:
        raise ValueError(f"remove: k must be in 1..{n - 1}, got {k}")
    base = mean_loss(fm, w, test)
    pred = predicted_removal_effect(scores)
    S = harmful(scores, k)
    out: dict[str, Any] = {"k": k, "test_loss": base, "removed": [int(j) for j in S]}
    out["harmful"] = {"predicted": float(pred[S].sum()), "retrained": mean_loss(fm, retrain(S), test) - base}
    if estimator is not None and hasattr(estimator, "param_influence"):
        out["harmful"]["one_step"] = mean_loss(fm, w + removal_update(estimator, model, train, S), test) - base
    g = torch.Generator().manual_seed(seed)
    rand = []
    for _ in range(random_draws):
        R = torch.randperm(n, generator=g)[:k]
        rand.append({"predicted": float(pred[R].sum()), "retrained": mean_loss(fm, retrain(R), test) - base})
    out["random"] = {"draws": rand, "retrained_mean": sum(r["retrained"] for r in rand) / max(1, len(rand)),
                     "predicted_mean": sum(r["predicted"] for r in rand) / max(1, len(rand))}
    return out


def replay_training(init_model: torch.nn.Module, train: Any, train_kw: dict[str, Any], rows=None) -> torch.Tensor:
    """Same-schedule retraining: `sam.train_sam` from a copy of ``init_model`` with ``rows`` weighted 0."""
    from .sam import train_sam

    X, y = as_xy(train)
    c = torch.ones(X.shape[0], dtype=X.dtype)
    if rows is not None:
        c[torch.as_tensor(rows, dtype=torch.long)] = 0.0
    m = copy.deepcopy(init_model)
    train_sam(m, X, y, sample_weight=c, **train_kw)
    return FlatModel(m).flat()


# --- ρ selection ---------------------------------------------------------------------------------------------
def rho_derivative(obj: Objective, w: torch.Tensor, sam: SAMKw, A: torch.Tensor | None = None) -> torch.Tensor:
    """dŵ/dρ = −(∂F/∂w)⁻¹ ∂F/∂ρ at a SAM fixed point ŵ (∂F/∂ρ by forward mode in ρ)."""
    rest = {k: v for k, v in sam.items() if k != "rho"}
    rho = torch.tensor(sam["rho"], dtype=w.dtype)
    _, dF = jvp(lambda r: obj.sam_field(w, rho=r, **rest), (rho,), (torch.ones_like(rho),))
    if A is None:
        A = torch.func.jacfwd(lambda u: obj.sam_field(u, **sam))(w)
    return -torch.linalg.solve(A, dF)


def select_rho(model: torch.nn.Module, train: Any, val: Any, grid, sam: SAMKw, l2: float,
               retrain: Callable[[float], torch.Tensor] | None = None) -> dict[str, Any]:
    """Predicted (and, with ``retrain(rho) -> weights``, actual) validation loss for every ρ in ``grid``.

    The model must sit at a SAM fixed point for ``sam["rho"]`` (the stationarity residual is reported).
    """
    obj = Objective(model, train, l2)
    w = obj.fm.flat()
    stat = float(obj.sam_field(w, **sam).norm())
    d = rho_derivative(obj, w, sam)
    rows = []
    for r in grid:
        row = {"rho": float(r), "predicted": mean_loss(obj.fm, w + (float(r) - sam["rho"]) * d, val)}
        if retrain is not None:
            row["actual"] = mean_loss(obj.fm, retrain(float(r)), val)
        rows.append(row)
    best = min(rows, key=lambda x: x["predicted"])
    out: dict[str, Any] = {"rho0": sam["rho"], "stationarity": stat, "grid": rows, "chosen": best["rho"]}
    if retrain is not None:
        best_actual = min(rows, key=lambda x: x["actual"])
        out.update(actual_best=best_actual["rho"], regret=best["actual"] - best_actual["actual"])
    return out
