"""TracIn over saved checkpoints for any module, with per-example gradients projected to k dimensions.

    est = CheckpointTracIn(params=["lm_head.*"], k=512, projection="rademacher", seed=0, batch_size=16)
    scores = est.scores(model, checkpoints, train_loss, n_train, test_loss, n_test)   # [n_train, n_test]
    self_inf = est.self_influence(model, checkpoints, train_loss, n_train)            # [n_train]

``checkpoints`` is a list of `Checkpoint` (the weights, the learning rate that followed them, the number of steps
they stand for, and how the optimizer moved). ``train_loss(model, i)`` / ``test_loss(model, i)`` return example
i's scalar loss computed with ``model`` (any recipe's ``sample_losses([i])[0]`` fits), so the estimator works for
every model family: per-example gradients are taken one example at a time with ``torch.autograd.grad`` on the
selected parameters only (``params:`` fnmatch patterns), and projected in chunks of ``batch_size`` rows.

Score (TracIn-CP, Pruthi et al. 2020): Σ_c η_c · (P Γ_c ∇ℓ_j(w_c))·(P ∇ℓ_test(w_c)), with
* η_c = lr_c · steps_c, divided by (1 − μ) for SGD with momentum μ (a gradient's total contribution through the
  buffer under a constant learning rate);
* Γ_c the optimizer's preconditioner: identity for SGD; for Adam / AdamW the diagonal 1/(√v̂ + eps) from the
  checkpoint's second moment (v̂ = exp_avg_sq / (1 − β₂^t)), as LESS (Xia et al. 2024) does — identity (and noted
  in ``last_info``) where a checkpoint carries no optimizer state;
* P the random projection [k, d] (TRAK, Park et al. 2023; LoGra): ``gaussian`` N(0, 1/k) or ``rademacher`` ±1/√k,
  generated per parameter tensor in row blocks from ``seed`` (never a d × k matrix at once), E[PᵀP] = I;
  ``orthogonal`` (k ≤ d, rows of a QR factor, small d only: it is materialised); ``k = 0`` or ``projection: none``
  keeps the exact gradients. Storage is n × k per checkpoint.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

PROJECTIONS = ("rademacher", "gaussian", "orthogonal", "none")
LossOf = Callable[[torch.nn.Module, int], torch.Tensor]


@dataclass
class Checkpoint:
    """One saved point of a run: ``state`` (the module's state_dict), ``lr`` (the learning rate of the step that
    followed it), ``steps`` (how many steps it stands for), ``optimizer`` (sgd | adam | adamw), ``momentum``,
    ``exp_avg_sq`` (name → Adam second moment, optional), ``adam_step`` and ``betas`` / ``eps`` (Adam)."""

    state: dict[str, torch.Tensor]
    lr: float
    steps: int = 1
    optimizer: str = "sgd"
    momentum: float = 0.0
    exp_avg_sq: dict[str, torch.Tensor] = field(default_factory=dict)
    adam_step: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def select_params(model: torch.nn.Module, patterns: Sequence[str]) -> list[tuple[str, torch.nn.Parameter]]:
    """The named parameters matching any fnmatch pattern (``*`` for all); ValueError naming them when none do.

    A tied weight (an LM head sharing the input embedding) is listed once by ``named_parameters`` under its first
    name; a pattern matching any of its names (``lm_head.*``) selects it, under that first name, once. Its gradient
    is the gradient of the shared tensor (both uses: head and embedding)."""
    patterns = list(patterns) or ["*"]
    canonical = {id(p): n for n, p in model.named_parameters()}
    named, seen = [], set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or not any(fnmatch.fnmatchcase(n, pat) for pat in patterns):
            continue
        seen.add(id(p))
        named.append((canonical.get(id(p), n), p))
    if not named:
        names = [n for n, _ in model.named_parameters()]
        sample = ", ".join(names[:4]) + (", …" if len(names) > 4 else "")
        raise ValueError(f"params: {patterns} match no parameter of the model (names look like {sample})")
    return named


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Each tied alias → the name ``named_parameters`` lists (e.g. ``lm_head.weight`` → ``….embed_tokens.weight``)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    return {n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if canonical[id(p)] != n}


class Projector:
    """x [b, d] (parameters concatenated in order) → x Pᵀ [b, k]; see the module docstring."""

    def __init__(self, sizes: Sequence[int], k: int, kind: str = "rademacher", seed: int = 0,
                 dtype: torch.dtype = torch.float32, block_rows: int = 8192):
        if kind not in PROJECTIONS:
            raise ValueError(f"projection: {kind!r} is not supported; allowed: {', '.join(PROJECTIONS)}")
        if k < 0:
            raise ValueError(f"k: must be >= 0 (0: no projection), got {k}")
        self.sizes, self.d = list(sizes), int(sum(sizes))
        self.identity = kind == "none" or k == 0
        self.k = self.d if self.identity else int(k)
        if kind == "orthogonal" and not self.identity and self.k > self.d:
            raise ValueError(f"k: an orthogonal projection needs k <= d = {self.d}, got {self.k}")
        self.kind, self.seed, self.dtype, self.block_rows = kind, int(seed), dtype, int(block_rows)
        self._dense = None
        if kind == "orthogonal" and not self.identity:
            g = torch.Generator().manual_seed(self.seed)
            q, _ = torch.linalg.qr(torch.randn(self.d, self.k, generator=g, dtype=torch.float64))
            self._dense = q.to(dtype)  # [d, k], orthonormal columns

    def _block(self, i: int, start: int, rows: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i * 65_537 + start)
        if self.kind == "gaussian":
            return torch.randn(rows, self.k, generator=g, dtype=self.dtype) / self.k ** 0.5
        bits = torch.randint(0, 2, (rows, self.k), generator=g, dtype=torch.int8)
        return (bits.to(self.dtype) * 2 - 1) / self.k ** 0.5

    def __call__(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        """``blocks``: one [b, d_i] tensor per parameter."""
        if self.identity:
            return torch.cat([b.to(self.dtype) for b in blocks], 1)
        if self._dense is not None:
            return torch.cat([b.to(self.dtype) for b in blocks], 1) @ self._dense
        out = torch.zeros(blocks[0].shape[0], self.k, dtype=self.dtype)
        for i, b in enumerate(blocks):
            b = b.to(self.dtype)
            for start in range(0, b.shape[1], self.block_rows):
                rows = min(self.block_rows, b.shape[1] - start)
                out += b[:, start:start + rows] @ self._block(i, start, rows)
        return out


class CheckpointTracIn:
    """Projected TracIn-CP over saved checkpoints (see the module docstring)."""

    def __init__(self, params: Sequence[str] = ("*",), k: int = 0, projection: str = "rademacher", seed: int = 0,
                 batch_size: int = 16, dtype: torch.dtype | None = None):
        if projection not in PROJECTIONS:
            raise ValueError(f"projection: {projection!r} is not supported; allowed: {', '.join(PROJECTIONS)}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.params, self.k, self.projection = list(params) or ["*"], int(k), projection
        self.seed, self.batch_size, self.dtype = int(seed), int(batch_size), dtype
        self.last_info: dict[str, Any] = {}

    def features(self, model: torch.nn.Module, loss_of: LossOf, indices: Sequence[int],
                 precondition: dict[str, torch.Tensor] | None = None, both: bool = False):
        """P Γ ∇ℓ_i(w) for every index, [len(indices), k], at the module's current weights; ``both``: the pair
        (P Γ g, P g) from one gradient pass and one draw of P per chunk."""
        named = select_params(model, self.params)
        sizes = [p.numel() for _, p in named]
        dtype = self.dtype or named[0][1].dtype
        proj = Projector(sizes, self.k, self.projection, self.seed, dtype)
        rows, plain = [], []
        for start in range(0, len(indices), self.batch_size):
            chunk = list(indices[start:start + self.batch_size])
            blocks = [torch.empty(len(chunk), s, dtype=dtype) for s in sizes]
            raw = [torch.empty(len(chunk), s, dtype=dtype) for s in sizes] if both else None
            for r, i in enumerate(chunk):
                gs = torch.autograd.grad(loss_of(model, int(i)), [p for _, p in named], allow_unused=True)
                for b, (name, p), g in zip(range(len(sizes)), named, gs):
                    g = torch.zeros_like(p) if g is None else g.detach()
                    if both:
                        raw[b][r] = g.reshape(-1).to(dtype)
                    if precondition and name in precondition:
                        g = g * precondition[name]
                    blocks[b][r] = g.reshape(-1).to(dtype)
            if both:  # one draw of P for both: stack the rows
                pr = proj([torch.cat([x, z]) for x, z in zip(blocks, raw)])
                rows.append(pr[:len(chunk)])
                plain.append(pr[len(chunk):])
            else:
                rows.append(proj(blocks))
        empty = torch.zeros(0, proj.k, dtype=dtype)
        if both:
            return (torch.cat(rows) if rows else empty), (torch.cat(plain) if plain else empty)
        return torch.cat(rows) if rows else empty

    def _prepare(self, model: torch.nn.Module, ck: Checkpoint) -> tuple[float, dict[str, torch.Tensor] | None]:
        model.load_state_dict(ck.state, strict=False)
        model.eval()  # dropout off: the gradients are those of the deterministic loss
        eta = float(ck.lr) * int(ck.steps)
        pre = None
        if ck.optimizer == "sgd":
            if ck.momentum:
                eta /= 1.0 - float(ck.momentum)
        elif ck.optimizer in ("adam", "adamw"):
            if ck.exp_avg_sq:
                t = max(1, int(ck.adam_step))
                corr = 1.0 - ck.betas[1] ** t
                pre = {n: 1.0 / ((v / corr).sqrt() + ck.eps) for n, v in ck.exp_avg_sq.items()}
            else:
                self._missing += 1
        else:
            raise ValueError(f"optimizer: {ck.optimizer!r} is not supported; allowed: sgd, adam, adamw")
        return eta, pre

    def scores(self, model: torch.nn.Module, checkpoints: Sequence[Checkpoint], train_loss: LossOf, n_train: int,
               test_loss: LossOf, n_test: int) -> torch.Tensor:
        if not checkpoints:
            raise ValueError("tracin: no checkpoints to sum over")
        self._missing = 0
        out = None
        for ck in checkpoints:
            eta, pre = self._prepare(model, ck)
            a = self.features(model, train_loss, range(n_train), pre)
            b = self.features(model, test_loss, range(n_test))
            s = eta * (a @ b.T)
            out = s if out is None else out + s
        self._info(checkpoints, model)
        return out

    def self_influence(self, model: torch.nn.Module, checkpoints: Sequence[Checkpoint], train_loss: LossOf,
                       n_train: int) -> torch.Tensor:
        """Σ_c η_c (P Γ_c g_j)·(P g_j) (with Γ = I and no projection: η_c ‖g_j‖²)."""
        if not checkpoints:
            raise ValueError("tracin: no checkpoints to sum over")
        self._missing = 0
        out = None
        for ck in checkpoints:
            eta, pre = self._prepare(model, ck)
            if pre is None:
                a = b = self.features(model, train_loss, range(n_train))
            else:
                a, b = self.features(model, train_loss, range(n_train), pre, both=True)
            s = eta * (a * b).sum(1)
            out = s if out is None else out + s
        self._info(checkpoints, model)
        return out

    def _info(self, checkpoints, model) -> None:
        named = select_params(model, self.params)
        d = sum(p.numel() for _, p in named)
        self.last_info = {"checkpoints": len(checkpoints), "d": d, "k": d if self.k == 0 or
                          self.projection == "none" else self.k, "params": len(named),
                          "adam_without_state": self._missing}
