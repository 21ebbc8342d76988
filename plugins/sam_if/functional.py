"""Flat-parameter view of a small classifier for exact influence computations (torch.func).

Everything here works on one flat parameter vector ``w`` (float64 recommended) so that Hessians, Jacobians and
Hessian-vector products of the training objective are ordinary ``torch.func`` transforms:

    L(w) = (1/n) Σ_i c_i ℓ(z_i, w) + (l2/2) ‖w‖²        (c_i = sample weights, default 1)

``ℓ`` is the per-example cross-entropy of ``model(x)`` (logits) against an integer label.

SAM's inner step is `perturbation` — the *same* function the trainer (`sam.py`) and the SAM influence
estimators (`influence.py`) call, so the influence derivation differentiates exactly what training did.

m-sharpness (``m``): the training examples are split into consecutive groups of ``m`` (`groups`), each group k has
its own loss L_k (mean over the group + the L2 term) and its own perturbation e_k; the SAM field is

    F(w) = Σ_k π_k ∇L_k(w + e(w, ∇L_k(w))),     π_k = |B_k| / n.

``m=None`` is one group (plain full-batch SAM, F(w) = ∇L(w + e(w, ∇L(w)))).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap


def as_xy(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` from a tuple/list or an object with ``X`` and ``y`` attributes."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    if hasattr(data, "X") and hasattr(data, "y"):
        return data.X, data.y
    raise TypeError(f"expected (X, y) or an object with .X and .y, got {type(data).__name__}")


def perturbation(w: torch.Tensor, g: torch.Tensor, rho: float, adaptive: bool = False, eta: float = 0.01,
                 eps: float = 1e-12) -> torch.Tensor:
    """SAM's first-order inner maximiser: e = ρ g/(‖g‖+eps); ASAM: e = ρ T²g/(‖Tg‖+eps), T = diag(|w| + η).

    (davda54/sam uses eps = 1e-12 and η = 0; Kwon et al. use η = 0.01.)
    """
    if adaptive:
        t = w.abs() + eta
        tg = t * g
        return rho * t * tg / (torch.linalg.vector_norm(tg) + eps)
    return rho * g / (torch.linalg.vector_norm(g) + eps)


def groups(n: int, m: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Consecutive groups of ``m`` indices of ``range(n)`` as ``(idx [K, m], mask [K, m])`` (last one padded)."""
    m = n if (m is None or m <= 0 or m >= n) else int(m)
    k = -(-n // m)
    flat = torch.arange(k * m)
    mask = (flat < n).to(torch.float64)
    return torch.where(flat < n, flat, torch.zeros_like(flat)).view(k, m), mask.view(k, m)


class FlatModel:
    """A module's trainable parameters as one flat vector; per-example losses and gradients via torch.func."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.buffers = dict(model.named_buffers())

    @property
    def size(self) -> int:
        return sum(self.numels)

    def flat(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def unflat(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: c.view(s) for n, c, s in zip(self.names, torch.split(w, self.numels), self.shapes)}

    def load(self, w: torch.Tensor) -> None:
        """Copy the flat vector ``w`` into the module's parameters."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in self.unflat(w).items():
                params[n].copy_(v)

    def logits(self, w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**self.unflat(w), **self.frozen, **self.buffers}, (X,))

    def losses(self, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example cross-entropy, shape [n]."""
        return torch.nn.functional.cross_entropy(self.logits(w, X), y, reduction="none")

    def example_loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.losses(w, x.unsqueeze(0), y.unsqueeze(0))[0]

    def example_grads(self, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, chunk: int | None = 256
                      ) -> torch.Tensor:
        """∇_w ℓ(z_i, w) for every row, shape [n, p]; ``w`` may also be [n, p] (one point per example)."""
        wd = 0 if w.dim() == 2 else None
        return vmap(grad(self.example_loss), in_dims=(wd, 0, 0), chunk_size=chunk)(w, X, y)


class Objective:
    """The regularised training objective of a `FlatModel` on ``(X, y)`` with optional sample weights."""

    def __init__(self, model: torch.nn.Module | FlatModel, data: Any, l2: float = 0.0,
                 sample_weight: torch.Tensor | None = None):
        self.fm = model if isinstance(model, FlatModel) else FlatModel(model)
        self.X, self.y = as_xy(data)
        self.l2 = float(l2)
        n = self.X.shape[0]
        self.c = (torch.ones(n, dtype=self.X.dtype) if sample_weight is None
                  else torch.as_tensor(sample_weight, dtype=self.X.dtype))

    @property
    def n(self) -> int:
        return self.X.shape[0]

    def reg(self, w: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.l2 * (w * w).sum()

    def loss(self, w: torch.Tensor) -> torch.Tensor:
        """L(w) = (1/n) Σ c_i ℓ_i(w) + (l2/2)‖w‖²."""
        return (self.c * self.fm.losses(w, self.X, self.y)).sum() / self.n + self.reg(w)

    def group_loss(self, w: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L_k(w) = (1/|B_k|) Σ_{i∈B_k} c_i ℓ_i(w) + (l2/2)‖w‖² (padded entries masked out)."""
        li = self.fm.losses(w, self.X[idx], self.y[idx])
        return (mask * self.c[idx] * li).sum() / mask.sum() + self.reg(w)

    def gradient(self, w: torch.Tensor) -> torch.Tensor:
        return grad(self.loss)(w)

    def hvp(self, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """H(w) v by forward-over-reverse; ``v`` may be [p] or [p, k] (columns)."""
        f = lambda u: jvp(grad(self.loss), (w,), (u,))[1]  # noqa: E731
        return f(v) if v.dim() == 1 else vmap(f, in_dims=1, out_dims=1)(v)

    def hessian(self, w: torch.Tensor) -> torch.Tensor:
        return torch.func.jacfwd(grad(self.loss))(w)

    # --- SAM ---------------------------------------------------------------------------------------------
    def sam_field(self, w: torch.Tensor, rho: float, adaptive: bool = False, eta: float = 0.01,
                  eps: float = 1e-12, m: int | None = None) -> torch.Tensor:
        """F(w) = Σ_k π_k ∇L_k(w + e(w, ∇L_k(w))): the SAM update direction (zero at a SAM fixed point)."""
        idx, mask = groups(self.n, m)
        gl = grad(self.group_loss)
        pi = mask.sum(1) / self.n

        def one(i, mk):
            e = perturbation(w, gl(w, i, mk), rho, adaptive, eta, eps)
            return gl(w + e, i, mk)

        return (pi.unsqueeze(1) * vmap(one)(idx, mask)).sum(0)

    def sam_jacobian_ops(self, w: torch.Tensor, **sam) -> tuple[Callable, Callable, Callable]:
        """``(matvec, rmatvec, dense)`` for A = ∂F/∂w: A v by jvp, Aᵀ v by vjp (columns [p, k]), dense A."""
        field = lambda u: self.sam_field(u, **sam)  # noqa: E731
        mv = lambda v: jvp(field, (w,), (v,))[1]  # noqa: E731
        _, pull = vjp(field, w)
        rmv = lambda v: pull(v)[0]  # noqa: E731

        def cols(f):
            return lambda V: f(V) if V.dim() == 1 else vmap(f, in_dims=1, out_dims=1)(V)

        return cols(mv), cols(rmv), lambda: torch.func.jacfwd(field)(w)

    def sam_rhs(self, w: torch.Tensor, X: torch.Tensor, y: torch.Tensor, rho: float, adaptive: bool = False,
                eta: float = 0.01, eps: float = 1e-12, m: int | None = None, members: torch.Tensor | None = None,
                chunk: int | None = 64) -> torch.Tensor:
        """∂F/∂δ for upweighting each row of ``(X, y)`` (rows are training examples), shape [n_rows, p]:

            b_j = ∇ℓ_j(w̃_k) + H_k(w̃_k) ∂e/∂g|_(w, g_k) ∇ℓ_j(w),    k = group of j, w̃_k = w + e_k.

        ``members[j]`` is the group of row j (default: rows are the objective's own training rows, in order).
        """
        idx, mask = groups(self.n, m)
        gl = grad(self.group_loss)
        G = vmap(lambda i, mk: gl(w, i, mk))(idx, mask)  # [K, p]
        E = vmap(lambda g: perturbation(w, g, rho, adaptive, eta, eps))(G)  # [K, p]
        if members is None:
            members = torch.arange(X.shape[0]) // idx.shape[1]
        wt = w.unsqueeze(0) + E[members]  # [n, p] perturbed point of each row's group
        g_pert = self.fm.example_grads(wt, X, y)
        g_here = self.fm.example_grads(w, X, y)
        de = lambda g, v: jvp(lambda gg: perturbation(w, gg, rho, adaptive, eta, eps), (g,), (v,))[1]  # noqa
        q = vmap(de, chunk_size=chunk)(G[members], g_here)  # ∂e/∂g · ∇ℓ_j(w)
        hv = lambda wk, i, mk, v: jvp(lambda u: gl(u, i, mk), (wk,), (v,))[1]  # noqa: E731
        Hq = vmap(hv, chunk_size=chunk)(wt, idx[members], mask[members], q)
        return g_pert + Hq
