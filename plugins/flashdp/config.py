"""Config dataclasses of the flashdp plugin."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FlashDPConfig:
    """Gradient transform ``flashdp`` (per-layer clipping) and ``dp_flat`` (one global threshold)."""

    max_grad_norm: float = 1.0  # C: per-layer mode splits it over the K groups, C_k = C/sqrt(K) (sqrt(Σ C_k²) = C)
    thresholds: dict[str, float] = field(default_factory=dict)  # fnmatch pattern over parameter names -> C_k
    noise_multiplier: float | None = None  # σ; or computed from target_epsilon
    target_epsilon: float | None = None
    max_epsilon: float | None = None  # hard limit on the planned run's ε (a resume with more steps included)
    delta: float = 1.0e-5
    skip: list[str] = field(default_factory=list)  # fnmatch patterns of module names left out of DP: frozen
    # trainable parameters of layers without a DP version (LSTM, PReLU, an eval-mode BatchNorm, …): freeze (listed in
    # summary dp/frozen, one line on stderr) | error. Refused either way: a train-mode BatchNorm (mixes the samples)
    # and a layer subclass with its own forward that DP would replace.
    unsupported: str = "freeze"
    allow_no_privacy: bool = False  # permit noise_multiplier 0 or poisson false (no guarantee; ε = inf)
    poisson: bool = True  # Poisson sampling of each batch (what the accountant assumes); false needs allow_no_privacy
    conversion: str = "opacus"  # RDP -> (ε, δ) conversion: opacus | classic
    accountant: str = "rdp"  # rdp (Rényi DP) | prv (privacy loss random variables: tighter ε, same guarantee)
    # noise and batches from run.seed (public in config.yaml) instead of a secret seed: voids the guarantee;
    # for debugging and benchmark comparisons only
    reproducible_noise: bool = False
