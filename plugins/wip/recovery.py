"""Accuracy recovery after the swap: closed-form per-head calibration, then a few-step fine-tune.

Calibration (no gradients). For every head, on a few calibration batches, fit the exact logits
y = q·k·scale with the operator's x = s(q, k)·scale (and, with ``key_bias``, n = ‖k‖₁·scale):

    y ≈ α·x + γ·n + β

by least squares over the causal (unmasked) entries. Softmax ignores anything constant along a query's
row, so α and γ are fitted on row-centred values (each query's mean over its valid keys subtracted): that
is exactly the part of the logits softmax sees; β is then the mean residual (it cancels in softmax but
completes the affine fit). The normal equations are accumulated as sufficient statistics, so memory does
not grow with the amount of calibration data. During collection every layer computes the *exact*
attention, so each layer is fitted on the original model's activations (one forward pass in all).

Fine-tune (≤ 100 steps). Only α, β, γ, the optional per-dimension q/k input scales and the normalisation
layers' weights train (everything else is frozen), with AdamW on the calibration blocks: by default on the
KL divergence from the original model's next-token distributions (distillation), or on the next-token loss;
the eval split is never used.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm import tqdm

from plait.errors import ConfigError

from .attention import WipAttention, wip_modules


class CalibrationStats:
    """Per-head sufficient statistics of the row-centred least-squares fit, for every WipAttention."""

    def __init__(self):
        self.stats: dict[int, dict[str, torch.Tensor]] = {}
        # [B, T] padding mask (1 = real token) of the batch being collected, or None: the query rows of padding
        # positions are left out of the fit (the additive attention mask only hides padding *keys*)
        self.query_mask: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, wip: WipAttention, sim: torch.Tensor, knorm: torch.Tensor, exact: torch.Tensor,
            mask: torch.Tensor | None) -> None:
        x, y = sim.double(), exact.double()
        n = knorm.double().expand_as(x)
        valid = torch.ones_like(x, dtype=torch.bool) if mask is None else (mask == 0).expand_as(x)
        q = self.query_mask
        if q is not None and tuple(q.shape) == (x.shape[0], x.shape[2]):
            valid = valid & q.to(device=x.device, dtype=torch.bool)[:, None, :, None]
        w = valid.double()
        count = w.sum(-1, keepdim=True).clamp_min(1.0)

        def centred(t):
            return (t - (t * w).sum(-1, keepdim=True) / count) * w

        xc, nc, yc = centred(x), centred(n), centred(y)
        dims = (0, 2, 3)
        s = self.stats.setdefault(id(wip), {})
        for key, value in (("xx", xc * xc), ("xn", xc * nc), ("nn", nc * nc), ("xy", xc * yc), ("ny", nc * yc),
                           ("x", x * w), ("n", n * w), ("y", y * w), ("count", w)):
            total = value.sum(dims)
            s[key] = s[key] + total if key in s else total

    def solve(self, wip: WipAttention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(α, β, γ) per head; γ = 0 without ``key_bias``."""
        s = self.stats.get(id(wip))
        if s is None:
            raise ValueError("no calibration data reached this attention layer")
        eps = 1e-12
        if wip.key_bias:
            det = s["xx"] * s["nn"] - s["xn"] ** 2
            ok = det.abs() > eps * (s["xx"] * s["nn"]).clamp_min(eps)
            alpha = torch.where(ok, (s["xy"] * s["nn"] - s["ny"] * s["xn"]) / det.where(ok, torch.ones_like(det)),
                                s["xy"] / s["xx"].clamp_min(eps))
            gamma = torch.where(ok, (s["ny"] * s["xx"] - s["xy"] * s["xn"]) / det.where(ok, torch.ones_like(det)),
                                torch.zeros_like(det))
        else:
            alpha = s["xy"] / s["xx"].clamp_min(eps)
            gamma = torch.zeros_like(alpha)
        cnt = s["count"].clamp_min(1.0)
        beta = (s["y"] - alpha * s["x"] - gamma * s["n"]) / cnt
        return alpha, beta, gamma


