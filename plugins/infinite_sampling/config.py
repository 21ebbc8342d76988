"""Config dataclasses of the infinite_sampling plugin: the schemas of its sampler, dataset (``addition``,
``copy``) and recipe (``grpo``) registry entries.

``cache_capacity`` is the KV positions per row (0: sized per ``generate`` call as the longest prompt plus
``max_new_tokens - 1``); ``share_prompt_kv`` prefills each prompt once and copies its KV into every row that
starts one of its samples (False: prefill again for each row); ``seed`` enters every rollout's RNG seed with
``(step, prompt_idx, sample_idx)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class FullGroupConfig:
    """Sampler ``full_group``: all G samples of a prompt in one padded batch (HF generate)."""

    cache_capacity: int = 0
    share_prompt_kv: bool = True
    seed: int = 0


@dataclass
class MicroGroupConfig:
    """Sampler ``micro_group``: rounds of g rows per prompt, KV cache released between rounds."""

    g: int = 4  # rows per round (micro-group size), 1 <= g <= G
    cache_capacity: int = 0
    share_prompt_kv: bool = True
    seed: int = 0


@dataclass
class ContinuousConfig:
    """Sampler ``continuous``: g slots kept busy; a finished row is refilled at once."""

    g: int = 4  # concurrent slots, 1 <= g <= G
    cache_capacity: int = 0
    share_prompt_kv: bool = True
    seed: int = 0


@dataclass
class LengthAwareConfig:
    """Sampler ``length_aware``: continuous + predicted lengths (FPTAS lanes, LPT fallback, SJF refill)."""

    g: int = 4  # concurrent slots, 1 <= g <= G
    fptas_eps: float = 0.1  # makespan of the plan <= (1 + eps) x optimum over the predicted lengths
    max_states: int = 20_000  # FPTAS DP states built before falling back to LPT
    lane_order: str = "longest_first"  # order within a lane: longest_first | shortest_first (SJF)
    prefix_tokens: int = 0  # k > 0: probe the first k tokens of every job, then predict the rest (needs predictor)
    cache_capacity: int = 0
    share_prompt_kv: bool = True
    seed: int = 0


# --------------------------------------------------------------------------------------------------- datasets
@dataclass
class AdditionConfig:
    """Dataset ``addition``: ``"3+4="`` -> ``"7"`` (`tasks.AdditionTask`); default 44 train / 11 eval problems."""

    n_train: int | None = None  # None: every problem not in eval
    n_eval: int = 11
    seed: int = 0
    max_operand: int = 9
    max_sum: int | None = 9  # None: no cap (two-digit answers appear)
    n_operands: int = 2


@dataclass
class CopyConfig:
    """Dataset ``copy``: ``"copy: a b c ="`` -> ``" a b c"`` (`tasks.CopyTask`)."""

    n_train: int = 256
    n_eval: int = 64
    seed: int = 0
    alphabet: str = "abcdefgh"  # distinct characters whose " x" is one token of the bundled tokenizer
    min_len: int = 1
    max_len: int = 3


# --------------------------------------------------------------------------------------------------- recipe
def _default_rewards() -> list[dict[str, Any]]:
    return [{"name": "exact_match", "weight": 1.0}]


@dataclass
class GRPORecipeConfig:
    """Recipe ``grpo``: prompts -> G completions (``sampler:``) -> rewards -> advantages -> clipped loss.

    ``rewards`` is a list of reward specs, each a mapping with ``name`` and an optional ``weight`` (default 1.0):
    ``{name: exact_match, field: answer, strip: true}``, ``{name: regex, pattern: "[0-9]", reward: 1.0,
    mode: fullmatch}`` (mode ``search`` accepts a match anywhere) and ``{name: python, path: "mymod:fn"}``
    (``fn(prompts, completions, **example_fields) -> list[float | None]``). Rewards live here, not in a
    registry of their own: core has no reward kind, and a reward only means something to this recipe.
    """

    group_size: int = 8  # G completions per prompt (>= 2)
    prompts_per_step: int = 8  # B prompts per step, drawn from (run.seed, step)
    max_new_tokens: int = 2  # generation cap per completion (EOS counts as a token)
    temperature: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary
    rewards: list[dict[str, Any]] = field(default_factory=_default_rewards)
    reward_on_error: str = "fail"  # fail | skip (a raising / non-finite reward value counts 0 and is logged)
    advantage_scale: str = "group"  # group | batch | none (Dr. GRPO)
    aggregation: str = "grpo"  # grpo | dapo | dr_grpo | bnpo
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2  # DAPO clip-higher: 0.28
    beta: float = 0.0  # k3 KL coefficient to a frozen reference (the model after warm-up); 0: no reference
    num_iterations: int = 1  # optimizer updates per generation batch (mu); > 1 uses an old-policy snapshot
    lr: float = 1.0e-3
    # the LR schedule, spelled as sft's and mezo's: constant | linear | cosine (decay to 0 at run.steps) after
    # warmup_steps of linear warm-up in the RL phase (not the SFT warm-up, warmup_sft_steps)
    schedule: str = field(default="constant", metadata={"renamed_from": ("lr_schedule",)})
    warmup_steps: int = field(default=0, metadata={"renamed_from": ("lr_warmup_steps",)})
    micro_batch_size: int = 0  # rows of the B*G rollouts per loss forward (gradient accumulation); 0: all
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    warmup_sft_steps: int = 0  # supervised steps on the task's `completion` before RL (not resumed mid-way)
    warmup_batch_size: int = 16
    warmup_lr: float = 1.0e-3
    eval_examples: int = 0  # 0: the whole eval split
    eval_max_new_tokens: int = 0  # 0: max_new_tokens
    predictor: str = "none"  # none | constant | running_mean | mlp: lengths passed to the sampler, scored per step
    predictor_constant: float = 0.0  # constant's value / running_mean's start; 0: max_new_tokens
    predictor_lr: float = 1.0e-2  # mlp: Adam learning rate
