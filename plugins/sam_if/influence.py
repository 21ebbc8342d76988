"""Influence estimators for models trained with SAM/ASAM (and plain training), behind one interface:

    est.scores(model, train, test)    -> Tensor [n_train, n_test]
    est.self_influence(model, train)  -> Tensor [n_train]
    est.last_info                     -> dict (solver, iterations, residual, stationarity residual, ...)

``train`` / ``test`` are ``(X, y)`` or objects with ``.X`` / ``.y``; the loss is per-example cross-entropy of the
model's logits, and the training objective is L(w) = (1/n) Σ ℓ_i(w) + (l2/2)‖w‖² (``l2`` must match training).

**Sign and scale (all estimators).** ``score[j, t] > 0`` means z_j is a *proponent* of z_t: training on it lowers
ℓ(z_t). For the Hessian estimators score = −dℓ_t/dδ_j (δ_j = upweighting of z_j in L), so removing z_j changes the
test loss by ≈ ``score / n``; TracIn-style scores are normalised the same way (full batch: the TracIn sum itself).
``self_influence[j]`` is score[j, j]: high = the example is hard to fit from the rest (likely mislabelled).

Estimators
* `IFEstimator` (``if``): Koh & Liang, A = H(ŵ) + λI; solvers explicit | cg | gmres | lissa.
* `SAMHessianEstimator` (``sam_hessian``): implicit differentiation of SAM's fixed point
  F(w, δ) = ∇L_δ(w + e_δ(w)) = 0 with the *data-dependent* perturbation (research note B3, generalised to
  m-sharpness groups): A = ∂F/∂w (+λI; = H(w̃)(I + J) for one group), b_j = ∇ℓ_j(w̃) + H(w̃) ∂e/∂g ∇ℓ_j(ŵ),
  dŵ/dδ_j = −A⁻¹ b_j. A is not symmetric: solvers explicit | gmres | normal_cg (products by jvp / vjp).
  ``variant="naive"`` freezes e: A = H(w̃), b_j = ∇ℓ_j(w̃). ρ = 0 reduces exactly to ``if``.
  Caveat (Bartlett et al. 2210.01513): for a strictly convex loss, full-batch normalised SAM has *no* fixed
  point with g ≠ 0 (e·g > 0 contradicts monotonicity of ∇L), so ‖F(ŵ)‖ cannot vanish; it is reported as
  ``last_info["stationarity"]``. With m-sharpness (several groups) a fixed point exists for small ρ.
* `TrajectoryEstimator` (``tracin``, ``sam_trajectory``): from a trajectory recorded by `sam.train_sam`:
  Σ_t ω_t ∇ℓ_t(w_t)·∇ℓ_j(w̃_t) (TracIn-CP with SAM's perturbed training gradient); ``sam_trajectory`` adds the
  e-coupling term ω_t ∇ℓ_t(w_t)ᵀ H_B(w̃_t) ∂e/∂g ∇ℓ_j(w_t) and counts only steps whose batch holds z_j
  (ω_t = η_t · n/|B_t|, the first-order same-noise leave-one-out change times n).
  **Momentum** (``momentum`` in the trajectory's metadata, torch SGD b ← μ b + g, w ← w − η b): each example's
  training vector v_j,t (its weighted gradient, plus the coupling vector) goes through its own momentum buffer,
  b_j,t = μ b_j,t−1 + v_j,t, and the score is Σ_t η_t ∇ℓ_test(w_t)·b_j,t — the part of each step's movement that
  z_j caused, dotted with the test gradient there (μ = 0: the SGD sum above). Steps between recorded ones
  (``record_every`` / ``every`` > 1) hold the recorded vectors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.func import grad, jvp, vmap

from . import solvers
from .functional import FlatModel, Objective, as_xy, perturbation
from .sam import load_trajectory

_SYM_SOLVERS = ("explicit", "cg", "gmres", "lissa")
_NONSYM_SOLVERS = ("explicit", "gmres", "normal_cg")


class _Hessian:
    def __init__(self, l2: float = 0.0, damping: float = 0.0, solver: str = "explicit", tol: float = 1e-8,
                 maxiter: int = 1000, restart: int = 60):
        self.l2, self.damping, self.solver = float(l2), float(damping), solver
        self.tol, self.maxiter, self.restart = float(tol), int(maxiter), int(restart)
        self.last_info: dict[str, Any] = {}

    def _test_grads(self, obj: Objective, w: torch.Tensor, test: Any) -> torch.Tensor:
        X, y = as_xy(test)
        return obj.fm.example_grads(w, X, y)

    def scores(self, model: torch.nn.Module, train: Any, test: Any) -> torch.Tensor:
        obj, w = self._setup(model, train)
        Y = self._solve(obj, w, self._test_grads(obj, w, test).T, transpose=True)  # A⁻ᵀ ∇ℓ_test
        return self._rhs(obj, w) @ Y

    def self_influence(self, model: torch.nn.Module, train: Any) -> torch.Tensor:
        obj, w = self._setup(model, train)
        Xs = self._solve(obj, w, self._rhs(obj, w).T, transpose=False)  # A⁻¹ b_j
        return (obj.fm.example_grads(w, obj.X, obj.y) * Xs.T).sum(1)

    def param_influence(self, model: torch.nn.Module, train: Any, rows: Any = None) -> torch.Tensor:
        """dŵ/dδ_j = −A⁻¹ b_j for the chosen training rows (default all), shape [p, n_rows]."""
        obj, w = self._setup(model, train)
        B = self._rhs(obj, w)
        if rows is not None:
            B = B[torch.as_tensor(rows, dtype=torch.long)]
        return -self._solve(obj, w, B.T, transpose=False)

    def _setup(self, model, train):
        obj = Objective(model, train, self.l2)
        return obj, obj.fm.flat()


class IFEstimator(_Hessian):
    """Koh & Liang influence: score[j, t] = ∇ℓ_t(ŵ)ᵀ (H + λI)⁻¹ ∇ℓ_j(ŵ)."""

    def __init__(self, l2: float = 0.0, damping: float = 0.0, solver: str = "explicit", tol: float = 1e-8,
                 maxiter: int = 1000, restart: int = 60, lissa_scale: float | None = None,
                 lissa_depth: int = 20000, lissa_batch_size: int | None = None, seed: int = 0):
        if solver not in _SYM_SOLVERS:
            raise ValueError(f"if: solver must be one of {', '.join(_SYM_SOLVERS)}, got {solver!r}")
        super().__init__(l2, damping, solver, tol, maxiter, restart)
        self.lissa_scale, self.lissa_depth = lissa_scale, int(lissa_depth)
        self.lissa_batch_size, self.seed = lissa_batch_size, seed

    def _rhs(self, obj, w):
        return obj.fm.example_grads(w, obj.X, obj.y)

    def _solve(self, obj: Objective, w: torch.Tensor, B: torch.Tensor, transpose: bool) -> torch.Tensor:
        lam = self.damping
        if self.solver == "explicit":
            H = obj.hessian(w)
            X, info = solvers.explicit(H + lam * torch.eye(H.shape[0], dtype=H.dtype), B, self.tol)
        elif self.solver == "lissa":
            sample = None
            if self.lissa_batch_size:
                gen = torch.Generator().manual_seed(self.seed)

                def sample(_j):
                    idx = torch.randperm(obj.n, generator=gen)[:self.lissa_batch_size]
                    sub = Objective(obj.fm, (obj.X[idx], obj.y[idx]), obj.l2)
                    return lambda V: sub.hvp(w, V)
            X, info = solvers.lissa(lambda V: obj.hvp(w, V), B, lam, self.lissa_scale, self.lissa_depth,
                                    self.tol, sample_hvp=sample)
        else:
            mv = lambda V: obj.hvp(w, V) + lam * V  # noqa: E731
            if self.solver == "cg":
                X, info = solvers.cg(mv, B, self.tol, self.maxiter)
            else:
                X, info = solvers.gmres(mv, B, self.tol, self.restart, self.maxiter)
        self.last_info = {**info, "grad_norm": float(obj.gradient(w).norm())}
        return X


class SAMHessianEstimator(_Hessian):
    """Closed-form SAM influence at the final weights (see the module docstring)."""

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01, eps: float = 1e-12,
                 m: int | None = None, variant: str = "full", l2: float = 0.0, damping: float = 0.0,
                 solver: str = "explicit", tol: float = 1e-8, maxiter: int = 1000, restart: int = 60,
                 max_stationarity: float | None = None):
        if solver not in _NONSYM_SOLVERS:
            raise ValueError(f"sam_hessian: solver must be one of {', '.join(_NONSYM_SOLVERS)}, got {solver!r}")
        if variant not in ("full", "naive"):
            raise ValueError(f"sam_hessian: variant must be full | naive, got {variant!r}")
        super().__init__(l2, damping, solver, tol, maxiter, restart)
        self.sam = dict(rho=float(rho), adaptive=bool(adaptive), eta=float(eta), eps=float(eps),
                        m=None if not m else int(m))
        self.variant, self.max_stationarity = variant, max_stationarity

    def stationarity(self, model: torch.nn.Module, train: Any) -> dict[str, float]:
        """‖F(ŵ)‖ (the SAM update direction; 0 at a fixed point), relative to ‖∇L(ŵ)‖ and to ‖∇L(w̃)‖ scale."""
        obj = Objective(model, train, self.l2)
        w = obj.fm.flat()
        F = obj.sam_field(w, **self.sam)
        g = obj.gradient(w)
        return {"stationarity": float(F.norm()), "grad_norm": float(g.norm()),
                "stationarity_rel": float(F.norm() / g.norm().clamp_min(1e-300))}

    def _setup(self, model, train):
        obj, w = super()._setup(model, train)
        st = self.stationarity(model, train)
        self._stat = st
        if self.max_stationarity is not None and st["stationarity"] > self.max_stationarity:
            raise ValueError(f"sam_hessian: ‖F(ŵ)‖ = {st['stationarity']:.3e} > max_stationarity "
                             f"{self.max_stationarity:.1e}: the weights are not a SAM fixed point (train longer "
                             f"with a decaying lr, or use m-sharpness / a trajectory estimator)")
        return obj, w

    def _perturbed(self, obj, w):
        s = self.sam
        return w + perturbation(w, obj.gradient(w), s["rho"], s["adaptive"], s["eta"], s["eps"])

    def _rhs(self, obj, w):
        if self.variant == "naive":
            return obj.fm.example_grads(self._perturbed(obj, w), obj.X, obj.y)
        return obj.sam_rhs(w, obj.X, obj.y, **self.sam)

    def _solve(self, obj: Objective, w: torch.Tensor, B: torch.Tensor, transpose: bool) -> torch.Tensor:
        lam = self.damping
        if self.variant == "naive":
            wt = self._perturbed(obj, w)
            mv0 = lambda V: obj.hvp(wt, V)  # noqa: E731
            rmv0 = mv0
            dense = lambda: obj.hessian(wt)  # noqa: E731
        else:
            mv0, rmv0, dense = obj.sam_jacobian_ops(w, **self.sam)
        mv = lambda V: mv0(V) + lam * V  # noqa: E731
        rmv = lambda V: rmv0(V) + lam * V  # noqa: E731
        if transpose:
            mv, rmv = rmv, mv
        if self.solver == "explicit":
            A = dense() + lam * torch.eye(w.numel(), dtype=w.dtype)
            X, info = solvers.explicit(A.T if transpose else A, B, self.tol)
        elif self.solver == "gmres":
            X, info = solvers.gmres(mv, B, self.tol, self.restart, self.maxiter)
        else:
            X, info = solvers.normal_cg(mv, rmv, B, self.tol, self.maxiter)
        self.last_info = {**info, **self._stat}
        return X


class TrajectoryEstimator:
    """TracIn-CP over a recorded SAM trajectory; ``coupling=True`` adds the perturbation's data dependence."""

    def __init__(self, trajectory: str | Path | dict | None = None, perturbed: bool = True,
                 in_batch: bool = False, coupling: bool = False, l2: float | None = None, every: int = 1):
        self.trajectory, self.perturbed, self.in_batch = trajectory, perturbed, in_batch
        self.coupling, self.l2, self.every = coupling, l2, max(1, int(every))
        self.last_info: dict[str, Any] = {}

    def _traj(self) -> dict:
        if self.trajectory is None or self.trajectory == "":
            raise ValueError("tracin: no trajectory (set `trajectory:` to a directory written by train_sam)")
        if isinstance(self.trajectory, dict):
            return self.trajectory
        return load_trajectory(self.trajectory)

    def scores(self, model: torch.nn.Module, train: Any, test: Any) -> torch.Tensor:
        return self._run(model, train, test)

    def self_influence(self, model: torch.nn.Module, train: Any) -> torch.Tensor:
        return self._run(model, train, None)

    def _run(self, model, train, test):
        tr = self._traj()
        meta = tr["meta"]
        fm = FlatModel(model)
        X, y = as_xy(train)
        n = X.shape[0]
        if meta.get("n_train", n) != n:
            raise ValueError(f"tracin: the trajectory was recorded on {meta['n_train']} examples, got {n}")
        l2 = meta.get("l2", 0.0) if self.l2 is None else self.l2
        sam = dict(rho=meta["rho"], adaptive=meta["adaptive"], eta=meta["eta"], eps=meta["eps"])
        m, every = meta.get("m"), meta.get("record_every", 1)
        Xt, yt = as_xy(test) if test is not None else (X, y)
        out = torch.zeros(n, Xt.shape[0] if test is not None else 1, dtype=X.dtype)
        obj = Objective(fm, (X, y), l2)
        gl = grad(obj.group_loss)
        T = tr["weights"].shape[0]
        used = 0
        mu = float(meta.get("momentum", 0.0) or 0.0)
        buf = torch.zeros(n, fm.size, dtype=X.dtype) if mu > 0 else None
        for t in range(0, T, self.every):
            w = tr["weights"][t].to(X.dtype)
            batch = tr["batch"][t]
            batch = batch[batch >= 0]
            lr = float(tr["lrs"][t]) * every * self.every
            pos = torch.full((n,), -1, dtype=torch.long)
            pos[batch] = torch.arange(len(batch))
            in_b = pos >= 0
            mm = len(batch) if (m is None or m >= len(batch)) else m
            grp = torch.where(in_b, pos // mm, torch.zeros_like(pos))  # rows outside the batch: group 0's e
            weight = (lr * n / len(batch)) * in_b.to(X.dtype) if self.in_batch else torch.full((n,), lr,
                                                                                                dtype=X.dtype)
            E = tr["perturbations"][t].to(X.dtype)
            wt = w.unsqueeze(0) + E[grp] if self.perturbed else w.unsqueeze(0).expand(n, -1)
            g_train = fm.example_grads(wt, X, y)
            g_test = fm.example_grads(w, Xt, yt) if test is not None else fm.example_grads(w, X, y)
            if mu > 0:  # the momentum buffer of each example's training vector, stepped once per SGD step
                V = g_train
                if self.coupling and sam["rho"] > 0:
                    V = V + self._coupling(fm, obj, gl, w, X, y, batch, mm, grp, None, True, sam, vectors=True)
                c = (n / len(batch)) * in_b.to(X.dtype) if self.in_batch else torch.ones(n, dtype=X.dtype)
                for _ in range(every * self.every):  # unrecorded steps: the recorded vectors held
                    buf = mu * buf + c.unsqueeze(1) * V
                    step_lr = float(tr["lrs"][t])
                    out += step_lr * (buf @ g_test.T if test is not None else (buf * g_test).sum(1, keepdim=True))
                used += 1
                continue
            if test is not None:
                contrib = g_train @ g_test.T
            else:
                contrib = (g_train * g_test).sum(1, keepdim=True)
            if self.coupling and sam["rho"] > 0:
                contrib = contrib + self._coupling(fm, obj, gl, w, X, y, batch, mm, grp, g_test, test is None, sam)
            out += weight.unsqueeze(1) * contrib
            used += 1
        self.last_info = {"checkpoints": used, "momentum": mu}
        return out if test is not None else out[:, 0]

    @staticmethod
    def _coupling(fm, obj, gl, w, X, y, batch, mm, grp, g_test, self_mode, sam, vectors=False):
        """∇ℓ_t(w)ᵀ H_k(w̃_k) ∂e/∂g|_(w, g_k) ∇ℓ_j(w) for every row j (k = its group), [n, n_test] or [n, 1];
        ``vectors=True``: the training-side vectors H_k(w̃_k) ∂e/∂g ∇ℓ_j(w) themselves, [n, p]."""
        K = -(-len(batch) // mm)
        idx = [batch[k * mm:(k + 1) * mm] for k in range(K)]
        g_here = fm.example_grads(w, X, y)
        if vectors:
            out = torch.zeros(X.shape[0], w.numel(), dtype=X.dtype)
        else:
            out = torch.zeros(X.shape[0], 1 if self_mode else g_test.shape[0], dtype=X.dtype)
        for k in range(K):
            ones = torch.ones(len(idx[k]), dtype=X.dtype)
            gk = gl(w, idx[k], ones)
            wt = w + perturbation(w, gk, **sam)
            rows = (grp == k).nonzero().flatten()
            de = lambda v: jvp(lambda gg: perturbation(w, gg, **sam), (gk,), (v,))[1]  # noqa: E731
            q = vmap(de)(g_here[rows])  # [r, p]
            hv = lambda v: jvp(lambda u: gl(u, idx[k], ones), (wt,), (v,))[1]  # noqa: E731
            if vectors:
                out[rows] = vmap(hv)(q)
            elif self_mode:
                Hq = vmap(hv)(q)
                out[rows, 0] = (g_test[rows] * Hq).sum(1)
            else:
                Ht = vmap(hv)(g_test)  # H symmetric: ∇ℓ_tᵀ H q = (H ∇ℓ_t)ᵀ q
                out[rows] = q @ Ht.T
        return out