def _batches(blocks: torch.Tensor, batch_size: int):
    for i in range(0, len(blocks), batch_size):
        yield {"input_ids": blocks[i:i + batch_size]}


@torch.no_grad()
def calibrate(model: nn.Module, blocks, batch_size: int = 16, min_blocks: int = 1) -> dict:
    """Fit α, β, γ of every WipAttention of ``model`` and switch calibration on.

    ``blocks``: token blocks ``[n, T]`` (no padding; fed ``batch_size`` at a time), or a list of batches
    ``{"input_ids": [B, T], "attention_mask": [B, T] (optional, 1 = real token)}`` as a recipe feeds its
    model; padding query rows are left out of the fit. Returns {"alpha": [[per head] per layer], ...} for
    logging. ValueError if the model was not swapped or there is too little data.
    """
    wips = wip_modules(model)
    if not wips:
        raise ValueError("the model has no swapped attention; apply the wip_attention transform first")
    if isinstance(blocks, torch.Tensor):
        if blocks.dim() != 2 or len(blocks) < max(1, min_blocks) or blocks.shape[1] < 2:
            raise ValueError(f"calibration needs at least {max(1, min_blocks)} token blocks of length ≥ 2, got a "
                             f"tensor of shape {tuple(blocks.shape)}")
        batches = list(_batches(blocks, batch_size))
    else:
        batches = list(blocks)
        if not batches or any(b["input_ids"].dim() != 2 or b["input_ids"].shape[1] < 2 for b in batches):
            raise ValueError("calibration needs at least one batch of input_ids [B, T ≥ 2]")
    for w in wips:
        w.calibrated.fill_(False)
    return apply_calibration(model, collect(model, batches))


@torch.no_grad()
def collect(model: nn.Module, batches, stats: CalibrationStats | None = None) -> CalibrationStats:
    """Run ``batches`` (dicts with ``input_ids`` and optionally ``attention_mask``) through ``model`` in eval
    mode with the exact attention in every layer, accumulating the fit's statistics (into ``stats`` if given)."""
    wips = wip_modules(model)
    stats = stats if stats is not None else CalibrationStats()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for w in wips:
            w.collector = stats
        for batch in batches:
            mask = batch.get("attention_mask")
            stats.query_mask = mask
            kwargs = {"input_ids": batch["input_ids"].to(device)}
            if mask is not None:
                kwargs["attention_mask"] = mask.to(device)
            model(**kwargs)
    finally:
        stats.query_mask = None
        for w in wips:
            w.collector = None
        model.train(was_training)
    return stats


@torch.no_grad()
def apply_calibration(model: nn.Module, stats: CalibrationStats) -> dict:
    """Solve the collected fit, write α, β, γ of every WipAttention and switch calibration on."""
    fitted = {"alpha": [], "beta": [], "gamma": []}
    for w in wip_modules(model):
        for name, value in zip(("alpha", "beta", "gamma"), stats.solve(w)):
            getattr(w, name).data.copy_(value.to(getattr(w, name).dtype))
            fitted[name].append([round(float(v), 5) for v in value])
        w.calibrated.fill_(True)
    return fitted


def recovery_parameters(model: nn.Module) -> list[nn.Parameter]:
    """α, β, γ (with key_bias) and the q/k input scales (with dim_scales) of every WipAttention, and the
    weights of every normalisation layer."""
    params: list[nn.Parameter] = []
    for m in model.modules():
        if isinstance(m, WipAttention):
            params += [m.alpha, m.beta] + ([m.gamma] if m.key_bias else [])
            params += [m.q_scale, m.k_scale] if m.dim_scales else []
        elif "norm" in type(m).__name__.lower():
            params += list(m.parameters(recurse=False))
    return params


def _loss(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None) -> torch.Tensor:
    """Next-token loss, or with a ``teacher`` the token-mean KL(teacher ‖ model) of the next-token distributions."""
    if teacher is None:
        return model(input_ids=ids, labels=ids).loss
    with torch.no_grad():
        target = teacher(input_ids=ids).logits.float().log_softmax(-1)
    out = model(input_ids=ids).logits.float().log_softmax(-1)
    return torch.nn.functional.kl_div(out, target, log_target=True, reduction="none").sum(-1).mean()


