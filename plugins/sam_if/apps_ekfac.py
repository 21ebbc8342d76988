"""EK-FAC influence on chosen ``nn.Linear`` modules of any model whose per-example loss is a black box
(``plait attribute RUN estimator=ekfac`` on sft / classify runs, at the run's final weights).

`ekfac.EKFACEstimator` needs [n, features] inputs and the logits (it takes the Fisher's expectation over the
model's labels exactly). Here the loss of example i is ``loss_of(model, i)`` (a recipe's ``sample_losses``), so
sequence and patch inputs work: per example and chosen layer, the inputs a_p (bias appended as a 1) and output
gradients s_p = ∂ℓ_i/∂out_p at every position p give the per-example gradient G_i = Σ_p s_p a_pᵀ, and the factors
are A = (1/n) Σ_i Σ_p a_p a_pᵀ, S = (1/n) Σ_i Σ_p s_p s_pᵀ — the *empirical* Fisher (the true labels' gradients,
kronfluence's ``use_empirical_fisher``; a black-box loss has no labels to sample). With eigenbases Q_A, Q_S and
the eigenvalue correction Λ = (1/n) Σ_i (Q_Sᵀ G_i Q_A)² (EK-FAC), score[j, t] = Σ_layers ⟨Q_S ((Q_Sᵀ G_j Q_A) /
(Λ + λ)) Q_Aᵀ, G_t⟩ (> 0: a proponent). With one position per example this is `EKFACEstimator(fisher=
"empirical")` exactly (tested); as λ → ∞, λ·score → G_j·G_t.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any

import torch

OPTIONS = {"params": list, "damping": float, "damping_ratio": float, "n": int}


class AnyEKFAC:
    def __init__(self, params: Sequence[str] = ("*",), damping: float = 1e-3, damping_ratio: float = 0.0):
        if damping < 0 or damping_ratio < 0:
            raise ValueError(f"damping: must be >= 0, got {damping} (damping_ratio {damping_ratio})")
        self.params, self.damping, self.damping_ratio = list(params) or ["*"], float(damping), float(damping_ratio)
        self.last_info: dict[str, Any] = {}

    def _layers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
        layers = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
                  if isinstance(m, torch.nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in self.params)]
        seen, out = set(), []
        for n, m in layers:  # a module reachable under two names (tied heads) once
            if id(m) not in seen:
                seen.add(id(m))
                out.append((n, m))
        if not out:
            names = [n or "<root>" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            sample = ", ".join(names[:6]) + (", …" if len(names) > 6 else "")
            raise ValueError(f"params: {self.params} match no Linear module (Linear modules: {sample or 'none'})")
        return out

    def _grads(self, model, layers, loss_of: Callable, indices) -> dict[str, list[tuple]]:
        """Per example and layer: (a [P, in+1], s [P, out]) at every position."""
        out: dict[str, list[tuple]] = {nm: [] for nm, _ in layers}
        for i in indices:
            ins, outs, handles = {}, {}, []
            for nm, mod in layers:
                def hook(m, args, o, nm=nm):
                    a = args[0].detach().reshape(-1, args[0].shape[-1])
                    if m.bias is not None:
                        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
                    ins[nm], outs[nm] = a, o
                handles.append(mod.register_forward_hook(hook))
            try:
                loss = loss_of(model, int(i))
            finally:
                for h in handles:
                    h.remove()
            gs = torch.autograd.grad(loss, [outs[nm] for nm, _ in layers], allow_unused=True)
            for (nm, _), g in zip(layers, gs):
                s = torch.zeros_like(outs[nm]) if g is None else g
                out[nm].append((ins[nm].double(), s.detach().reshape(-1, s.shape[-1]).double()))
        return out

    def _fit(self, per: dict[str, list[tuple]]) -> dict[str, dict[str, torch.Tensor]]:
        stats = {}
        for nm, rows in per.items():
            n = len(rows)
            A = sum(a.T @ a for a, _ in rows) / n
            S = sum(s.T @ s for _, s in rows) / n
            eA, QA = torch.linalg.eigh(A)
            eS, QS = torch.linalg.eigh(S)
            L = sum((QS.T @ (s.T @ a) @ QA) ** 2 for a, s in rows) / n
            lam = self.damping + self.damping_ratio * float(L.mean())
            stats[nm] = {"QA": QA, "QS": QS, "L": L, "lam": lam}
        return stats

    def _features(self, stats, per) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(preconditioned G_j, G_j) flattened per layer, [n, out·(in+1)]."""
        pre, raw = {}, {}
        for nm, rows in per.items():
            st = stats[nm]
            G = torch.stack([s.T @ a for a, s in rows])
            rot = st["QS"].T @ G @ st["QA"]
            pre[nm] = (st["QS"] @ (rot / (st["L"] + st["lam"])) @ st["QA"].T).flatten(1)
            raw[nm] = G.flatten(1)
        return pre, raw

    def scores(self, model, train_loss, n_train: int, test_loss=None, n_test: int = 0) -> torch.Tensor:
        """[n_train, n_test] (``test_loss`` given) or self-influence [n_train], at the model's current weights."""
        model.eval()
        layers = self._layers(model)
        per = self._grads(model, layers, train_loss, range(n_train))
        stats = self._fit(per)
        pre, raw = self._features(stats, per)
        self.last_info = {"layers": [nm for nm, _ in layers], "damping": {nm: st["lam"] for nm, st in stats.items()},
                          "fisher": "empirical"}
        if test_loss is None:
            return sum((pre[nm] * raw[nm]).sum(1) for nm in pre)
        _, te = self._features(stats, self._grads(model, layers, test_loss, range(n_test)))
        return sum(pre[nm] @ te[nm].T for nm in pre)
