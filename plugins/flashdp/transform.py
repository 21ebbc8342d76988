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
import functools
import math
import secrets
import sys
from typing import Any

import torch

from .accountant import RDPAccountant, check_delta, get_noise_multiplier
from .layers import (
    SUPPORTED,
    DPContext,
    Group,
    accumulate,
    broadcast_candidate,
    exact_possible,
    guard_param,
    layer_params,
    make_broadcast_owner,
    make_private_layer,
    mixes_samples,
    refusal,
    supported_kind,
    total_threshold,
)
from .mechanism import check_budget, check_max_epsilon, check_noise_options, guarantee, poisson_batch, step_seed
from .prv import PRVAccountant


class FlashDP:
    loss_reduction = "sum"  # per-sample losses summed: the clip threshold bounds each sample's gradient
    replaces_clipping = True  # the recipe must not clip the (noisy) gradient again

    def __init__(self, mode: str, max_grad_norm: float, thresholds: dict, noise_multiplier, target_epsilon,
                 delta: float, skip: list, unsupported: str, allow_no_privacy: bool, poisson: bool,
                 conversion: str, accountant: str = "rdp", reproducible_noise: bool = False,
                 max_epsilon: float | None = None):
        if mode not in ("per_layer", "flat"):
            raise ValueError(f"grad_transform mode {mode!r}; allowed: per_layer, flat")
        if not max_grad_norm > 0:
            raise ValueError(f"grad_transform.max_grad_norm must be > 0, got {max_grad_norm}")
        bad = {k: v for k, v in thresholds.items() if not v > 0}
        if bad:
            raise ValueError(f"grad_transform.thresholds: every threshold must be > 0, got {bad}")
        if mode == "flat" and thresholds:
            raise ValueError("grad_transform.thresholds apply to flashdp only (per-layer clipping); dp_flat has one "
                             "threshold, max_grad_norm: remove thresholds")
        if unsupported not in ("freeze", "error"):
            raise ValueError(f"grad_transform.unsupported {unsupported!r}; allowed: freeze, error")
        check_noise_options(noise_multiplier, target_epsilon, allow_no_privacy, poisson, conversion, accountant)
        check_max_epsilon(max_epsilon)
        self.max_epsilon, self.planned_steps, self.allow_no_privacy = max_epsilon, None, allow_no_privacy
        self.mode, self.max_grad_norm, self.thresholds = mode, max_grad_norm, dict(thresholds)
        self.sigma, self.target_epsilon, self.delta = noise_multiplier, target_epsilon, delta
        self.skip, self.unsupported, self.poisson, self.conversion = list(skip), unsupported, poisson, conversion
        self.accountant_kind, self.reproducible_noise = accountant, reproducible_noise
        self.accountant = RDPAccountant() if accountant == "rdp" else PRVAccountant()
        self.ctx = DPContext(flat=mode == "flat", flat_threshold=max_grad_norm)
        self.groups: list[Group] = []
        self.frozen: list[str] = []
        self.dist = None  # a data-parallel placement (`set_parallel`): noise deferred to after the all-reduce
        self.noise_std = 0.0
        self._flat_norms = None

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
        model.register_forward_hook(self._end_forward, always_call=True)
        if self.sigma is None:
            self.sigma = get_noise_multiplier(self.target_epsilon, self.delta, self.q, steps,
                                              conversion=self.conversion, accountant=self.accountant_kind)
        c_total = self.max_grad_norm if self.mode == "flat" else total_threshold(self.groups)
        self.ctx.noise_std = self.sigma * c_total
        self.planned_steps = int(steps)
        self._check_budget()
        return model

    def _check_budget(self) -> float | None:
        if self.planned_steps is None or not self.poisson:
            return None
        return check_budget(self.accountant, self.sigma, self.q, self.planned_steps, self.delta, self.conversion,
                            self.target_epsilon, self.max_epsilon)

    def _wrap(self, model: torch.nn.Module) -> None:
        """Swap every supported layer for its DP version; freeze (or refuse) what has none; refuse what cannot
        be made private: a layer that mixes the samples of a batch, a subclass whose own forward DP would
        replace."""
        for name, module in model.named_modules():
            why = mixes_samples(module)
            if why:
                raise ValueError(f"'{name}' ({type(module).__name__}) {why}")
        layers = [(name, module, kind) for name, module in model.named_modules()
                  if (kind := supported_kind(module)) is not None]
        owned = {id(m.out_proj) for _, m, kind in layers if kind == "mha"}  # its forward is the MHA's
        layers = [(name, m, kind) for name, m, kind in layers if id(m) not in owned]
        _check_patterns("skip", self.skip, [name for name, _, _ in layers], "DP layer")
        covered: set[int] = set()
        for name, module, kind in layers:
            params = layer_params(module, kind)
            if any(fnmatch.fnmatchcase(name, pat) for pat in self.skip):
                for _, p in params:
                    p.requires_grad_(False)
                self.frozen.append(name)
                continue
            if not any(p.requires_grad for _, p in params):
                continue
            why = refusal(module, kind)
            if why:
                raise ValueError(f"'{name}' {why}; add '{name}' to grad_transform.skip to freeze it")
            if not exact_possible(module, kind):
                continue  # its parameters are unsupported below: frozen or refused
            groups = {local: self._group(_join(name, local), p) if p.requires_grad else None for local, p in params}
            if kind == "mha":
                make_private_layer(module, kind, self.ctx, groups.get("in_proj_weight"), groups.get("in_proj_bias"),
                                   (groups.get("out_proj.weight"), groups.get("out_proj.bias")))
            else:
                make_private_layer(module, kind, self.ctx, groups.get("weight"), groups.get("bias"))
                if kind == "conv1d" and groups.get("weight") is not None:  # its noise is drawn (out, in), then .t()
                    groups["weight"].noise_transposed = True
            covered.update(id(p) for _, p in params)
        for name, module in model.named_modules():
            found = {local: p for local, p in module.named_parameters(recurse=False)
                     if p.requires_grad and id(p) not in covered and broadcast_candidate(module, local, p)}
            if found:
                make_broadcast_owner(module, self.ctx, {local: self._group(_join(name, local), p)
                                                        for local, p in found.items()})
                covered.update(id(p) for p in found.values())
        owner = {id(p): type(m).__name__ for _, m in model.named_modules() for p in m.parameters(recurse=False)}
        unsupported = []
        for name, p in model.named_parameters():
            if p.requires_grad and id(p) not in covered:
                if self.unsupported == "error":
                    raise ValueError(f"parameter '{name}' is trainable but its layer has no DP version "
                                     f"({owner.get(id(p), '?')}; supported: {SUPPORTED}); freeze it, add its "
                                     f"module to grad_transform.skip, or set grad_transform.unsupported=freeze")
                p.requires_grad_(False)
                unsupported.append(name)
        self.frozen.extend(unsupported)
        if not self.groups:
            raise ValueError(f"{type(model).__name__}: nothing left to train: it has no trainable parameter with a DP "
                             f"version (supported: {SUPPORTED})"
                             + (f"; without one: {_some(unsupported)}" if unsupported else ""))
        if unsupported:
            print(f"plait: flashdp: froze {len(unsupported)} trainable parameter(s) without a DP version: "
                  f"{_some(unsupported)} (listed in summary dp/frozen; grad_transform.unsupported=error refuses "
                  f"them instead)", file=sys.stderr)
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):  # in eval mode now: keep it there
                module.register_forward_pre_hook(functools.partial(_batch_statistics_guard, name))
        for g in {id(g.param): g for g in self.groups}.values():
            guard_param(g.name, g.param)
        if self.mode == "per_layer":
            _check_patterns("thresholds", self.thresholds, [g.name for g in self.groups], "clip group")
            split = self.max_grad_norm / math.sqrt(len(self.groups))
            for g in self.groups:
                fixed = [v for pat, v in self.thresholds.items() if fnmatch.fnmatchcase(g.name, pat)]
                g.threshold = fixed[0] if fixed else split
        self.ctx.groups = self.groups

    # --- data parallelism (private DDP) --------------------------------------------------------------------
    def set_parallel(self, dist: Any) -> None:
        """Under a data-parallel placement (``parallel: {name: ddp}``), Opacus' DistributedDPOptimizer semantics:
        every rank takes rank 0's secret seed (the same Poisson draw and the same noise everywhere); each rank's
        backward leaves the clipped SUM of its own samples (no noise); the step all-reduces the sums, and
        ``__call__`` then adds the Gaussian noise once per clip group, drawn exactly as one process draws it."""
        if not self.reproducible_noise and hasattr(dist, "broadcast_object"):
            self.seed = int(dist.broadcast_object(self.seed))
        self.dist = dist
        self.noise_std, self.ctx.noise_std = self.ctx.noise_std, 0.0

    def before_reduce(self, model: torch.nn.Module, step: int) -> None:
        """Flat mode under a placement: clip with each sample's global norm on the rank that holds the sample."""
        if self.dist is not None and self.mode == "flat":
            self._flat_norms = self.ctx.finish_flat()

    def _add_deferred_noise(self) -> None:
        """One draw per clip group, as the layers draw it in one process (same generator, seed and shape)."""
        self.ctx.noise_std = self.noise_std
        try:
            for g in self.groups:
                shape = tuple(g.param.shape)
                if g.noise_transposed:
                    noise = self.ctx.noise_like(torch.zeros(shape[::-1], dtype=g.param.dtype,
                                                            device=g.param.device), g).t()
                else:
                    noise = self.ctx.noise_like(torch.zeros_like(g.param), g)
                accumulate(g.param, noise)
        finally:
            self.ctx.noise_std = 0.0

    def _note_batch(self, module, args, kwargs):
        """The batch (and, for token inputs, the tokens per sample) of this forward."""
        x, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if x is None and embeds is None and args:
            x = args[0]
        if self.ctx.in_forward == 0:
            self.ctx.broadcast.clear()
            t = x if isinstance(x, torch.Tensor) else embeds
            if isinstance(t, torch.Tensor) and t.dim() >= 1:
                self.ctx.batch = t.shape[0]
                tokens = t is embeds and t.dim() == 3 or (t.dim() == 2 and not t.is_floating_point())
                self.ctx.tokens = t.shape[1] if tokens else None
            else:
                self.ctx.batch = self.ctx.tokens = None
        self.ctx.in_forward += 1

    def _end_forward(self, module, args, output):
        self.ctx.in_forward -= 1

    def _group(self, name: str, param: torch.nn.Parameter) -> Group:
        group = Group(name, param, self.max_grad_norm, len(self.groups))
        self.groups.append(group)
        return group

    # --- per step ------------------------------------------------------------------------------------------
    def batch_indices(self, step: int) -> list[int] | None:
        """Poisson sampling: each example joins step ``step``'s batch with probability q (seeded by step)."""
        if not self.poisson:
            return None
        return poisson_batch(self.n, self.q, self._step_seed(step))

    def before_backward(self, step: int) -> None:
        self.ctx.seed = self._step_seed(step)
        self.ctx.new_step()

    def _step_seed(self, step: int) -> int:
        return step_seed(self.seed, step)

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]:
        if self.dist is not None:  # the gradients are the all-reduced clipped sums: noise once, here
            norms, self._flat_norms = self._flat_norms, None
            self._add_deferred_noise()
        else:
            norms = self.ctx.finish_flat() if self.mode == "flat" else None
        # An empty Poisson batch ran no backward: the update is the noise alone, one draw per clip group as in a
        # non-empty batch (a tied tensor, e.g. GPT-2's wte = lm_head, is two groups and gets two).
        unused = {id(g.param) for g in self.groups if g.param.grad is None} if self.dist is None else set()
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
        self.ctx.seen.clear()
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
                "privacy/steps": len(self.accountant), "dp/groups": len(self.groups), "dp/frozen": self.frozen,
                **guarantee(self.reproducible_noise, self.allow_no_privacy, self.epsilon())}

    def state_dict(self) -> dict[str, Any]:
        """Includes the secret base seed: a checkpoint lets its holder regenerate the noise."""
        return {"accountant": self.accountant.state_dict(), "sigma": self.sigma, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        # a checkpoint written before the secret seed (docs/flashdp.md) has none: its noise came from the run seed
        self.sigma, self.seed = state["sigma"], state.get("seed", self.run_seed)
        self._check_budget()  # a resume with a larger run.steps must not overspend the budget

    def progress_state(self) -> dict[str, Any]:
        """Kept when a step's update is undone (``run.on_nonfinite=skip``): the step sampled its batch and ran
        the mechanism, so its release stays counted (conservative: ε never drops by a skip)."""
        return {"accountant": self.accountant.state_dict()}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _some(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names) - n} more)" if len(names) > n else "")


def _batch_statistics_guard(name: str, module, args) -> None:
    if module.training or module.running_mean is None:
        raise RuntimeError(f"'{name}' ({type(module).__name__}) runs in training mode under DP: it normalises with "
                           f"the whole batch's statistics, so per-sample gradients do not exist; replace it with "
                           f"nn.GroupNorm or keep it in eval mode")


def _check_patterns(key: str, patterns, names: list[str], what: str) -> None:
    """A pattern that matches nothing is a typo that would silently train with the defaults: refuse it."""
    unmatched = [pat for pat in patterns if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:
        core = unmatched[0].strip("*?")  # the example: the name whose tail is closest to the first typo
        example = max(names, key=lambda n: difflib.SequenceMatcher(None, core, n[-len(core):]).ratio(), default=None)
        raise ValueError(f"grad_transform.{key}: {', '.join(map(repr, unmatched))} "
                         f"{'matches' if len(unmatched) == 1 else 'match'} no {what}"
                         + (f" (fnmatch patterns over names such as {example!r})" if example else ""))
