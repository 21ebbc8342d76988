"""Scoring of recipe ``grpo``'s completions: the reward functions built from its ``rewards:`` specs, their weighted
sum per completion (`rewards.evaluate_rewards`, an error naming the sample as one line) and the group advantages.

* `build_rewards`: reward functions and weights from the specs (``exact_match`` / ``regex`` / ``python``, each with a
  ``weight``); a bad spec is a `ConfigError` naming it;
* `score_completions`: the weighted reward of each completion and the count of values skipped under
  ``reward_on_error: skip``; a raising or non-finite value fails the run naming the sample, its prompt and its
  completion;
* `group_scores`: the rewards as a ``[B, G]`` fp32 tensor and their advantages (`grpo_loss.group_advantages`),
  prompt-major.
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch

from plait.errors import ConfigError

from .grpo_loss import group_advantages
from .rewards import REGEX_MODES, ExactMatch, PythonCallable, RegexFormat, evaluate_rewards

REWARD_KINDS = {
    "exact_match": ("field", "strip"),
    "regex": ("pattern", "reward", "mode"),
    "python": ("path",),
}


def build_rewards(specs: list[dict]) -> tuple[list, list[float]]:
    """Reward functions and weights from the ``rewards:`` specs; a bad spec is a `ConfigError` naming it."""
    if not specs:
        raise ConfigError("recipe.rewards: empty; give at least one reward, e.g. [{name: exact_match}]")
    fns, weights = [], []
    for k, raw in enumerate(specs):
        where = f"recipe.rewards[{k}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: must be a mapping with a 'name' key, got {raw!r}")
        spec = dict(raw)
        name = spec.pop("name", None)
        if name not in REWARD_KINDS:
            raise ConfigError(f"{where}.name: {name!r} is not a reward; allowed: {', '.join(REWARD_KINDS)}")
        weight = spec.pop("weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.weight: must be a number, got {weight!r}") from None
        if not math.isfinite(weight):
            raise ConfigError(f"{where}.weight: must be finite, got {weight}")
        unknown = sorted(set(spec) - set(REWARD_KINDS[name]))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key for reward {name!r}; allowed keys: name, weight, "
                              f"{', '.join(REWARD_KINDS[name])}")
        try:
            if name == "exact_match":
                fn = ExactMatch(field=str(spec.get("field", "answer")), strip=bool(spec.get("strip", True)))
            elif name == "regex":
                if "pattern" not in spec:
                    raise ValueError("needs a 'pattern'")
                mode = spec.get("mode", "fullmatch")
                if mode not in REGEX_MODES:
                    raise ValueError(f"mode {mode!r} is not allowed; allowed: {', '.join(REGEX_MODES)}")
                fn = RegexFormat(str(spec["pattern"]), reward=float(spec.get("reward", 1.0)), mode=mode)
            else:
                if "path" not in spec:
                    raise ValueError("needs a 'path' ('package.module:function')")
                fn = PythonCallable(spec["path"])
        except ValueError as exc:
            raise ConfigError(f"{where} ({name}): {exc}") from exc
        fns.append(fn)
        weights.append(weight)
    return fns, weights


def score_completions(fns: list, weights: list[float], field_names: list[str], examples: list[dict],
                      completions: list[str], on_error: str, step: int | None) -> tuple[list[float], int]:
    """The weighted reward of each completion (``examples[i]`` holds its prompt and the ``field_names`` the reward
    functions receive) and how many values were skipped (``on_error: skip``). A failing value is a `ConfigError`
    naming the step (None: evaluation), the sample, its prompt and completion."""
    prompts = [e["prompt"] for e in examples]
    fields = {k: [e.get(k) for e in examples] for k in field_names}
    try:
        res = evaluate_rewards(fns, weights, prompts, completions, fields, on_error=on_error)
    except ValueError as exc:
        where = "evaluation" if step is None else f"step {step}"
        m = re.search(r"on sample (\d+)", str(exc))
        detail = ""
        if m and int(m.group(1)) < len(prompts):
            i = int(m.group(1))
            detail = f" (sample {i}: prompt {prompts[i]!r}, completion {completions[i]!r})"
        raise ConfigError(f"recipe.rewards: {where}: {exc}{detail}; set recipe.reward_on_error=skip to count "
                          f"such values as 0") from exc
    return res.rewards, res.skipped


def group_scores(rewards: list[float], group_size: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rewards of ``B * G`` completions (prompt-major) as a ``[B, G]`` fp32 tensor, and their group advantages
    (`group_advantages` with ``scale``) flattened to ``[B * G]`` in the same order."""
    r = torch.tensor(rewards, dtype=torch.float32).view(-1, group_size)
    return r, group_advantages(r, scale=scale).reshape(-1)


def plain(spec: Any) -> Any:
    """An OmegaConf node (or anything) as plain Python containers."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(spec):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(spec) if isinstance(spec, dict) else spec
