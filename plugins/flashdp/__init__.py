"""Builtin plugin ``flashdp``: DP-SGD with per-layer clipping fused into the backward (FlashDP), and flat clipping.

Registers gradient transforms ``flashdp`` (per-layer clipping) and ``dp_flat`` (one global threshold), used by
the first-order recipes through the shared step (``grad_transform:`` section), and ``dp_zo`` (clipped, noised
per-example projected gradients) for the ``zo`` recipe. The accountant that logs ``privacy/epsilon`` is Rényi DP
(``accountant: rdp``, the default; :mod:`.rdp`) or privacy loss random variables (``accountant: prv``;
:mod:`.prv`); :mod:`.accountant` re-exports the RDP names and holds the σ search for ``target_epsilon`` (with
either accountant).

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


def project_flashdp(cfg, options) -> str | None:
    """``plait validate``: the ε the planned run.steps would spend (no model or data is built)."""
    from .accountant import RDPAccountant
    from .mechanism import projected_epsilon
    from .prv import PRVAccountant

    n = (cfg.get("data") or {}).get("n_train")
    batch = (cfg.get("recipe") or {}).get("batch_size")
    steps = int(cfg.run.steps)
    limit = ", ".join(f"{k}={v:g}" for k, v in (("target_epsilon", options.target_epsilon),
                                                 ("max_epsilon", options.max_epsilon)) if v is not None)
    if options.reproducible_noise:
        return "privacy guarantee VOID (reproducible_noise)"
    if options.noise_multiplier is None:
        return f"σ searched at start so that ε ≤ {options.target_epsilon:g} over run.steps={steps} (δ={options.delta:g})"
    if not options.noise_multiplier or not options.poisson:
        return "privacy guarantee VOID (allow_no_privacy): ε = inf"
    if not isinstance(n, int) or not isinstance(batch, int) or n < 1:
        return "projected ε: known at start (the dataset size is not in the config)"
    q = min(1.0, batch / n)
    accountant = RDPAccountant() if options.accountant == "rdp" else PRVAccountant()
    eps = projected_epsilon(accountant, options.noise_multiplier, q, steps, options.delta, options.conversion)
    return (f"projected ε = {eps:.4g} over run.steps={steps} (δ={options.delta:g}, σ={options.noise_multiplier:g}, "
            f"q={q:.4g})" + (f"; limit {limit}" + (": REFUSED at start" if any(
                v is not None and eps > v * (1 + 1e-6) for v in (options.target_epsilon, options.max_epsilon))
                else "") if limit else ""))


@hookimpl
def register_grad_transforms(register):
    from .dp_zo import DPZOConfig

    register("dp_zo", build_dp_zo, config=DPZOConfig, renamed_from=("dp-zo",), private=True, update="zeroth_order",
             check=build_dp_zo,
             doc="DP zeroth-order steps: per-example projected gradients clipped to [-C, C], Gaussian noise, "
                 "accountant (the zo recipe; in-place, ZO2, DistZO2)")
    register("flashdp", build_flashdp, config=FlashDPConfig,
             doc="DP-SGD with per-layer clipping fused into the backward, Poisson sampling, RDP or PRV accountant",
             private=True, defers_noise=True, check=build_flashdp, project=project_flashdp)
    register("dp_flat", build_dp_flat, config=FlashDPConfig, renamed_from=("dp-flat",),
             doc="DP-SGD with one global clip threshold (ghost norms / instantiation, single backward)",
             private=True, defers_noise=True, check=build_dp_flat, project=project_flashdp)
