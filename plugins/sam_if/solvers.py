"""Linear solvers on matrix-free products, for many right-hand sides at once (columns of B, shape [p, k]).

Every solver returns ``(X, info)`` with ``info = {"solver", "iterations", "residual"}`` where ``residual`` is the
largest *true* relative residual max_j ‖A x_j − b_j‖/‖b_j‖ recomputed at the end, and raises `SolverError` when it
exceeds ``tol`` — a score is never returned from an unconverged solve.

* `explicit`   — dense LU solve (tiny models);
* `cg`         — conjugate gradients (symmetric positive definite A: the Koh & Liang Hessian + damping);
* `gmres`      — restarted GMRES (any non-singular A: the non-symmetric SAM system);
* `normal_cg`  — CG on the normal equations AᵀA x = Aᵀb (needs Aᵀ products);
* `lissa`      — Agarwal et al.'s recursion h ← b + (1 − λ/s) h − H h / s, x = h/s, which solves (H + λI) x = b.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]


class SolverError(RuntimeError):
    """An iterative solve did not reach its tolerance (the message carries the residual and iterations)."""


def _as_cols(B: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (B.unsqueeze(1), True) if B.dim() == 1 else (B, False)


def true_residual(matvec: Matvec, X: torch.Tensor, B: torch.Tensor) -> float:
    bn = B.norm(dim=0).clamp_min(torch.finfo(B.dtype).tiny)
    return float(((matvec(X) - B).norm(dim=0) / bn).max()) if B.shape[1] else 0.0


def _finish(name: str, matvec: Matvec, X, B, tol, iters, squeeze, extra=""):
    res = true_residual(matvec, X, B)
    info = {"solver": name, "iterations": int(iters), "residual": res}
    if not res <= tol:  # also catches nan
        raise SolverError(f"{name} did not converge: relative residual {res:.3e} > tol {tol:.1e} after {iters} "
                          f"iterations{extra}; raise maxiter/depth, add damping, or use solver=explicit")
    return (X[:, 0] if squeeze else X), info


def explicit(A: torch.Tensor, B: torch.Tensor, tol: float = 1e-8) -> tuple[torch.Tensor, dict]:
    B, sq = _as_cols(B)
    X = torch.linalg.solve(A, B)
    return _finish("explicit", lambda V: A @ V, X, B, tol, 1, sq, " (the matrix is singular or ill-conditioned)")


def cg(matvec: Matvec, B: torch.Tensor, tol: float = 1e-8, maxiter: int = 1000) -> tuple[torch.Tensor, dict]:
    B, sq = _as_cols(B)
    tiny = torch.finfo(B.dtype).tiny
    bn = B.norm(dim=0).clamp_min(tiny)
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rs = (R * R).sum(0)
    it = 0
    for it in range(1, maxiter + 1):
        if float((rs.sqrt() / bn).max()) <= 0.25 * tol:
            it -= 1
            break
        AP = matvec(P)
        pap = (P * AP).sum(0)
        alpha = torch.where(pap.abs() > tiny, rs / torch.where(pap.abs() > tiny, pap, 1.0), 0.0)
        X = X + alpha * P
        R = R - alpha * AP
        rs_new = (R * R).sum(0)
        P = R + torch.where(rs > tiny, rs_new / torch.where(rs > tiny, rs, 1.0), 0.0) * P
        rs = rs_new
    return _finish("cg", matvec, X, B, tol, it, sq)


def gmres(matvec: Matvec, B: torch.Tensor, tol: float = 1e-8, restart: int = 60, maxiter: int = 600
          ) -> tuple[torch.Tensor, dict]:
    """Restarted GMRES(restart) with modified Gram–Schmidt (twice), batched over columns."""
    B, sq = _as_cols(B)
    p, k = B.shape
    tiny = torch.finfo(B.dtype).tiny
    bn = B.norm(dim=0).clamp_min(tiny)
    X = torch.zeros_like(B)
    total = 0
    while total < maxiter:
        R = B - matvec(X)
        beta = R.norm(dim=0)
        if float((beta / bn).max()) <= 0.25 * tol:
            break
        V = [R / beta.clamp_min(tiny)]
        H = torch.zeros(k, restart + 1, restart, dtype=B.dtype)
        y = None
        for j in range(min(restart, maxiter - total)):
            w = matvec(V[j])
            total += 1
            for _ in range(2):
                for i in range(j + 1):
                    h = (V[i] * w).sum(0)
                    H[:, i, j] += h
                    w = w - h * V[i]
            hn = w.norm(dim=0)
            H[:, j + 1, j] = hn
            V.append(w / hn.clamp_min(tiny))
            rhs = torch.zeros(k, j + 2, 1, dtype=B.dtype)
            rhs[:, 0, 0] = beta
            Hj = H[:, :j + 2, :j + 1]
            y = torch.linalg.lstsq(Hj, rhs).solution  # [k, j+1, 1]
            res = (rhs - Hj @ y).norm(dim=(1, 2)) / bn
            if float(res.max()) <= 0.25 * tol:
                break
        X = X + torch.einsum("jpk,kj->pk", torch.stack(V[:y.shape[1]]), y[:, :, 0])
    return _finish("gmres", matvec, X, B, tol, total, sq)


def normal_cg(matvec: Matvec, rmatvec: Matvec, B: torch.Tensor, tol: float = 1e-8, maxiter: int = 2000
              ) -> tuple[torch.Tensor, dict]:
    """Solve A x = b through AᵀA x = Aᵀ b (CG); the returned residual is that of the original system."""
    B, sq = _as_cols(B)
    inner_tol = tol * 1e-3  # squares the condition number: ask the inner solve for more
    try:
        X, info = cg(lambda V: rmatvec(matvec(V)), rmatvec(B), tol=inner_tol, maxiter=maxiter)
    except SolverError:
        X, info = _unchecked_cg(lambda V: rmatvec(matvec(V)), rmatvec(B), maxiter), {"iterations": maxiter}
    return _finish("normal_cg", matvec, X, B, tol, info["iterations"], sq)


def _unchecked_cg(matvec, B, maxiter):
    X = torch.zeros_like(B)
    R, rs = B.clone(), (B * B).sum(0)
    P = R.clone()
    for _ in range(maxiter):
        AP = matvec(P)
        alpha = rs / (P * AP).sum(0).clamp_min(torch.finfo(B.dtype).tiny)
        X, R = X + alpha * P, R - alpha * AP
        rs_new = (R * R).sum(0)
        P, rs = R + rs_new / rs.clamp_min(torch.finfo(B.dtype).tiny) * P, rs_new
    return X


def power_iteration(matvec: Matvec, p: int, dtype=torch.float64, iters: int = 50, seed: int = 0) -> float:
    """Largest eigenvalue magnitude of a symmetric operator (an estimate from below)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(p, 1, generator=g, dtype=dtype)
    v /= v.norm()
    lam = 0.0
    for _ in range(iters):
        w = matvec(v)
        lam = float(w.norm())
        v = w / max(lam, torch.finfo(dtype).tiny)
    return lam


