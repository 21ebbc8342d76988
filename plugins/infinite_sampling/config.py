"""Config dataclasses of the infinite_sampling plugin (the schemas of its sampler registry entries).

``cache_capacity`` is the KV positions per row (0: sized per ``generate`` call as the longest prompt plus
``max_new_tokens - 1``); ``share_prompt_kv`` prefills each prompt once and copies its KV into every row that
starts one of its samples (False: prefill again for each row); ``seed`` enters every rollout's RNG seed with
``(step, prompt_idx, sample_idx)``.
"""
from __future__ import annotations

from dataclasses import dataclass


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
    max_states: int = 200_000  # FPTAS DP states before falling back to LPT
    cache_capacity: int = 0
    share_prompt_kv: bool = True
    seed: int = 0
