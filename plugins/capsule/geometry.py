"""Camera geometry for self-supervised depth and ego-motion (the Monodepth2 conventions, re-implemented).

Conventions
* Intrinsics are stored **normalised** (fx/W, fy/H, cx/W, cy/H) and scaled to pixels per image size with
  `scale_intrinsics`; depth is camera-frame z (not range).
* A pose ``T`` (B, 4, 4) maps points of the *target* camera frame into the *source* camera frame, so
  ``inverse_warp(source, depth_target, T, K)`` samples the source image where each target pixel lands and
  reconstructs the target. For a camera-to-world pose ``c2w`` per frame, ``T_{s<-t} = inv(c2w_s) @ c2w_t``.
* ``grid_sample`` is called with ``align_corners=True`` because pixel coordinates are normalised by (W-1),
  (H-1); the default (False) silently shifts the warp by half a pixel (the AF-SfMLearner pitfall).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def scale_intrinsics(k_norm: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(…, 3, 3) normalised intrinsics → (…, 4, 4) pixel intrinsics for an image of ``height`` × ``width``."""
    k = torch.zeros(*k_norm.shape[:-2], 4, 4, dtype=k_norm.dtype, device=k_norm.device)
    k[..., :3, :3] = k_norm
    k[..., 0, :] = k[..., 0, :] * width
    k[..., 1, :] = k[..., 1, :] * height
    k[..., 2, 2] = 1.0
    k[..., 3, 3] = 1.0
    return k


def pixel_grid(height: int, width: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Homogeneous pixel coordinates (3, H·W): rows u (column index), v (row index), 1."""
    v, u = torch.meshgrid(torch.arange(height, dtype=dtype, device=device),
                          torch.arange(width, dtype=dtype, device=device), indexing="ij")
    return torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(height * width, dtype=dtype, device=device)])


def backproject(depth: torch.Tensor, inv_k: torch.Tensor) -> torch.Tensor:
    """Depth (B, 1, H, W) and inverse pixel intrinsics (B, 4, 4) → homogeneous camera points (B, 4, H·W)."""
    b, _, h, w = depth.shape
    pix = pixel_grid(h, w, depth.dtype, depth.device)
    rays = inv_k[:, :3, :3] @ pix  # (B, 3, HW), z component 1 for a pinhole K
    pts = rays * depth.reshape(b, 1, h * w)
    return torch.cat([pts, torch.ones_like(pts[:, :1])], 1)


def project(points: torch.Tensor, k: torch.Tensor, t: torch.Tensor, height: int, width: int,
            eps: float = 1e-7) -> torch.Tensor:
    """Camera points (B, 4, N) of the target frame → grid_sample coordinates (B, H, W, 2) in the source."""
    p = (k @ t)[:, :3, :]
    cam = p @ points
    pix = cam[:, :2] / (cam[:, 2:3] + eps)
    pix = pix.reshape(-1, 2, height, width).permute(0, 2, 3, 1)
    scale = torch.tensor([width - 1, height - 1], dtype=pix.dtype, device=pix.device)
    return (pix / scale - 0.5) * 2


def inverse_warp(source: torch.Tensor, depth: torch.Tensor, t: torch.Tensor, k: torch.Tensor,
                 inv_k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct the target from ``source`` using the target depth and pose ``T_{s<-t}``.

    Returns ``(warped, grid)``; ``grid`` is the (B, H, W, 2) sampling grid (identity pose ⇒ identity grid).
    """
    h, w = depth.shape[-2:]
    inv_k = torch.linalg.inv(k) if inv_k is None else inv_k
    grid = project(backproject(depth, inv_k), k, t, h, w)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return warped, grid


def identity_grid(batch: int, height: int, width: int, dtype=torch.float32) -> torch.Tensor:
    """The sampling grid of an identity warp, (B, H, W, 2) in [-1, 1] (align_corners=True convention)."""
    ys = torch.linspace(-1, 1, height, dtype=dtype)
    xs = torch.linspace(-1, 1, width, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], -1).expand(batch, height, width, 2)


def rodrigues(axisangle: torch.Tensor) -> torch.Tensor:
    """Axis-angle (B, 3) → rotation matrices (B, 3, 3), exact at angle 0 (first-order series below 1e-8)."""
    theta = axisangle.norm(dim=-1, keepdim=True)
    small = theta < 1e-8
    axis = axisangle / torch.where(small, torch.ones_like(theta), theta)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    kx = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(-1, 3, 3)
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    eye = torch.eye(3, dtype=axisangle.dtype, device=axisangle.device).expand_as(kx)
    rot = eye + s * kx + (1 - c) * (kx @ kx)
    # below 1e-8 rad: R ≈ I + [v]x (the unnormalised skew matrix; sin θ·K = [v]x to first order)
    vx, vy, vz = axisangle.unbind(-1)
    skew = torch.stack([zero, -vz, vy, vz, zero, -vx, -vy, vx, zero], -1).reshape(-1, 3, 3)
    return torch.where(small[..., None], eye + skew, rot)


def transformation_from_parameters(axisangle: torch.Tensor, translation: torch.Tensor,
                                   invert: bool = False) -> torch.Tensor:
    """[R | t] (B, 4, 4) from axis-angle (B, 3) and translation (B, 3); ``invert`` gives [Rᵀ | −Rᵀt]."""
    r = rodrigues(axisangle)
    t = translation.unsqueeze(-1)
    if invert:
        r = r.transpose(1, 2)
        t = -r @ t
    m = torch.zeros(axisangle.shape[0], 4, 4, dtype=axisangle.dtype, device=axisangle.device)
    m[:, :3, :3] = r
    m[:, :3, 3:] = t
    m[:, 3, 3] = 1.0
    return m


def disp_to_depth(disp: torch.Tensor, min_depth: float, max_depth: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid disparity in [0, 1] → (scaled disparity, depth in [min_depth, max_depth])."""
    min_disp, max_disp = 1.0 / max_depth, 1.0 / min_depth
    scaled = min_disp + (max_disp - min_disp) * disp
    return scaled, 1.0 / scaled
