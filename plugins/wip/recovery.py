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

import torch
from torch import nn
from tqdm import tqdm

from .attention import WipAttention, wip_modules


class CalibrationStats:
    """Per-head sufficient statistics of the row-centred least-squares fit, for every WipAttention."""

    def __init__(self):
        self.stats: dict[int, dict[str, torch.Tensor]] = {}

    @torch.no_grad()
    def add(self, wip: WipAttention, sim: torch.Tensor, knorm: torch.Tensor, exact: torch.Tensor,
            mask: torch.Tensor | None) -> None:
        x, y = sim.double(), exact.double()
        n = knorm.double().expand_as(x)
        valid = torch.ones_like(x, dtype=torch.bool) if mask is None else (mask == 0).expand_as(x)
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
        yield blocks[i:i + batch_size]


@torch.no_grad()
def calibrate(model: nn.Module, blocks: torch.Tensor, batch_size: int = 16, min_blocks: int = 1) -> dict:
    """Fit α, β, γ of every WipAttention of ``model`` on ``blocks`` [n, T] and switch calibration on.

    Returns {"alpha": [[per head] per layer], ...} for logging. ValueError if the model was not swapped or
    there are fewer than ``min_blocks`` blocks.
    """
    wips = wip_modules(model)
    if not wips:
        raise ValueError("the model has no swapped attention; apply the wip_attention transform first")
    if blocks.dim() != 2 or len(blocks) < max(1, min_blocks) or blocks.shape[1] < 2:
        raise ValueError(f"calibration needs at least {max(1, min_blocks)} token blocks of length ≥ 2, got a "
                         f"tensor of shape {tuple(blocks.shape)}")
    for w in wips:
        w.calibrated.fill_(False)
    stats = _collect(model, wips, blocks, batch_size)
    fitted = {"alpha": [], "beta": [], "gamma": []}
    for w in wips:
        for name, value in zip(("alpha", "beta", "gamma"), stats.solve(w)):
            getattr(w, name).data.copy_(value.to(getattr(w, name).dtype))
            fitted[name].append([round(float(v), 5) for v in value])
        w.calibrated.fill_(True)
    return fitted


def _collect(model: nn.Module, wips: list[WipAttention], blocks: torch.Tensor, batch_size: int) -> CalibrationStats:
    stats = CalibrationStats()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for w in wips:
            w.collector = stats
        for batch in _batches(blocks, batch_size):
            model(input_ids=batch.to(device))
    finally:
        for w in wips:
            w.collector = None
        model.train(was_training)
    return stats


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
