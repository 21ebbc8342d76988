"""The ``flashdp`` gradient transform: makes a model's layers private, samples batches, adds noise, accounts.

Lifecycle, driven by a first-order recipe (``sft``):

    model = transform.prepare(model, dataset_size=N, batch_size=B, steps=S, seed=s, grad_accum=1)
    for step: idx = transform.batch_indices(step)           # Poisson sampling, rate q = B/N
              transform.before_backward(step)
              loss = Σ_i loss_i (transform.loss_reduction == "sum"); loss.backward()
              metrics = transform(model, step)              # flat clipping, ÷ expected batch, accountant
              optimizer.step()

Per-layer mode: each parameter tensor of each DP layer is a clip group with threshold C_k (equal split of C,
C_k = C/sqrt(K), or fixed per pattern); sensitivity sqrt(Σ C_k²); noise σ·sqrt(Σ C_k²) on every coordinate
(Opacus' per-layer rule), so the accountant uses σ. Flat mode: one threshold C for the whole per-sample
gradient (ghost norms / instantiation per layer, Book-Keeping single backward), noise σ·C.

Seeds: the noise and the Poisson batches derive from a secret base seed drawn in ``prepare`` (kept in
``state_dict`` so that a resumed run is bit-exact), not from the public run seed: anyone who can regenerate
the noise can subtract it. ``reproducible_noise=True`` derives them from the run seed instead (debugging,
benchmark comparisons) and voids the guarantee.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import secrets
from typing import Any

import torch

from .accountant import RDPAccountant, check_delta, get_noise_multiplier
from .prv import PRVAccountant
from .layers import SEED_MOD, DPContext, Group, accumulate, make_private_layer, supported_kind, total_threshold


class FlashDP:
    loss_reduction = "sum"  # per-sample losses summed: the clip threshold bounds each sample's gradient
    replaces_clipping = True  # the recipe must not clip the (noisy) gradient again

    def __init__(self, mode: str, max_grad_norm: float, thresholds: dict, noise_multiplier, target_epsilon,
                 delta: float, skip: list, unsupported: str, allow_no_privacy: bool, poisson: bool,
                 conversion: str, accountant: str = "rdp", reproducible_noise: bool = False):
        if mode not in ("per_layer", "flat"):
            raise ValueError(f"grad_transform mode {mode!r}; allowed: per_layer, flat")
        if not max_grad_norm > 0:
            raise ValueError(f"grad_transform.max_grad_norm must be > 0, got {max_grad_norm}")
        bad = {k: v for k, v in thresholds.items() if not v > 0}
        if bad:
            raise ValueError(f"grad_transform.thresholds: every threshold must be > 0, got {bad}")
        if mode == "flat" and thresholds:
            raise ValueError("grad_transform.thresholds apply to flashdp only (per-layer clipping); dp-flat has one "
                             "threshold, max_grad_norm: remove thresholds")
        if unsupported not in ("freeze", "error"):
            raise ValueError(f"grad_transform.unsupported {unsupported!r}; allowed: freeze, error")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("grad_transform: give exactly one of noise_multiplier and target_epsilon")
        if noise_multiplier is not None and noise_multiplier < 0:
            raise ValueError(f"grad_transform.noise_multiplier must be >= 0, got {noise_multiplier}")
        if noise_multiplier == 0 and not allow_no_privacy:
            raise ValueError("grad_transform.noise_multiplier 0 gives no privacy; set "
                             "grad_transform.allow_no_privacy=true to run clipping only")
        if not poisson and not allow_no_privacy:
            raise ValueError("grad_transform.poisson false gives no privacy guarantee: the recipe then takes shuffled "
                             "fixed-size batches, not the Poisson sampling the accountant assumes; keep poisson true, "
                             "or set grad_transform.allow_no_privacy=true (ε is then reported as inf)")
        if conversion not in ("opacus", "classic"):
            raise ValueError(f"grad_transform.conversion {conversion!r}; allowed: opacus, classic")
        if accountant not in ("rdp", "prv"):
            raise ValueError(f"grad_transform.accountant {accountant!r}; allowed: rdp, prv")
        self.mode, self.max_grad_norm, self.thresholds = mode, max_grad_norm, dict(thresholds)
        self.sigma, self.target_epsilon, self.delta = noise_multiplier, target_epsilon, delta
        self.skip, self.unsupported, self.poisson, self.conversion = list(skip), unsupported, poisson, conversion
        self.accountant_kind, self.reproducible_noise = accountant, reproducible_noise
        self.accountant = RDPAccountant() if accountant == "rdp" else PRVAccountant()
        self.ctx = DPContext(flat=mode == "flat", flat_threshold=max_grad_norm)
        self.groups: list[Group] = []
        self.frozen: list[str] = []

    # --- set-up ------------------------------------------------------------------------------------------
    def prepare(self, model: torch.nn.Module, *, dataset_size: int, batch_size: int, steps: int, seed: int,
                grad_accum: int = 1) -> torch.nn.Module:
        if grad_accum != 1:
            raise ValueError(f"recipe.grad_accum {grad_accum}: a DP step is one Poisson-sampled batch; "
                             f"accumulating batches breaks the sampling the accountant assumes (allowed: 1)")
        if dataset_size < 1:
            raise ValueError("data: the train split is empty")
        check_delta(self.delta, dataset_size)
        self.n = dataset_size
        self.run_seed = seed
        self.seed = seed if self.reproducible_noise else secrets.randbits(62)
        self.q = min(1.0, batch_size / dataset_size)
        self.expected_batch = self.q * dataset_size
        self._wrap(model)
        model.register_forward_pre_hook(self._note_batch, with_kwargs=True)
        if self.sigma is None:
            self.sigma = get_noise_multiplier(self.target_epsilon, self.delta, self.q, steps,
                                              conversion=self.conversion, accountant=self.accountant_kind)
        c_total = self.max_grad_norm if self.mode == "flat" else total_threshold(self.groups)
        self.ctx.noise_std = self.sigma * c_total
        return model

    def _wrap(self, model: torch.nn.Module) -> None:
        covered: set[int] = set()
        layers = [(name, module, kind) for name, module in model.named_modules()
                  if (kind := supported_kind(module)) is not None]
        _check_patterns("skip", self.skip, [name for name, _, _ in layers], "DP layer")
        for name, module, kind in layers:
            if any(fnmatch.fnmatchcase(name, pat) for pat in self.skip):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
                self.frozen.append(name)
                continue
            w = getattr(module, "weight", None)
            b = getattr(module, "bias", None)
            gw = self._group(f"{name}.weight", w) if w is not None and w.requires_grad else None
            gb = self._group(f"{name}.bias", b) if b is not None and b.requires_grad else None
            if gw is None and gb is None:
                continue
            make_private_layer(module, kind, self.ctx, gw, gb)
            covered.update(id(p) for p in (w, b) if p is not None)
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in covered:
                if self.unsupported == "error":
                    raise ValueError(f"parameter '{name}' is trainable but its layer has no DP version "
                                     f"(supported: Linear, GPT-2 Conv1D, Embedding, LayerNorm); freeze it, add its "
                                     f"module to grad_transform.skip, or set grad_transform.unsupported=freeze")
                p.requires_grad_(False)
                self.frozen.append(name)
        if not self.groups:
            raise ValueError(f"{type(model).__name__} has no trainable Linear, Conv1D, Embedding or LayerNorm "
                             f"layer for DP to protect")
        if self.mode == "per_layer":
            _check_patterns("thresholds", self.thresholds, [g.name for g in self.groups], "clip group")
            split = self.max_grad_norm / math.sqrt(len(self.groups))
            for g in self.groups:
                fixed = [v for pat, v in self.thresholds.items() if fnmatch.fnmatchcase(g.name, pat)]
                g.threshold = fixed[0] if fixed else split
        self.ctx.groups = self.groups

    def _note_batch(self, module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(x, torch.Tensor):
            self.ctx.batch = x.shape[0]

    def _group(self, name: str, param: torch.nn.Parameter) -> Group:
        group = Group(name, param, self.max_grad_norm, len(self.groups))
        self.groups.append(group)
        return group

    # --- per step ------------------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int] | None:
        """Poisson sampling: each example joins step ``step``'s batch with probability q (seeded by step)."""
        if not self.poisson:
            return None
        g = torch.Generator().manual_seed(self._step_seed(step))
        return torch.nonzero(torch.rand(self.n, generator=g) < self.q).flatten().tolist()

    def before_backward(self, step: int) -> None:
        self.ctx.seed = self._step_seed(step)
        self.ctx.norms_sq = None
        self.ctx.pending.clear()
        self.ctx.last_norms.clear()

    def _step_seed(self, step: int) -> int:
        return (self.seed * 1_000_003 + step) % SEED_MOD

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        norms = self.ctx.finish_flat() if self.mode == "flat" else None
        # An empty Poisson batch ran no backward: the update is the noise alone, one draw per clip group as in a
        # non-empty batch (a tied tensor, e.g. GPT-2's wte = lm_head, is two groups and gets two).
        unused = {id(g.param) for g in self.groups if g.param.grad is None}
        for g in self.groups:
            if id(g.param) in unused:
                accumulate(g.param, self.ctx.noise_like(torch.zeros_like(g.param), g))
        # ÷ E[B] once per tensor, not once per group: a tied tensor would be divided by E[B]².
        for param in {id(g.param): g.param for g in self.groups}.values():
            param.grad.div_(self.expected_batch)
        clipped = []
        for g in self.groups:
            if self.mode == "per_layer" and g.index in self.ctx.last_norms:
                clipped.append((self.ctx.last_norms[g.index] > g.threshold).float().mean())
        if norms is not None and norms.numel():
            clipped.append((norms > self.max_grad_norm).float().mean())
        self.accountant.step(self.sigma, self.q)
        metrics = {}
        if clipped:
            metrics["dp/clipped_fraction"] = float(torch.stack(clipped).mean())
        return metrics

    def log_metrics(self, step: int) -> dict[str, float]:
        """ε after the steps so far, computed only when logged (a PRV composition is not free) and never
        averaged over a logging window (that would understate it)."""
        return {"privacy/epsilon": self.epsilon(), "privacy/noise_multiplier": float(self.sigma)}

    def epsilon(self) -> float:
        """inf when there is no guarantee: no noise, or fixed-size batches (the accountant assumes Poisson)."""
        if self.sigma == 0 or not self.poisson:
            return math.inf
        return float(self.accountant.get_epsilon(self.delta, conversion=self.conversion))

    def summary(self) -> dict[str, Any]:
        return {"privacy/epsilon": self.epsilon(), "privacy/delta": self.delta,
                "privacy/noise_multiplier": self.sigma, "privacy/sample_rate": self.q,
                "privacy/steps": len(self.accountant), "dp/groups": len(self.groups), "dp/frozen": self.frozen}

    def state_dict(self) -> dict[str, Any]:
        """Includes the secret base seed: a checkpoint lets its holder regenerate the noise."""
        return {"accountant": self.accountant.state_dict(), "sigma": self.sigma, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        # a checkpoint written before the secret seed (2026-11-30) has none: its noise came from the run seed
        self.sigma, self.seed = state["sigma"], state.get("seed", self.run_seed)


def _check_patterns(key: str, patterns, names: list[str], what: str) -> None:
    """A pattern that matches nothing is a typo that would silently train with the defaults: refuse it."""
    unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
        core = unmatched[0].strip("*?")  # the example: the name whose tail is closest to the first typo
        example = max(names, key=lambda n: difflib.SequenceMatcher(None, core, n[-len(core):]).ratio(), default=None)
        raise ValueError(f"grad_transform.{key}: {', '.join(map(repr, unmatched))} "
                         f"{'matches' if len(unmatched) == 1 else 'match'} no {what}"
                         + (f" (fnmatch patterns over names such as {example!r})" if example else ""))
