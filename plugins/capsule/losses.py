"""Self-supervised photometric losses (Monodepth2 mechanics, re-implemented).

* ``ssim_loss``: clamp((1 − SSIM)/2, 0, 1) with 3×3 average pooling over reflect-padded images.
* ``photometric_error``: 0.85·SSIM loss + 0.15·L1, channel mean → (B, 1, H, W).
* ``min_reprojection``: per-pixel minimum over source frames, with auto-masking: the un-warped sources compete
  in the same minimum (plus 1e-5·N(0,1) tie-breaking noise), so pixels that a static camera explains as well
  as the warp (no parallax, moving-with-camera content) contribute their identity error, which carries no
  gradient to depth or pose.
* ``smoothness``: edge-aware |∂d*|·exp(−|∂I|) on mean-normalised disparity.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

C1, C2 = 0.01**2, 0.03**2


def ssim_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-pixel (1 − SSIM)/2 in [0, 1], shape of ``x``."""
    x, y = F.pad(x, (1, 1, 1, 1), mode="reflect"), F.pad(y, (1, 1, 1, 1), mode="reflect")
    mu_x, mu_y = F.avg_pool2d(x, 3, 1), F.avg_pool2d(y, 3, 1)
    sigma_x = F.avg_pool2d(x * x, 3, 1) - mu_x**2
    sigma_y = F.avg_pool2d(y * y, 3, 1) - mu_y**2
    sigma_xy = F.avg_pool2d(x * y, 3, 1) - mu_x * mu_y
    num = (2 * mu_x * mu_y + C1) * (2 * sigma_xy + C2)
    den = (mu_x**2 + mu_y**2 + C1) * (sigma_x + sigma_y + C2)
    return torch.clamp((1 - num / den) / 2, 0, 1)


def photometric_error(pred: torch.Tensor, target: torch.Tensor, alpha: float = 0.85) -> torch.Tensor:
    """(B, 1, H, W) = α·SSIM loss + (1 − α)·L1, each averaged over channels."""
    l1 = (pred - target).abs().mean(1, keepdim=True)
    return alpha * ssim_loss(pred, target).mean(1, keepdim=True) + (1 - alpha) * l1


def min_reprojection(reprojection: list[torch.Tensor], identity: list[torch.Tensor] | None = None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel minimum reprojection loss with optional auto-masking.

    ``reprojection`` / ``identity``: per-source (B, 1, H, W) errors of the warped / un-warped sources.
    Returns ``(loss per pixel (B, 1, H, W), mask (B, 1, H, W))`` where ``mask`` is 1 where a warped source
    won the minimum (the pixel is used) and 0 where the identity did (auto-masked).
    """
    rep = torch.cat(reprojection, 1)
    if identity is None:
        loss = rep.min(1, keepdim=True).values
        return loss, torch.ones_like(loss)
    ident = torch.cat(identity, 1)
    # drawn where the generator lives (the recipe's is a CPU generator, also for a CUDA run), then moved
    where = generator.device if generator is not None else ident.device
    noise = torch.randn(ident.shape, generator=generator, dtype=ident.dtype, device=where).to(ident.device)
    ident = ident + noise * 1e-5
    both = torch.cat([ident, rep], 1)
    loss, idx = both.min(1, keepdim=True)
    return loss, (idx >= ident.shape[1]).to(loss.dtype)


def smoothness(disp: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Edge-aware smoothness of mean-normalised disparity (B, 1, H, W) against ``image`` (B, 3, H, W)."""
    d = disp / (disp.mean((2, 3), keepdim=True) + 1e-7)
    dx = (d[..., :, :-1] - d[..., :, 1:]).abs()
    dy = (d[..., :-1, :] - d[..., 1:, :]).abs()
    ix = (image[..., :, :-1] - image[..., :, 1:]).abs().mean(1, keepdim=True)
    iy = (image[..., :-1, :] - image[..., 1:, :]).abs().mean(1, keepdim=True)
    return (dx * torch.exp(-ix)).mean() + (dy * torch.exp(-iy)).mean()
