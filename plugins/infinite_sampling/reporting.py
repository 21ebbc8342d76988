"""What recipe ``grpo`` reports: the step's rollout metrics, the mean of a step's ``num_iterations`` updates'
metrics, and the eval completions as a TensorBoard text table.

* `rollout_metrics`: ``train/reward_mean`` / ``reward_std`` / ``completion_len`` / ``reward_skipped``,
  ``perf/decode_steps``, ``perf/rollout_s`` and ``mem/peak_kv_bytes`` of one step's rollouts;
* `mean_over_iterations`: each update's metrics averaged over the step's updates, ``train/lr`` the step's LR;
* `samples_table`: the first eval prompts' completions with their rewards as a markdown table (TEXT tab).
"""
from __future__ import annotations

from typing import Any

import torch

from .samplers import Rollouts

EVAL_SAMPLES_LOGGED = 8  # eval completions shown as text in TensorBoard at each evaluation


def rollout_metrics(rewards: torch.Tensor, rollouts: Rollouts, skipped: int) -> dict[str, float]:
    """The step's reward statistics (``rewards`` ``[B, G]``), completion length, skipped reward values and the
    sampler's decode steps, wall time and peak KV bytes."""
    st = rollouts.stats
    lengths = [n for row in rollouts.lengths for n in row]
    return {
        "train/reward_mean": float(rewards.mean()),
        "train/reward_std": float(rewards.std()),
        "train/completion_len": sum(lengths) / len(lengths),
        "train/reward_skipped": float(skipped),
        "perf/decode_steps": float(st.decode_steps),
        "perf/rollout_s": float(st.wall_time_s),
        "mem/peak_kv_bytes": float(st.peak_kv_bytes),
    }


def mean_over_iterations(per_iteration: list[dict[str, Any]]) -> dict[str, float]:
    """The mean of each metric over a step's updates (``num_iterations``), except ``train/lr``: the step's LR (the
    same for every update), not a mean of copies."""
    sums: dict[str, float] = {}
    for metrics in per_iteration:
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    out = {k: v / len(per_iteration) for k, v in sums.items()}
    out["train/lr"] = per_iteration[-1]["train/lr"]
    return out


def samples_table(examples: list[dict], texts: list[str], rewards: list[float], n: int = EVAL_SAMPLES_LOGGED) -> str:
    """The first ``n`` prompts' completions with their rewards as a markdown table (one line per cell, ``|``
    escaped, 200 characters at most)."""
    def cell(t: Any) -> str:
        return " ".join(str(t).split()).replace("|", "\\|")[:200] or " "

    rows = [f"| {cell(e['prompt'])} | {cell(t)} | {r:.4g} |" for e, t, r in list(zip(examples, texts, rewards))[:n]]
    return "| prompt | completion | reward |\n|---|---|---|\n" + "\n".join(rows)
