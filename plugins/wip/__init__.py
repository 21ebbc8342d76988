"""Builtin plugin ``wip``: multiplication-less attention for LLMs ("WiP: Towards Light Adaptation of LLMs for
Personal Hardware", EdgeFM 2024; the operator is our documented design, see docs/wip.md).

Registers
* model transform ``wip_attention``: swap the attention similarity (QKᵀ) of HF OPT / Qwen3 / LLaMA models for
  ``exact``, ``l1`` (AdderNet), ``pot`` (power-of-two shifts), ``minprod`` (Σ sign(q·k)·min(|q|,|k|)) or
  ``mitchell`` (integer add of float bit patterns), through transformers' attention interface; with
  ``calibrate: true`` the closed-form calibration runs on the run's own first training batch inside the first
  training forward, so any first-order recipe trains the calibrated swap (docs/wip.md);
* recipe ``wip_recover``: perplexity of each operator after the swap, after closed-form per-head calibration
  and after ≤ 100 steps on the calibration parameters and norms, with op counts and energy;
* model family ``wip_lm`` (the bundled ~0.9M-parameter LLaMA trained on Python's own docs by
  scripts/train_wip_lm.py) and dataset ``wip_heldout`` (its calibration / evaluation text).

Python API::

    from plait.plugins.wip.attention import swap_attention
    from plait.plugins.wip.recovery import calibrate, finetune
    from plait.plugins.wip.costs import OpCounter, energy_pj

    swap_attention(model, "minprod"); calibrate(model, calib_blocks); finetune(model, calib_blocks, steps=100)

    plait run configs/wip/recover.yaml
"""
from __future__ import annotations

from plait import hookimpl

from .config import WipAttentionConfig, WipHeldoutConfig, WipLMConfig


def build_wip_attention(**kwargs):
    from .transform import WipAttentionTransform

    return WipAttentionTransform(**kwargs)


def build_wip_lm(path, dtype):
    from plait.plugins.basics import CausalLMBundle

    from .lm import load_lm

    model, tok = load_lm(path, dtype)
    return CausalLMBundle(model, tok)


def build_wip_heldout(**kwargs):
    from .lm import HeldoutText

    return HeldoutText(**kwargs)


def build_wip_recover(run, **kwargs):
    from .wip_recover_recipe import WipRecoverRecipe

    return WipRecoverRecipe(run, **kwargs)


@hookimpl
def register_model_transforms(register):
    register("wip_attention", build_wip_attention, config=WipAttentionConfig,
             doc="multiplication-less attention: swap QKᵀ for l1 / pot / minprod / mitchell (or exact)")


@hookimpl
def register_model_families(register):
    register("wip_lm", build_wip_lm, config=WipLMConfig, renamed_from=("wip-lm",),
             doc="the bundled ~0.9M-param LLaMA trained on Python's docs (scripts/train_wip_lm.py)")


@hookimpl
def register_datasets(register):
    register("wip_heldout", build_wip_heldout, config=WipHeldoutConfig, renamed_from=("wip-heldout",),
             doc="held-out Python-docs text of the WiP LM: train = calibration text, eval = evaluation text")


@hookimpl
def register_recipes(register):
    from .wip_recover_recipe import WipRecoverConfig

    register("wip_recover", build_wip_recover, config=WipRecoverConfig, requires=("model", "data"), uses=(),
             doc="per operator: perplexity after swap, after closed-form calibration, after ≤100 norm/scale steps")
