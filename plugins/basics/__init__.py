"""Builtin plugin ``basics``: the first-order path every other method stands beside.

Registers recipe ``sft``, model family ``hf_causal_lm`` (OPT, Qwen3, LLaMA from a size preset, an explicit HF
config, or a local ``from_pretrained`` directory, with the bundled tokenizer), datasets ``jsonl`` and
``synthetic_sentiment``, model transform ``freeze`` and parallel strategy ``single``.

    plait run configs/quickstart.yaml
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import MISSING

from plait import hookimpl


# --- model family -----------------------------------------------------------------------------------
@dataclass
class HFCausalLMConfig:
    arch: str = "opt"  # opt | qwen3 | llama
    size: str = "tiny"  # a preset of plait.plugins.basics.models.SIZE_PRESETS
    config: dict[str, Any] = field(default_factory=dict)  # HF config fields overriding the preset
    # a local from_pretrained directory, or "bundled:<name>" for a model shipped with the plugin
    # (bundled:tiny-opt-base: a tiny pretrained OPT); then arch/size/config are ignored
    path: str | None = None
    tokenizer: str | None = None  # tokenizer.json or directory; default: the bundled BPE tokenizer
    dtype: str = "float32"  # float32 | float16 | bfloat16 | float64


@dataclass
class CausalLMBundle:
    model: torch.nn.Module
    tokenizer: Any


def check_hf_causal_lm(**options: Any) -> None:
    from .models import check_hf_causal_lm as check  # imports transformers: only when a config is validated

    check(**options)


def build_hf_causal_lm(arch: str, size: str, config: dict, path: str | None, tokenizer: str | None,
                       dtype: str) -> CausalLMBundle:
    from .models import build_causal_lm
    from .tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer) if tokenizer else None
    model, tok = build_causal_lm(arch=arch, size=size, config=dict(config), path=path, tokenizer=tok, dtype=dtype)
    return CausalLMBundle(model, tok)


# --- datasets -----------------------------------------------------------------------------------------
@dataclass
class SyntheticSentimentConfig:
    n_train: int = 512
    n_eval: int = 128
    seed: int = 0


@dataclass
class JsonlConfig:
    path: str = MISSING
    eval_path: str | None = None
    eval_fraction: float = 0.1
    label_words: list[str] | None = None
    seed: int = 0


def build_synthetic_sentiment(**kwargs):
    from .data import SyntheticSentiment

    return SyntheticSentiment(**kwargs)


def build_jsonl(**kwargs):
    from .data import JsonlDataset

    return JsonlDataset(**kwargs)


# --- model transforms ---------------------------------------------------------------------------------
@dataclass
class FreezeConfig:
    patterns: list[str] = field(default_factory=list)  # fnmatch patterns over parameter names


class Freeze:
    """Sets ``requires_grad=False`` on parameters whose name matches any pattern."""

    def __init__(self, patterns: list[str]):
        self.patterns = list(patterns)

    def __call__(self, model: torch.nn.Module) -> torch.nn.Module:
        for name, p in model.named_parameters():
            if any(fnmatch.fnmatchcase(name, pat) for pat in self.patterns):
                p.requires_grad_(False)
        return model


# --- parallel strategies ------------------------------------------------------------------------------
@dataclass
class SingleConfig:
    pass


class SingleProcess:
    """One process: no communication."""

    rank = 0
    world_size = 1

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value


# --- hooks --------------------------------------------------------------------------------------------
@hookimpl
def register_recipes(register):
    from .sft_recipe import SFTConfig, SFTRecipe

    register("sft", SFTRecipe, config=SFTConfig, doc="first-order fine-tuning (AdamW/SGD, schedule, clipping, "
             "accumulation)", requires=("model", "data"), uses=("grad_transform", "transforms"))


@hookimpl
def register_model_families(register):
    register("hf_causal_lm", build_hf_causal_lm, config=HFCausalLMConfig, renamed_from=("hf-causal-lm",),
             doc="HF OPT / Qwen3 / LLaMA causal LM from a size preset, an HF config, or a local directory",
             check=check_hf_causal_lm)


@hookimpl
def register_datasets(register):
    register("synthetic_sentiment", build_synthetic_sentiment, config=SyntheticSentimentConfig,
             renamed_from=("synthetic-sentiment",),
             doc="bundled templated sentiment sentences with label words (learnable, no download)")
    register("jsonl", build_jsonl, config=JsonlConfig, doc="JSON Lines of prompt/completion or text/label")


@hookimpl
def register_model_transforms(register):
    register("freeze", Freeze, config=FreezeConfig, doc="freeze parameters whose names match patterns")


@hookimpl
def register_parallel_strategies(register):
    register("single", SingleProcess, config=SingleConfig, doc="one process, no communication",
             updates=("first_order", "zeroth_order"), max_world=1)
