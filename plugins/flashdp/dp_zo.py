"""The ``dp_zo`` transform: differentially private zeroth-order steps (DPZero, Zhang et al. 2023; DP-ZO, Tang et
al. 2024) for the ``zo`` recipe, with any of its engines (in-place, ZO2 host / fp16 / disk) and DistZO2 ``pertp``.

The only data-dependent quantity of a MeZO step is one scalar per example and perturbation sample j: the
projected gradient g_ij = (ℓ_i(θ+εz_j) − ℓ_i(θ−εz_j)) / 2ε (one-sided: (ℓ_i(θ+εz_j) − ℓ_i(θ)) / ε), with ℓ_i the
example's mean token loss. The step uses, along each public z_j,

    ĝ_j = (Σ_i clip(g_ij, −C, C) + N(0, σ²C²)) / E[B],      E[B] = q·N (Poisson rate q = batch_size / N).

The engines already compute every ℓ_i in their fused forwards (the per-example losses are a reduction of the
logits they have), so privacy costs no extra forward. z_j depends only on the public step seed, not on the data.

Accounting: with q_z perturbation samples (``perturbation.q``) a step releases the vector (ĝ_1 … ĝ_{q_z}). Each
coordinate is clipped to C, so the vector's L2 sensitivity (add/remove one example) is C·√q_z, and each coordinate
gets independent noise σC: one Gaussian mechanism of noise multiplier σ/√q_z per step on a Poisson batch of rate
q. The accountant (RDP, or PRV) is stepped with (σ/√q_z, q); with ``target_epsilon`` the σ search runs on that
mechanism and σ = √q_z · σ_found. With q_z = 1 this is the DP-SGD accountant's mechanism unchanged.

An empty Poisson batch still releases the noise: the update is ĝ_j = N(0, σ²C²)/E[B] (skipping it would reveal
that the batch was empty). The noise and the Poisson batches come from a secret seed drawn at start (rank 0's,
broadcast to the other ranks, so every rank draws the same noise and applies the identical update), kept in the
checkpoint for an exact resume; ``reproducible_noise`` derives it from run.seed and voids the guarantee.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import torch

from .accountant import RDPAccountant, check_delta, get_noise_multiplier
from .mechanism import check_budget, check_max_epsilon, check_noise_options, guarantee, poisson_batch, step_seed
from .prv import PRVAccountant


@dataclass
class DPZOConfig:
    """Grad transform ``dp_zo`` (the ``zo`` recipe)."""

    # C: each example's projected gradient is clipped to [-C, C]; .inf only without privacy
    max_grad_norm: float = field(default=1.0, metadata={"allow_inf": True})
    noise_multiplier: float | None = None  # σ; or computed from target_epsilon
    target_epsilon: float | None = None
    max_epsilon: float | None = None  # hard limit on the planned run's ε (a resume with more steps included)
    delta: float = 1.0e-5
    allow_no_privacy: bool = False  # permit noise_multiplier 0, max_grad_norm inf or poisson false (ε = inf)
    poisson: bool = True  # Poisson sampling of each batch (what the accountant assumes)
    conversion: str = "opacus"  # RDP -> (ε, δ): opacus | classic
    accountant: str = "rdp"  # rdp | prv
    reproducible_noise: bool = False  # noise and batches from run.seed (public): voids the guarantee


class DPZO:
    """Clips and noises the per-example projected gradients of each zeroth-order step (module docstring)."""

    def __init__(self, max_grad_norm: float, noise_multiplier: float | None, target_epsilon: float | None,
                 delta: float, allow_no_privacy: bool, poisson: bool, conversion: str = "opacus",
                 accountant: str = "rdp", reproducible_noise: bool = False, max_epsilon: float | None = None):
        C = float(max_grad_norm)
        if math.isnan(C) or C <= 0:
            raise ValueError(f"grad_transform.max_grad_norm must be > 0, got {max_grad_norm}")
        if math.isinf(C) and not allow_no_privacy:
            raise ValueError("grad_transform.max_grad_norm inf bounds nothing (no privacy); set "
                             "grad_transform.allow_no_privacy=true to run without clipping")
        check_noise_options(noise_multiplier, target_epsilon, allow_no_privacy, poisson, conversion, accountant)
        check_max_epsilon(max_epsilon)
        self.max_epsilon, self.planned_steps = max_epsilon, None
        if target_epsilon is not None and math.isinf(C):
            raise ValueError("grad_transform.target_epsilon needs a finite max_grad_norm")
        check_delta(delta)
        self.C, self.sigma, self.target_epsilon, self.delta = C, noise_multiplier, target_epsilon, float(delta)
        self.allow_no_privacy, self.poisson, self.conversion = allow_no_privacy, poisson, conversion
        self.accountant_kind, self.reproducible_noise = accountant, reproducible_noise
        self.accountant = RDPAccountant() if accountant == "rdp" else PRVAccountant()
        self.n, self.q, self.expected_batch, self.q_z = 0, 1.0, 1.0, 1
        self.seed = self.run_seed = 0
        self.clipped: list[float] = []

    # --- set-up ------------------------------------------------------------------------------------------
    def prepare_zo(self, *, dataset_size: int, batch_size: int, steps: int, seed: int, perturbations: int,
                   parallel: Any = None) -> None:
        """Sizes the mechanism; draws the secret seed (rank 0's, broadcast through ``parallel``)."""
        if dataset_size < 1:
            raise ValueError("data: the train split is empty")
        check_delta(self.delta, dataset_size)
        self.n, self.q_z, self.run_seed = int(dataset_size), int(perturbations), int(seed)
        self.q = min(1.0, batch_size / dataset_size)
        self.expected_batch = self.q * dataset_size if self.poisson else float(batch_size)
        if self.reproducible_noise:
            self.seed = int(seed)
        else:
            self.seed = secrets.randbits(62)
            if parallel is not None and hasattr(parallel, "broadcast_object"):
                self.seed = int(parallel.broadcast_object(self.seed))
        if self.sigma is None:
            effective = get_noise_multiplier(self.target_epsilon, self.delta, self.q, steps,
                                             conversion=self.conversion, accountant=self.accountant_kind)
            self.sigma = effective * math.sqrt(self.q_z)
        self.planned_steps = int(steps)
        self._check_budget()

    def _check_budget(self) -> float | None:
        if self.planned_steps is None or not self.poisson or math.isinf(self.C):
            return None
        return check_budget(self.accountant, self.effective_sigma if self.sigma else 0.0, self.q,
                            self.planned_steps, self.delta, self.conversion, self.target_epsilon, self.max_epsilon)

    @property
    def effective_sigma(self) -> float:
        """The noise multiplier of the per-step mechanism: σ / √q_z (L2 sensitivity C·√q_z)."""
        return float(self.sigma) / math.sqrt(self.q_z)

    def batch_indices(self, step: int) -> list[int] | None:
        """Poisson sampling: each example joins step ``step``'s batch with probability q."""
        return poisson_batch(self.n, self.q, step_seed(self.seed, step)) if self.poisson else None

    # --- per step ------------------------------------------------------------------------------------------
    def privatize(self, step: int, sample_grads: torch.Tensor | None) -> list[float]:
        """ĝ_j from the per-example projected gradients ``sample_grads`` [B, q_z] (None: an empty batch)."""
        total = torch.zeros(self.q_z, dtype=torch.float64)
        if sample_grads is not None and sample_grads.numel():
            g = sample_grads.to(torch.float64)
            if math.isfinite(self.C):
                self.clipped.append(float((g.abs() > self.C).double().mean()))
                g = g.clamp(-self.C, self.C)
            total = g.sum(0)
        if self.sigma:
            gen = torch.Generator().manual_seed(step_seed(self.seed, step) ^ 0x5DEECE66D)
            total = total + torch.randn(self.q_z, generator=gen, dtype=torch.float64) * (self.sigma * self.C)
        self.accountant.step(self.effective_sigma, self.q)
        return [float(v) for v in total / self.expected_batch]

    def log_metrics(self, step: int) -> dict[str, float]:
        out = {"privacy/epsilon": self.epsilon(), "privacy/noise_multiplier": float(self.sigma)}
        if self.clipped:
            out["dp/clipped_fraction"] = sum(self.clipped) / len(self.clipped)
            self.clipped.clear()
        return out

    def epsilon(self) -> float:
        """inf without a guarantee: no noise, no clipping bound, or fixed-size batches."""
        if not self.sigma or not self.poisson or math.isinf(self.C):
            return math.inf
        return float(self.accountant.get_epsilon(self.delta, conversion=self.conversion))

    def summary(self) -> dict[str, Any]:
        return {"privacy/epsilon": self.epsilon(), "privacy/delta": self.delta,
                "privacy/noise_multiplier": float(self.sigma), "privacy/effective_noise_multiplier":
                self.effective_sigma, "privacy/sample_rate": self.q, "privacy/steps": len(self.accountant),
                "privacy/perturbation_samples": self.q_z,
                **guarantee(self.reproducible_noise, self.allow_no_privacy, self.epsilon())}

    def state_dict(self) -> dict[str, Any]:
        """Includes the secret seed: a checkpoint lets its holder regenerate the noise."""
        return {"accountant": self.accountant.state_dict(), "sigma": float(self.sigma), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.sigma, self.seed = float(state["sigma"]), int(state["seed"])
        self._check_budget()  # a resume with a larger run.steps must not overspend the budget


class PrivateMeZO:
    """The ``mezo`` perturbation with DP-ZO's estimate: engines that see ``wants_sample_losses`` hand
    ``estimate`` the per-example chunk losses too; everything else (z, shifts, update) is the inner one's."""

    wants_sample_losses = True

    def __init__(self, inner: Any, dp: DPZO):
        self.inner, self.dp = inner, dp
        self.step_index = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def estimate(self, losses: list[float], sample_losses: list[torch.Tensor] | None = None) -> list[float]:
        """ĝ_j from per-example chunk losses ``sample_losses[c][i]`` (chunk order as the inner's)."""
        if sample_losses is None:
            raise RuntimeError("dp_zo: the engine did not report per-example losses")
        per = torch.stack([s.to(torch.float64) for s in sample_losses], dim=1)  # [B, chunks]
        g = torch.tensor([self.inner.estimate(row.tolist()) for row in per], dtype=torch.float64) \
            if per.shape[0] else None
        return self.dp.privatize(self.step_index, g)

    def noise_only(self) -> list[float]:
        """ĝ_j of an empty batch."""
        return self.dp.privatize(self.step_index, None)