def lissa(hvp: Matvec, B: torch.Tensor, damping: float = 0.0, scale: float | None = None, depth: int = 20000,
          tol: float = 1e-8, check_every: int = 50, sample_hvp: Callable[[int], Matvec] | None = None
          ) -> tuple[torch.Tensor, dict]:
    """LiSSA for (H + λI) x = b: h_0 = b, h_j = b + (1 − λ/s) h_{j−1} − H̃_j h_{j−1} / s, x = h/s.

    ``hvp`` is the full (deterministic) H product, used for the convergence check; ``sample_hvp(j)`` optionally
    returns a minibatch H̃_j product (stochastic LiSSA; it then converges only in expectation — loosen ``tol``).
    ``scale`` s defaults to 0.6 (λ_max + λ) from a power iteration (the recursion needs s > (λ_max + λ)/2).
    """
    B, sq = _as_cols(B)
    if scale is None:
        scale = 0.6 * (power_iteration(hvp, B.shape[0], B.dtype) + damping)
    damped = lambda V: hvp(V) + damping * V  # noqa: E731
    h = B.clone()
    j = 0
    for j in range(1, depth + 1):
        Hh = (sample_hvp(j) if sample_hvp is not None else hvp)(h)
        h = B + (1.0 - damping / scale) * h - Hh / scale
        if j % check_every == 0:
            res = true_residual(damped, h / scale, B)
            if res <= tol or not res < 1e30:
                break
    return _finish("lissa", damped, h / scale, B, tol, j, sq, f" (scale {scale:.3g}, damping {damping:.3g})")
