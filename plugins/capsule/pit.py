"""Pooling-based Vision Transformer (PiT, Heo et al. ICCV 2021) and a plain ViT ablation, from scratch.

Architecture (the structure of timm's ``PoolingVisionTransformer``, re-implemented): an overlapping conv patch
embedding (kernel ``patch``, stride ``stride``) with a spatial positional embedding (1, C, H, W) and one class
token; stages of pre-norm transformer blocks (LayerNorm eps 1e-6, qkv bias, MLP ratio 4) with embed dim
``base_dim·heads``; between stages a depthwise-style conv pooling Conv2d(C, 2C, 3, stride 2, pad 1, groups=C)
on the token map and Linear(C, 2C) on the class token; LayerNorm + Linear head on the class token.

Presets (ImageNet-1k, 224×224): ti, xs, s, b (published parameter counts 4.9M / 10.6M / 23.5M / 73.8M).
"""
from __future__ import annotations

import torch
import torch.nn as nn

PRESETS = {
    "ti": dict(patch=16, stride=8, base_dims=[32, 32, 32], depth=[2, 6, 4], heads=[2, 4, 8]),
    "xs": dict(patch=16, stride=8, base_dims=[48, 48, 48], depth=[2, 6, 4], heads=[2, 4, 8]),
    "s": dict(patch=16, stride=8, base_dims=[48, 48, 48], depth=[2, 6, 4], heads=[3, 6, 12]),
    "b": dict(patch=14, stride=7, base_dims=[64, 64, 64], depth=[3, 6, 4], heads=[4, 8, 16]),
}


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def _dp(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path
        return x * keep / (1 - self.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self._dp(self.attn(h, h, h, need_weights=False)[0])
        return x + self._dp(self.mlp(self.norm2(x)))


class PoolingViT(nn.Module):
    """PiT; with ``pool=False`` and equal stage dims it is a plain (overlapping-stem) ViT."""

    def __init__(self, *, image_size: int = 224, patch: int = 16, stride: int = 8, base_dims: list[int],
                 depth: list[int], heads: list[int], num_classes: int = 1000, in_channels: int = 3,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, pool: bool = True):
        super().__init__()
        if not (len(base_dims) == len(depth) == len(heads)):
            raise ValueError(f"base_dims, depth and heads need one entry per stage, got {base_dims}, {depth}, {heads}")
        if image_size < patch:
            raise ValueError(f"image_size {image_size} is smaller than the patch {patch}")
        dims = [b * h for b, h in zip(base_dims, heads)]
        if not pool and len(set(dims)) != 1:
            raise ValueError(f"a ViT without pooling needs one embed dim for all stages, got {dims}")
        grid = (image_size - patch) // stride + 1
        self.dims, self.pool = dims, pool
        self.patch_embed = nn.Conv2d(in_channels, dims[0], patch, stride)
        self.pos_embed = nn.Parameter(torch.randn(1, dims[0], grid, grid) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dims[0]) * 0.02)
        rates = torch.linspace(0, drop_path, sum(depth)).tolist()
        self.stages, self.pools, i = nn.ModuleList(), nn.ModuleList(), 0
        for s, (dim, n, h) in enumerate(zip(dims, depth, heads)):
            self.stages.append(nn.Sequential(*[Block(dim, h, mlp_ratio, rates[i + j]) for j in range(n)]))
            i += n
            if pool and s < len(dims) - 1:
                self.pools.append(_ConvPool(dim, dims[s + 1]))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)

    def token_grids(self, image_size: int) -> list[tuple[int, int]]:
        """The (H, W) token map of each stage for a square input of ``image_size``."""
        x = torch.zeros(1, self.patch_embed.in_channels, image_size, image_size)
        return [tuple(f.shape[-2:]) for f in self.features(x)[1]]

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x)
        if x.shape[-2:] != self.pos_embed.shape[-2:]:
            raise ValueError(f"input gives a {tuple(x.shape[-2:])} token grid; the model was built for "
                             f"{tuple(self.pos_embed.shape[-2:])} (image_size)")
        x = x + self.pos_embed
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        maps = []
        for s, stage in enumerate(self.stages):
            b, c, h, w = x.shape
            t = stage(torch.cat([cls, x.flatten(2).transpose(1, 2)], 1))
            cls, x = t[:, :1], t[:, 1:].transpose(1, 2).reshape(b, c, h, w)
            maps.append(x)
            if s < len(self.pools):
                x, cls = self.pools[s](x, cls)
        return self.norm(cls[:, 0]), maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[0])


class _ConvPool(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, 2, 1, groups=cin)
        self.fc = nn.Linear(cin, cout)

    def forward(self, x: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.conv(x), self.fc(cls)


def build_pit(*, preset: str = "", image_size: int = 224, num_classes: int = 1000, patch: int = 16, stride: int = 8,
              base_dims: list[int] | None = None, depth: list[int] | None = None, heads: list[int] | None = None,
              drop_path: float = 0.0, seed: int = 0) -> PoolingViT:
    """``preset`` (ti | xs | s | b) or custom ``patch/stride/base_dims/depth/heads``."""
    torch.manual_seed(seed)
    if preset:
        if preset not in PRESETS:
            raise ValueError(f"preset {preset!r} is unknown; allowed: {', '.join(PRESETS)} (or '' for custom)")
        arch = dict(PRESETS[preset])
    else:
        arch = dict(patch=patch, stride=stride, base_dims=list(base_dims or [16, 16, 16]),
                    depth=list(depth or [1, 2, 1]), heads=list(heads or [1, 2, 4]))
    return PoolingViT(image_size=image_size, num_classes=num_classes, drop_path=drop_path, **arch)


def build_vit(*, image_size: int = 224, num_classes: int = 1000, patch: int = 16, stride: int = 16, dim: int = 64,
              depth: int = 4, heads: int = 4, drop_path: float = 0.0, seed: int = 0) -> PoolingViT:
    """Plain ViT ablation: one stage, constant token grid, no pooling."""
    torch.manual_seed(seed)
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
    return PoolingViT(image_size=image_size, patch=patch, stride=stride, base_dims=[dim // heads], depth=[depth],
                      heads=[heads], num_classes=num_classes, drop_path=drop_path, pool=False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
