"""Builtin plugin ``flashdp``: DP-SGD with per-layer clipping fused into the backward (FlashDP), and flat clipping.

Registers gradient transforms ``flashdp`` (per-layer clipping) and ``dp-flat`` (one global threshold), used by
the ``sft`` recipe (``grad_transform:`` section); the RDP accountant logs ``privacy/epsilon``.

    plait run configs/flashdp/gpt2.yaml
"""
from __future__ import annotations

from plait import hookimpl

from .config import FlashDPConfig


def build_flashdp(**kwargs):
    from .transform import FlashDP

    return FlashDP(mode="per_layer", **kwargs)


def build_dp_flat(**kwargs):
    from .transform import FlashDP

    return FlashDP(mode="flat", **kwargs)


def build_dp_zo(**kwargs):
    from .dp_zo import DPZO

    return DPZO(**kwargs)


@hookimpl
def register_grad_transforms(register):
    from .dp_zo import DPZOConfig

    register("dp-zo", build_dp_zo, config=DPZOConfig, private=True, update="zeroth_order", check=build_dp_zo,
             doc="DP zeroth-order steps: per-example projected gradients clipped to [-C, C], Gaussian noise, "
                 "accountant (the zo recipe; in-place, ZO2, DistZO2)")
    register("flashdp", build_flashdp, config=FlashDPConfig,
             doc="DP-SGD with per-layer clipping fused into the backward, Poisson sampling, RDP accountant",
             private=True, check=build_flashdp)
    register("dp-flat", build_dp_flat, config=FlashDPConfig,
             doc="DP-SGD with one global clip threshold (ghost norms / instantiation, single backward)",
             private=True, check=build_dp_flat)