def _mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int, device,
               teacher: nn.Module | None = None) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            b = blocks[i:i + batch_size].to(device)
            total += float(_loss(model, b, teacher)) * len(b)
            count += len(b)
    return total / count


def finetune(model: nn.Module, blocks: torch.Tensor, steps: int, lr: float = 3e-3, batch_size: int = 16,
             seed: int = 0, progress: bool = False, val_fraction: float = 0.25, eval_every: int = 10,
             teacher: nn.Module | None = None) -> list[float]:
    """``steps`` AdamW steps on the recovery parameters only (the rest is frozen); returns the training losses.

    Recovery parameters: α, β, γ, the q/k input scales (``dim_scales``) and the norms. The loss is the
    next-token loss of the calibration text, or — with ``teacher``, the original model — the KL divergence
    from the teacher's next-token distribution (distillation: a full distribution per token instead of one
    label, and the target is what the swap should preserve, not the text).

    The model must be calibrated (or at least swapped): α, β, γ are used only once calibration is on,
    so an uncalibrated swapped model is switched to calibrated at the identity (α=1, β=γ=0) first.

    A few thousand calibration tokens are easy to overfit (100 steps made the power-of-two model 6 % worse on
    held-out text), so ``val_fraction`` of the blocks (at least one; 0 turns it off) are held out, their loss is
    measured before training and every ``eval_every`` steps, and the parameters with the lowest held-out loss
    are kept — never worse than the calibrated start on the held-out blocks.
    """
    if steps < 0:
        raise ValueError(f"steps must be non-negative, got {steps}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    wips = wip_modules(model)
    if not wips:
        raise ValueError("the model has no swapped attention; apply the wip_attention transform first")
    for w in wips:
        w.calibrated.fill_(True)
    train = recovery_parameters(model)
    keep = {id(p) for p in train}
    saved = {p: p.requires_grad for p in model.parameters()}
    n_val = max(1, int(len(blocks) * val_fraction)) if val_fraction > 0 and len(blocks) >= 2 else 0
    val, fit = blocks[:n_val], blocks[n_val:]
    device = next(model.parameters()).device
    best = None
    if n_val:
        model.eval()
        best = (_mean_loss(model, val, batch_size, device, teacher), [p.detach().clone() for p in train])
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    opt = torch.optim.AdamW(train, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    try:
        for i in tqdm(range(steps), desc="fine-tune", disable=not progress, mininterval=5):
            batch = fit[torch.randint(len(fit), (min(batch_size, len(fit)),), generator=gen)].to(device)
            loss = _loss(model, batch, teacher)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if best is not None and ((i + 1) % eval_every == 0 or i + 1 == steps):
                model.eval()
                v = _mean_loss(model, val, batch_size, device, teacher)
                model.train()
                if v < best[0]:
                    best = (v, [p.detach().clone() for p in train])
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.eval()
        if best is not None:
            with torch.no_grad():
                for p, v in zip(train, best[1]):
                    p.copy_(v)
    return losses


class FirstBatchCalibration:
    """The ``calibrate: true`` of the ``wip_attention`` transform: the closed-form calibration above, on the
    run's own training batches, done inside the first training forward(s) (a forward pre-hook on the model).

    A model transform runs at build time with no data, so the transform registers this object as a forward
    pre-hook of the swapped model (and keeps it as ``model.wip_calibration``). It acts on the first forward
    made **with gradients enabled** — a training forward: evaluation forwards (``torch.no_grad``) pass through
    untouched, so the run's first evaluation measures the uncalibrated swap. On each of the first ``batches``
    training forwards it runs one extra forward of the same ``input_ids`` / ``attention_mask`` without
    gradients, in eval mode, with the exact attention in every layer (:func:`collect`, as :func:`calibrate`
    does), and before the ``batches``-th one proceeds it solves the fit (:func:`apply_calibration`). So with
    ``batches = 1`` (the default) the first training forward — for ``sft``, step 1's first micro-batch —
    is the calibration data, and step 1's loss and gradients already use the calibrated operator. With more,
    the first ``batches - 1`` training forwards still run the uncalibrated operator; unless they are
    micro-batches of one step (``grad_accum ≥ batches``), the later batches are collected on weights that
    earlier steps already moved.

    * Resume: α, β, γ and the ``calibrated`` flags are module parameters / buffers, so they are in the
      checkpoint; when the first forward finds every layer calibrated (a loaded state) nothing is fitted again.
      (A run checkpointed before its ``batches``-th training forward collects afresh after the resume.)
    * A recipe that never runs a forward with gradients (``zo``: MeZO's steps are forward-only) cannot be
      calibrated this way: a forward without gradients that finds the calibration parameters moved (perturbed
      or updated) while calibration is still pending is refused, instead of training an uncalibrated model.
    * Under a DP grad transform (``flashdp``) the calibration would read private training data outside the
      accountant: refused.
    """

    def __init__(self, batches: int = 1):
        if batches < 1:
            raise ValueError(f"calibrate_batches must be at least 1, got {batches}")
        self.batches = batches
        self.state = "pending"  # pending | calibrated | loaded (a calibrated state was loaded: nothing to fit)
        self.used: list[dict] = []  # per calibration batch: its shape and number of real tokens
        self.fitted: dict[str, list[torch.Tensor]] | None = None  # α, β, γ per layer as fitted
        self._stats: CalibrationStats | None = None
        self._busy = False

    def summary(self) -> dict:
        out = {"state": self.state, "batches": len(self.used),
               "tokens": sum(u["tokens"] for u in self.used)}
        if self.fitted is not None:
            out["alpha_mean"] = float(torch.cat(self.fitted["alpha"]).mean())
        return out

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict):
        if self.state != "pending" or self._busy:
            return None
        wips = wip_modules(model)
        if wips and all(bool(w.calibrated) for w in wips):
            self.state = "loaded"
            return None
        if not torch.is_grad_enabled():
            _check_untouched(wips)
            return None
        _refuse_private(model)
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ConfigError("transforms wip_attention: calibrate: true needs the training forward to pass "
                              "input_ids [B, T] (got none: inputs_embeds are not supported)")
        batch = {"input_ids": ids.detach()}
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            batch["attention_mask"] = mask.detach()
        self._busy = True
        try:
            self._stats = collect(model, [batch], self._stats)
        finally:
            self._busy = False
        self.used.append({"shape": list(ids.shape),
                          "tokens": int(mask.sum()) if "attention_mask" in batch else ids.numel()})
        if len(self.used) == self.batches:
            apply_calibration(model, self._stats)
            self._stats = None
            self.fitted = {name: [getattr(w, name).detach().clone() for w in wips]
                           for name in ("alpha", "beta", "gamma")}
            self.state = "calibrated"
            print(f"plait: wip_attention: calibrated {len(wips)} attention layer(s) on {len(self.used)} training "
                  f"batch(es) ({self.summary()['tokens']} tokens) before the first calibrated training forward; "
                  f"mean alpha {self.summary()['alpha_mean']:.4g}", file=sys.stderr)
        return None


_INITIAL = {"alpha": 1.0, "beta": 0.0, "gamma": 0.0, "q_scale": 1.0, "k_scale": 1.0}


def _check_untouched(wips: list[WipAttention]) -> None:
    for w in wips:
        for name, start in _INITIAL.items():
            p = getattr(w, name, None)
            if isinstance(p, torch.Tensor) and p.numel() and not bool((p.detach().float() == start).all()):
                raise ConfigError(
                    "transforms wip_attention: calibrate: true fits the calibration on the first training forward "
                    "with gradients, but the calibration parameters changed before any (a forward-only recipe such "
                    "as zo perturbs and updates them without one); use a first-order recipe (sft, grpo, ...) or "
                    "calibrate: false")


def _refuse_private(model: nn.Module) -> None:
    private = sorted({type(m).__name__ for m in model.modules()
                      if type(m).__module__.startswith("plait.plugins.flashdp")})
    if private:
        raise ConfigError(
            f"transforms wip_attention: calibrate: true would fit on private training data outside the DP "
            f"accountant (the model has flashdp layers: {', '.join(private)}); use calibrate: false under flashdp")
