"""What every DP transform of this plugin shares: the noise options' checks, the per-step seed derived from the
(secret) base seed, and Poisson sampling of a step's batch. ``flashdp`` / ``dp-flat`` (first-order) and
``dp-zo`` (zeroth-order) differ only in what they clip."""
from __future__ import annotations

import math

import torch

SEED_MOD = 2**63 - 1


def check_noise_options(noise_multiplier: float | None, target_epsilon: float | None, allow_no_privacy: bool,
                        poisson: bool, conversion: str, accountant: str) -> None:
    """The options that define the mechanism and its accounting (ValueError naming the key)."""
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("grad_transform: give exactly one of noise_multiplier and target_epsilon")
    if noise_multiplier is not None and not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"grad_transform.noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
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


def step_seed(base_seed: int, step: int) -> int:
    """The seed of step ``step``'s noise and batch, from the base seed."""
    return (base_seed * 1_000_003 + step) % SEED_MOD


def poisson_batch(n: int, rate: float, seed: int) -> list[int]:
    """Poisson sampling: each of the ``n`` examples joins the batch with probability ``rate``."""
    g = torch.Generator().manual_seed(seed)
    return torch.nonzero(torch.rand(n, generator=g) < rate).flatten().tolist()
