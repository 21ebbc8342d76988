"""What every DP transform of this plugin shares: the noise options' checks, the per-step seed derived from the
(secret) base seed, and Poisson sampling of a step's batch. ``flashdp`` / ``dp_flat`` (first-order) and
``dp_zo`` (zeroth-order) differ only in what they clip."""
from __future__ import annotations

import math
from typing import Any

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


def projected_epsilon(accountant: Any, sigma: float, q: float, planned_steps: int, delta: float,
                      conversion: str) -> float:
    """ε after ``planned_steps`` steps in all: the accountant's history so far plus the remaining steps at
    (σ, q). Computed on a copy; the accountant itself is unchanged."""
    copy = type(accountant)()
    copy.load_state_dict(accountant.state_dict())
    remaining = max(0, int(planned_steps) - len(accountant))
    if remaining:
        copy.step(sigma, q, remaining)
    return float(copy.get_epsilon(delta, conversion=conversion))


def check_budget(accountant: Any, sigma: float, q: float, planned_steps: int, delta: float, conversion: str,
                 target_epsilon: float | None, max_epsilon: float | None, slack: float = 1e-6) -> float | None:
    """The privacy budget is a hard limit: refuse (ConfigError, before any step) a run whose planned steps would
    exceed ``target_epsilon`` or ``max_epsilon``; return the projected ε (None without a limit)."""
    limits = [(k, v) for k, v in (("target_epsilon", target_epsilon), ("max_epsilon", max_epsilon)) if v is not None]
    if not limits or not sigma:
        return None
    eps = projected_epsilon(accountant, sigma, q, planned_steps, delta, conversion)
    for key, limit in limits:
        if eps > float(limit) * (1 + slack):
            from plait.errors import ConfigError

            raise ConfigError(f"grad_transform.{key}: run.steps={planned_steps} would spend ε={eps:.4g} (δ={delta:g}, "
                              f"σ={sigma:.4g}, q={q:.4g}, {len(accountant)} step(s) already spent), over the limit "
                              f"{key}={float(limit):g}; lower run.steps or raise the limit")
    return eps


def check_max_epsilon(max_epsilon: float | None) -> None:
    if max_epsilon is not None and not (math.isfinite(max_epsilon) and max_epsilon > 0):
        raise ValueError(f"grad_transform.max_epsilon must be a finite number > 0, got {max_epsilon}")


def guarantee(reproducible_noise: bool, allow_no_privacy: bool, epsilon: float) -> dict[str, str]:
    """``privacy/guarantee`` of the summary: void (with the reason) when no (ε, δ) guarantee holds."""
    if reproducible_noise:
        return {"privacy/guarantee": "void", "privacy/void_reason": "reproducible_noise: the noise derives from the "
                                                                     "public run.seed"}
    if allow_no_privacy and not math.isfinite(epsilon):
        return {"privacy/guarantee": "void", "privacy/void_reason": "allow_no_privacy: no noise, no clipping bound "
                                                                     "or no Poisson sampling"}
    return {"privacy/guarantee": "holds"}
