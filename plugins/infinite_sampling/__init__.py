"""Builtin plugin ``infinite_sampling``: memory-bounded grouped rollouts for GRPO (Infinite Sampling,
arXiv 2506.22950).

Registers sampler schedulers (config section ``sampler:``) that all return the same `samplers.Rollouts`:

* ``full_group``   — all G samples of a prompt decode together, padded (HF ``generate``);
* ``micro_group``  — rounds of g rows per prompt, KV cache released between rounds;
* ``continuous``   — g slots kept busy, a finished row refilled at once from the same or the next group;
* ``length_aware`` — continuous + predicted lengths: FPTAS lanes (LPT fallback) and SJF refill.

Objects come from the factories (``g``, ``cache_capacity`` … from the config) and are used as::

    rollouts = sampler.generate(model, prompts, group_size=G, max_new_tokens=64, step=step,
                                sampling={"temperature": 1.0, "top_k": 0}, eos_id=tok.eos_token_id,
                                pad_id=tok.pad_token_id)

Also registers recipe ``grpo`` (rollouts from the ``sampler:`` section -> rewards -> group advantages ->
clipped policy loss, optional k3 KL to a frozen reference; rewards are listed in the recipe's ``rewards:`` option;
the update is the shared ``plait.step.FirstOrderStep``, so ``grad_transform:`` works: ``sam``, and ``flashdp`` /
``dp_flat`` for DP GRPO with one training prompt as the privacy unit) and the bundled verifiable tasks as datasets
``addition`` and ``copy``::

    plait run configs/grpo/addition.yaml
    plait run configs/compose/dp_grpo_addition.yaml

Modules: ``schedule`` (plans, dispatchers, simulator; pure Python), ``kv_cache`` (slot KV cache over HF models),
``samplers`` (the schedulers and `Rollouts`), ``predictor`` (length predictors), ``rewards``, ``tasks``, and recipe
``grpo``: ``grpo_recipe`` (the recipe), ``rollout`` (rollouts through the scheduler), ``scoring`` (reward specs,
rewards, advantages), ``logprobs`` (the forwards), ``grpo_loss`` (the objective), ``reporting`` (metrics, text);
``config`` (schemas).
"""
from __future__ import annotations

from plait import hookimpl

from .config import (
    AdditionConfig,
    ContinuousConfig,
    CopyConfig,
    FullGroupConfig,
    GRPORecipeConfig,
    LengthAwareConfig,
    MicroGroupConfig,
)


def build_full_group(**kwargs):
    from .samplers import FullGroupScheduler

    return FullGroupScheduler(**kwargs)


def build_micro_group(**kwargs):
    from .samplers import MicroGroupScheduler

    return MicroGroupScheduler(**kwargs)


def build_continuous(**kwargs):
    from .samplers import ContinuousScheduler

    return ContinuousScheduler(**kwargs)


def build_length_aware(predictor=None, **kwargs):
    from .samplers import LengthAwareScheduler

    return LengthAwareScheduler(predictor=predictor, **kwargs)


@hookimpl
def register_sampler_schedulers(register):
    register("full_group", build_full_group, config=FullGroupConfig,
             doc="all G samples of a prompt in one padded batch, as HF generate (the memory baseline)")
    register("micro_group", build_micro_group, config=MicroGroupConfig,
             doc="rounds of g rows per prompt with the KV cache released between rounds (peak KV flat in G)")
    register("continuous", build_continuous, config=ContinuousConfig,
             doc="g slots kept busy: a finished row is refilled at once from the same or the next prompt's group")
    register("length_aware", build_length_aware, config=LengthAwareConfig,
             doc="continuous sampling planned from predicted lengths: FPTAS lanes (LPT fallback), SJF refill")


def build_addition(**kwargs):
    from .tasks import AdditionTask

    return AdditionTask(**kwargs)


def build_copy(**kwargs):
    from .tasks import CopyTask

    return CopyTask(**kwargs)


def build_grpo(run, **kwargs):
    from .grpo_recipe import GRPORecipe

    return GRPORecipe(run, **kwargs)


@hookimpl
def register_datasets(register):
    register("addition", build_addition, config=AdditionConfig,
             doc="bundled verifiable task: '3+4=' -> '7' (prompt / answer / completion; for grpo and sft)")
    register("copy", build_copy, config=CopyConfig,
             doc="bundled verifiable task: 'copy: a b c =' -> ' a b c' (prompt / answer / completion)")


@hookimpl
def register_recipes(register):
    register("grpo", build_grpo, config=GRPORecipeConfig,
             doc="GRPO: G sampled completions per prompt, rewards, group advantages, clipped loss (+ k3 KL)",
             requires=("model", "data", "sampler"), uses=("transforms", "grad_transform"))
