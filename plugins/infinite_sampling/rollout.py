"""Rollouts of recipe ``grpo``: completions for the step's prompts through the ``sampler:`` scheduler, the length
predictions the scheduler plans with, and greedy completions for evaluation.

* `generate_rollouts`: the G rollouts of each prompt in one sampler call (seeds ``(sampler.seed, step, prompt,
  sample)``), or, under a private grad transform, one call per prompt whose ``step`` is `rollout_key` (a hash of
  the step and the prompt's text), merged by `merge_rollouts`: a prompt's rollouts then do not depend on which
  other prompts were sampled;
* `predicted_lengths` / `learn_lengths`: the recipe's length ``predictor`` before generation (one value per prompt,
  or the predictor itself when the sampler probes ``prefix_tokens`` first) and after it (``predictor/*`` metrics,
  then an update on the observed lengths);
* `greedy_generate`: greedy completions by plain full forwards, no cache (short eval sets).
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch

from .predictor import kendall_tau, smape
from .samplers import Rollouts, RolloutStats


def generate_rollouts(sampler, model, prompts: list[list[int]], examples: list[dict], step: int, predicted=None, *,
                      private: bool, **kw: Any) -> Rollouts:
    """The G rollouts of each prompt (``kw``: `sampler.generate`'s group_size, max_new_tokens, sampling, eos_id,
    pad_id). Under a private transform each prompt's rollouts are drawn in a call of their own whose seeds are
    keyed by the prompt's record (`rollout_key`), not by its place in the batch: a prompt's rollouts (and so its
    loss) then do not depend on which other prompts were sampled."""
    if not private:
        return sampler.generate(model, prompts, step=step, predicted_lengths=predicted, **kw)
    parts = [sampler.generate(model, [p], step=rollout_key(step, e["prompt"]), **kw)
             for p, e in zip(prompts, examples)]
    return merge_rollouts(parts)


def predicted_lengths(predictor, prefix_tokens: int, prompts: list[list[int]], group_size: int):
    """What the sampler plans with (its ``predicted_lengths``): the predictor itself when the sampler probes
    ``prefix_tokens`` first (partial decode), else one prediction per prompt repeated for its G samples (no prefix
    yet), or None without a predictor."""
    if prefix_tokens:  # partial decode: the sampler probes k tokens, then asks the predictor
        return predictor
    if predictor is not None:  # before generation: no prefix; one value per prompt, repeated G times
        per_prompt = predictor.predict_batch(prompts, [[] for _ in prompts])
        return [[v] * group_size for v in per_prompt]
    return None


def learn_lengths(predictor, prefix_tokens: int, sampler, prompts: list[list[int]], rollouts: Rollouts, predicted,
                  group_size: int) -> dict[str, float]:
    """Score the predictions against the observed lengths (``predictor/smape``, ``predictor/kendall_tau``; with a
    probe also ``perf/probe_steps``), then update the predictor on them. With ``prefix_tokens`` k the jobs that
    outlived the probe count, with their remaining lengths and first k tokens."""
    if prefix_tokens:  # score and train on the remaining lengths of the jobs that outlived the probe
        k, planned = prefix_tokens, sampler.last_predictions
        left = sorted(planned)
        if not left:
            return {}
        observed = [rollouts.lengths[b][i] - k for b, i in left]
        flat_pred = [planned[j] for j in left]
        metrics = {"predictor/smape": smape(flat_pred, observed),
                   "predictor/kendall_tau": kendall_tau(flat_pred, observed),
                   "perf/probe_steps": float(rollouts.stats.probe_steps)}
        predictor.update([prompts[b] for b, _ in left], [rollouts.completions[b][i][:k] for b, i in left], observed)
        return metrics
    if predictor is None:
        return {}
    observed = [n for row in rollouts.lengths for n in row]
    flat_pred = [v for row in predicted for v in row]
    metrics = {"predictor/smape": smape(flat_pred, observed),
               "predictor/kendall_tau": kendall_tau(flat_pred, observed)}
    predictor.update([p for p in prompts for _ in range(group_size)], [[] for _ in observed], observed)
    return metrics


def rollout_key(step: int, prompt: str) -> int:
    """The ``step`` a private run hands the sampler for one prompt's rollouts: a 63-bit hash of the step and the
    prompt's text, so the rollout seeds ``(sampler.seed, key, 0, i)`` depend on the prompt's own record only."""
    digest = hashlib.blake2b(f"{step}:{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def merge_rollouts(parts: list[Rollouts]) -> Rollouts:
    """One `Rollouts` from per-prompt calls, prompt-major; counters summed, peaks maxed."""
    stats = RolloutStats()
    for r in parts:
        s = r.stats
        for key in ("decode_steps", "forward_calls", "prefills", "tokens_generated", "idle_slot_steps", "probe_steps"):
            setattr(stats, key, getattr(stats, key) + getattr(s, key))
        for key in ("peak_kv_bytes", "peak_prompt_kv_bytes", "peak_allocated_kv_bytes"):
            setattr(stats, key, max(getattr(stats, key), getattr(s, key)))
        stats.live_kv_trace.extend(s.live_kv_trace)
        stats.wall_time_s += s.wall_time_s
    return Rollouts([p for r in parts for p in r.prompt_ids], [g for r in parts for g in r.completions],
                    [n for r in parts for n in r.lengths], [t for r in parts for t in r.truncated], stats)


@torch.no_grad()
def greedy_generate(model, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None, pad_id: int,
                    batch_size: int = 64) -> list[list[int]]:
    """Greedy completions (EOS included when emitted) by plain full forwards, no cache: for short eval sets."""
    out: list[list[int]] = []
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        rows = [list(p) for p in prompts[start:start + batch_size]]
        done = [False] * len(rows)
        gen: list[list[int]] = [[] for _ in rows]
        for _ in range(max_new_tokens):
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for n, r in enumerate(rows):
                ids[n, :len(r)] = torch.tensor(r)
                mask[n, :len(r)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for n, r in enumerate(rows):
                if done[n]:
                    continue
                tok = int(torch.argmax(logits[n, len(r) - 1]))
                r.append(tok)
                gen[n].append(tok)
                if eos_id is not None and tok == eos_id:
                    done[n] = True
            if all(done):
                break
        out.extend(gen)
    return out
