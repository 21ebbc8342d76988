"""Config schemas of the wip plugin's registry entries (the recipe's lives in wip_recover_recipe.py)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class WipAttentionConfig:
    operator: str = "minprod"  # exact | l1 | pot | minprod | mitchell
    mixer: str = "exact"  # A·V: exact | pot
    key_bias: bool = False  # calibration also fits γ·‖k‖₁ per head
    dim_scales: bool = False  # trainable per-dimension q/k input scales of the operator (fine-tune; fold into W_q/W_k)
    # closed-form calibration of α/β/γ (wip_recover's) on the run's own first training batch(es), inside the first
    # training forward: step 1 already trains the calibrated operator (docs/wip.md "Calibrated in any recipe")
    calibrate: bool = False
    calibrate_batches: int = 1  # training forwards whose inputs are the calibration data (see docs/wip.md)


@dataclass
class WipLMConfig:
    path: str | None = None  # a checkpoint written by scripts/train_wip_lm.py; default: the bundled one
    dtype: str = "float32"


@dataclass
class WipHeldoutConfig:
    path: str | None = None  # a heldout.jsonl; default: the one bundled with the LM
