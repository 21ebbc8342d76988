"""EK-FAC influence on chosen ``nn.Linear`` modules (George et al. 2018; Grosse et al. 2023, as kronfluence).

    est = EKFACEstimator(params=["2"], damping=1e-3, loss="ce")
    est.scores(model, (X, y), (Xt, yt))   # [n_train, n_test]
    est.self_influence(model, (X, y))     # [n_train]

For each selected linear layer (``params:`` fnmatch patterns on *module* names; ``*`` = every Linear) with input
a (bias appended as a 1) and output s-gradient, the Fisher / GGN block is approximated as
A ⊗ S, A = E[a aᵀ], S = E[s sᵀ], with the eigenbases Q_A, Q_S and the *eigenvalue correction*
Λ_ij = E[((Q_Sᵀ s)_i (Q_Aᵀ a)_j)²] (EK-FAC). The inverse applied to a gradient G (out × in+1) is
Q_S ((Q_Sᵀ G Q_A) / (Λ + λ)) Q_Aᵀ and score[j, t] = Σ_layers ⟨(F̂ + λI)⁻¹ G_j, G_t⟩ (Koh & Liang sign: > 0 is a
proponent). The expectations over the model's predictive distribution are taken *exactly*, not by sampling
labels: for cross-entropy E_y[r rᵀ] = diag(p) − p pᵀ for the logits gradient r, for ``mse`` (ℓ = ½‖z − y‖²) the
identity, and each class direction is back-propagated to every chosen layer (one backward per logit);
``fisher: empirical`` uses the true labels' gradients instead (kronfluence's ``use_empirical_fisher``). Block
diagonal across layers, as kronfluence. The logits must be [n, outputs] (one prediction per example); a chosen
layer may see [n, features] or [n, positions, features] (a transformer block's tokens): then an example's
gradient is the sum over its positions G = Σ_t s_t a_tᵀ, A and S sum a aᵀ and s sᵀ over positions (they give
the eigenbases only) and Λ is taken from the per-example G, as kronfluence does for sequences.

``damping`` λ is absolute; ``damping_ratio`` (kronfluence's heuristic: 0.1 × mean(Λ) per layer) adds to it.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch

from .functional import as_xy

LOSSES = ("ce", "mse")


class EKFACEstimator:
    def __init__(self, params: Sequence[str] = ("*",), damping: float = 1e-3, damping_ratio: float = 0.0,
                 loss: str = "ce", batch_size: int = 256, fisher: str = "true"):
        if fisher not in ("true", "empirical"):
            raise ValueError(f"fisher: {fisher!r} is not supported; allowed: true, empirical")
        if loss not in LOSSES:
            raise ValueError(f"loss: {loss!r} is not supported; allowed: {', '.join(LOSSES)}")
        if damping < 0 or damping_ratio < 0:
            raise ValueError(f"damping: must be >= 0, got {damping} (damping_ratio {damping_ratio})")
        self.params, self.damping, self.damping_ratio = list(params) or ["*"], float(damping), float(damping_ratio)
        self.loss, self.batch_size, self.fisher = loss, int(batch_size), fisher
        self.last_info: dict[str, Any] = {}

    # --- layers and per-example quantities ---------------------------------------------------------------
    def _layers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
        layers = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and any(fnmatch.fnmatchcase(n, p) for p in self.params)]
        if not layers:
            names = [n or "<root>" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            raise ValueError(f"params: {self.params} match no Linear module (Linear modules: "
                             f"{', '.join(names) or 'none'})")
        return layers

    def _capture(self, model, layers, X):
        """Forward with hooks: each layer's augmented input [n, in+1] and output (in the graph), and the logits."""
        ins, outs, handles = {}, {}, []
        for name, mod in layers:
            def hook(m, args, out, name=name):
                a = args[0].detach()
                if m.bias is not None:
                    a = torch.cat([a, torch.ones(*a.shape[:-1], 1, dtype=a.dtype)], -1)
                ins[name], outs[name] = a, out
            handles.append(mod.register_forward_hook(hook))
        try:
            logits = model(X)
        finally:
            for h in handles:
                h.remove()
        missing = [name for name, _ in layers if name not in ins]
        if missing:
            raise ValueError(f"params: module(s) {', '.join(missing)} are not called as modules in the forward "
                             f"(e.g. MultiheadAttention's out_proj); choose other Linear modules")
        if logits.dim() != 2 or any(a.dim() not in (2, 3) for a in ins.values()):
            raise ValueError("ekfac: needs [n, outputs] logits (one prediction per example) and layer inputs of "
                             "[n, features] or [n, positions, features]")
        return ins, outs, logits

    def _pseudo(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """L [n, C, C] with L Lᵀ = E_y[r rᵀ | x] (r = ∂ℓ/∂logits); empirical Fisher: r itself, [n, C, 1]."""
        n, C = logits.shape
        if self.fisher == "empirical":
            return self._real(logits, y).unsqueeze(2)
        if self.loss == "mse":
            return torch.eye(C, dtype=logits.dtype).expand(n, C, C)
        p = torch.softmax(logits.detach(), 1)
        cov = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
        ev, Q = torch.linalg.eigh(cov)
        return Q * ev.clamp_min(0).sqrt().unsqueeze(1)

    def _real(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """r_j = ∂ℓ_j/∂logits_j with the true labels, [n, C]."""
        if self.loss == "mse":
            return logits.detach() - y.to(logits.dtype)
        return torch.softmax(logits.detach(), 1) - torch.nn.functional.one_hot(y, logits.shape[1]).to(logits.dtype)

    def _output_grads(self, model, layers, X, y):
        """Per batch and pseudo-gradient column c: (layer inputs, c, output gradients of each layer)."""
        for start in range(0, X.shape[0], self.batch_size):
            ins, outs, logits = self._capture(model, layers, X[start:start + self.batch_size])
            Ls = self._pseudo(logits, y[start:start + self.batch_size])
            for c in range(Ls.shape[2]):
                gs = torch.autograd.grad(logits, [outs[nm] for nm, _ in layers], grad_outputs=Ls[:, :, c],
                                         retain_graph=True)
                yield ins, c, gs

    def _fit(self, model, X, y) -> dict[str, dict[str, torch.Tensor]]:
        layers = self._layers(model)
        stats: dict[str, dict[str, torch.Tensor]] = {}
        n = X.shape[0]
        # pass 1: A and S
        for ins, c, gs in self._output_grads(model, layers, X, y):
            for (nm, _), s in zip(layers, gs):
                st = stats.setdefault(nm, {"A": 0.0, "S": 0.0})
                s2, a2 = s.reshape(-1, s.shape[-1]), ins[nm].reshape(-1, ins[nm].shape[-1])  # positions as rows
                st["S"] = st["S"] + s2.T @ s2 / n
                if c == 0:
                    st["A"] = st["A"] + a2.T @ a2 / n
        for st in stats.values():
            st["eA"], st["QA"] = torch.linalg.eigh(st["A"])
            st["eS"], st["QS"] = torch.linalg.eigh(st["S"])
            st["L"] = 0.0
        # pass 2: the eigenvalue correction
        for ins, _, gs in self._output_grads(model, layers, X, y):
            for (nm, _), s in zip(layers, gs):
                st = stats[nm]
                if s.dim() == 2:  # one position: (Q_Sᵀ s aᵀ Q_A)² factorises
                    st["L"] = st["L"] + ((s @ st["QS"]) ** 2).T @ ((ins[nm] @ st["QA"]) ** 2) / n
                else:  # per-example G = Σ_t s_t a_tᵀ, rotated: Σ_t (Q_Sᵀ s_t)(Q_Aᵀ a_t)ᵀ
                    rot = torch.einsum("nto,nti->noi", s @ st["QS"], ins[nm] @ st["QA"])
                    st["L"] = st["L"] + (rot ** 2).sum(0) / n
        return stats

    def _grads(self, model, X, y) -> dict[str, torch.Tensor]:
        """Per-example gradients of each chosen layer [n, out, in+1] (weight | bias columns; summed over positions)."""
        layers = self._layers(model)
        ins, outs, logits = self._capture(model, layers, X)
        r = self._real(logits, y)
        gs = torch.autograd.grad(logits, [outs[nm] for nm, _ in layers], grad_outputs=r)
        return {nm: s.unsqueeze(2) * ins[nm].unsqueeze(1) if s.dim() == 2 else torch.einsum("nto,nti->noi", s, ins[nm])
                for (nm, _), s in zip(layers, gs)}

    def _precondition(self, stats, G: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        info = {}
        for nm, g in G.items():
            st = stats[nm]
            lam = self.damping + self.damping_ratio * float(st["L"].mean())
            rot = st["QS"].T @ g @ st["QA"]
            out[nm] = st["QS"] @ (rot / (st["L"] + lam)) @ st["QA"].T
            info[nm] = lam
        self.last_info = {"layers": list(G), "damping": info}
        return out

    # --- estimator interface ---------------------------------------------------------------------------
    def scores(self, model: torch.nn.Module, train: Any, test: Any) -> torch.Tensor:
        X, y = as_xy(train)
        Xt, yt = as_xy(test)
        stats = self._fit(model, X, y)
        Gtr = self._precondition(stats, self._grads(model, X, y))
        Gte = self._grads(model, Xt, yt)
        return sum(Gtr[nm].flatten(1) @ Gte[nm].flatten(1).T for nm in Gtr)

    def self_influence(self, model: torch.nn.Module, train: Any) -> torch.Tensor:
        X, y = as_xy(train)
        stats = self._fit(model, X, y)
        G = self._grads(model, X, y)
        P = self._precondition(stats, G)
        return sum((P[nm] * G[nm]).flatten(1).sum(1) for nm in G)
