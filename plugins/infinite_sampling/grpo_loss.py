"""GRPO advantages and the clipped-surrogate loss, as Hugging Face TRL defines them.

References (checked against huggingface/trl ``trl/trainer/grpo_trainer.py``,
``_generate_and_score_completions`` and ``_compute_loss``; DeepSeekMath,
arXiv 2402.03300; Dr. GRPO, arXiv 2503.20783; DAPO, arXiv 2503.14476):

* **Advantages** (``group_advantages``).  For prompt q with G sampled
  completions and scalar rewards r_1..r_G::

      A_i = r_i - mean(r_group)                      scale="none"   (Dr. GRPO)
      A_i = (r_i - mean(r_group)) / (std_group + eps) scale="group"  (TRL default)
      A_i = (r_i - mean(r_group)) / (std_batch + eps) scale="batch"

  ``std`` is Bessel-corrected (``torch.std``, unbiased) and ``eps`` = 1e-4,
  as in TRL (``advantages / (std_rewards + 1e-4)``).  With "batch" the mean
  is still the group mean; only the scale is the std of every reward in the
  batch.  The advantage of completion i is the same for all its tokens
  (outcome supervision).

* **Per-token loss** (``grpo_loss``).  With ratio ρ = exp(logp - old_logp)
  (TRL ``coef_1``) and clip(ρ) = clamp(ρ, 1 - ε_low, 1 + ε_high)
  (``coef_2``)::

      l_{i,t} = -min(ρ_{i,t} A_i, clip(ρ_{i,t}) A_i) + β KL_{i,t}
      KL_{i,t} = exp(ref - logp) - (ref - logp) - 1        (Schulman's k3, >= 0)

  (TRL: ``per_token_loss = -torch.min(coef_1 * A, coef_2 * A)`` and
  ``per_token_loss + beta * per_token_kl`` with ``per_token_kl =
  exp(ref_per_token_logps - per_token_logps) - (ref - logp) - 1``.)

* **Aggregation** over the completion mask M (TRL ``loss_type``):

  - ``"grpo"``: mean over each sequence's active tokens, then mean over
    sequences: ``((l*M).sum(-1) / M.sum(-1).clamp(min=1)).mean()``.
  - ``"bnpo"``: ``(l*M).sum() / M.sum().clamp(min=1)`` (token mean over the
    local batch).
  - ``"dapo"``: ``(l*M).sum() / num_items_in_batch`` where TRL's
    ``num_items_in_batch`` is the number of active completion tokens in the
    *global accumulated* batch (all gradient-accumulation micro-batches of
    the optimizer step, all processes; TRL divides it by ``num_processes``
    because DDP averages gradients).  So summing the "dapo" losses of the k
    micro-batches of one step gives one token mean over the whole step,
    whereas "bnpo" normalises each micro-batch by its own token count (and
    TRL then divides by the accumulation steps).  Here pass
    ``num_items_in_batch``; when it is None the local token count is used
    and "dapo" equals "bnpo".
  - ``"dr_grpo"``: ``(l*M).sum() / (B * max_completion_length)``; the
    normaliser is a constant, so no length bias (Dr. GRPO).

* **num_iterations** (μ, several optimizer updates per generation batch):
  nothing here beyond ``old_logp``.  With μ = 1 pass ``old_logp =
  logp.detach()`` (ρ = 1, the clip is inactive, TRL does the same).

Stats (TRL's metric definitions, masked means over active tokens): the
fraction of tokens clipped low (ρ < 1 - ε_low and A < 0), clipped high
(ρ > 1 + ε_high and A > 0), either ("region"), the mean k3 KL and the mean
ratio.

Over a policy model (the forwards come from `logprobs`): ``grpo_micro_losses``
yields one ``grpo_loss_part`` per micro-batch of rows, one forward at a time;
``accumulate_grpo_gradients`` backwards each before the next forward
(gradient accumulation whose sum is the one-batch loss for every
aggregation); ``prompt_losses`` gives one loss per prompt from one packed row
per prompt (DP's per-sample losses); ``token_weighted`` averages the stats of
several parts by their token counts.
"""

from __future__ import annotations

import torch

from .logprobs import completion_logp, micro_batches, pack_groups, packed_logp, take_rows

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("grpo", "dapo", "dr_grpo", "bnpo")
PER_PROMPT_AGGREGATIONS = ("grpo", "dr_grpo")  # the batch loss is the mean of per-prompt losses


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages for a ``(num_prompts, G)`` reward tensor.

    Returns a tensor of the same shape: each reward minus its group's mean,
    divided by ``std_group + eps`` (scale "group"), ``std_batch + eps``
    ("batch") or not divided ("none"); std is Bessel-corrected like TRL's.
    ``advantages.reshape(-1)`` lines up with completions ordered
    prompt-major (the G completions of a prompt contiguous), which is TRL's
    order.  A group whose rewards are all equal gets zero advantages.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; allowed: {', '.join(SCALES)}")
    if not isinstance(rewards, torch.Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() != 2:
        raise ValueError(f"rewards must have shape (num_prompts, G), got {tuple(rewards.shape)}")
    num_prompts, g = rewards.shape
    if num_prompts < 1 or g < 2:
        raise ValueError(
            f"rewards must have at least 1 prompt and G >= 2 completions per prompt "
            f"(a group std needs 2 samples), got shape {tuple(rewards.shape)}"
        )
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not rewards.is_floating_point():
        rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        bad = torch.nonzero(~torch.isfinite(rewards))[0].tolist()
        raise ValueError(f"rewards must be finite; got {rewards[bad[0], bad[1]].item()} at (prompt {bad[0]}, sample {bad[1]})")

    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "none":
        return centered
    if scale == "group":
        std = rewards.std(dim=1, keepdim=True)
    else:  # batch
        std = rewards.std()
    return centered / (std + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(π_θ || π_ref) per token (>= 0; 0 iff logp == ref_logp).

    ``exp(ref - logp) - (ref - logp) - 1`` (TRL ``per_token_kl``).
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _check_shapes(logp, old_logp, ref_logp, advantages, mask) -> torch.Tensor:
    if logp.dim() != 2:
        raise ValueError(f"logp must have shape (B, T), got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask)) + ((("ref_logp", ref_logp),) if ref_logp is not None else ()):
        if tuple(t.shape) != tuple(logp.shape):
            raise ValueError(f"{name} must have the shape of logp {tuple(logp.shape)}, got {tuple(t.shape)}")
    b = logp.shape[0]
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    if tuple(advantages.shape) != (b,):
        raise ValueError(f"advantages must have shape (B,) = ({b},) (one per completion), got {tuple(advantages.shape)}")
    return advantages


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    beta: float = 0.0,
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a batch of B completions (TRL ``_compute_loss``; see the module doc).

    Args:
        logp: ``(B, T)`` log-probs of the sampled completion tokens under the
            current policy (carries the gradient).
        old_logp: ``(B, T)`` log-probs under the policy that sampled them
            (no gradient; ``logp.detach()`` when num_iterations = 1).
        ref_logp: ``(B, T)`` log-probs under the reference model, or None
            (then no KL term; required when ``beta != 0``).
        advantages: ``(B,)`` (or ``(B, 1)``) one advantage per completion.
        mask: ``(B, T)`` 1 on completion tokens, 0 on padding.
        clip_eps_low, clip_eps_high: ratio clipped to
            ``[1 - clip_eps_low, 1 + clip_eps_high]`` (DAPO's clip-higher
            uses clip_eps_high = 0.28).
        beta: KL coefficient (TRL default 0.0).
        aggregation: "grpo", "bnpo", "dapo" or "dr_grpo".
        max_completion_length: the generation cap; required by "dr_grpo".
        num_items_in_batch: for "dapo", active tokens in the global
            accumulated batch (per process); default: this batch's count.

    Returns:
        ``(loss, stats)``: a scalar tensor, and floats ``clip_frac_low``,
        ``clip_frac_high``, ``clip_frac`` (either), ``kl`` (mean k3 KL over
        active tokens; 0.0 without ref_logp), ``ratio_mean``, ``ratio_min``,
        ``ratio_max`` (over active tokens) and ``num_tokens``.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")
    if clip_eps_low < 0 or clip_eps_high < 0 or clip_eps_low >= 1:
        raise ValueError(
            f"need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got {clip_eps_low} and {clip_eps_high}"
        )
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"beta = {beta} needs ref_logp (the reference model's log-probs); got None")
    advantages = _check_shapes(logp, old_logp, ref_logp, advantages, mask)
    if aggregation == "dr_grpo" and (max_completion_length is None or max_completion_length <= 0):
        raise ValueError(
            f"aggregation 'dr_grpo' divides by B * max_completion_length; pass max_completion_length > 0 "
            f"(got {max_completion_length})"
        )

    # Loss math in float32 (or float64 if given): bf16 log-prob differences lose precision.
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp = logp.to(dtype)
    old_logp = old_logp.detach().to(dtype)
    adv = advantages.detach().to(dtype).unsqueeze(1)  # (B, 1)
    m = mask.to(dtype)

    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp.detach().to(dtype))
        if beta != 0.0:
            per_token = per_token + beta * kl
    else:
        kl = None

    loss = _aggregate(per_token, m, aggregation, max_completion_length, num_items_in_batch)
    return loss, _loss_stats(ratio, adv, m, kl, clip_eps_low, clip_eps_high)


def _aggregate(per_token: torch.Tensor, m: torch.Tensor, aggregation: str, max_completion_length: int | None,
               num_items_in_batch: float | None) -> torch.Tensor:
    """The per-token losses ``(B, T)`` reduced over the mask ``m`` as ``aggregation`` says (see the module doc)."""
    masked_sum = (per_token * m).sum()
    n_tokens = m.sum()
    if aggregation == "grpo":
        return ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if aggregation == "bnpo":
        return masked_sum / n_tokens.clamp(min=1.0)
    if aggregation == "dapo":
        if num_items_in_batch is None:
            normalizer = n_tokens.clamp(min=1.0)
        else:
            if not num_items_in_batch > 0:
                raise ValueError(f"num_items_in_batch must be > 0, got {num_items_in_batch}")
            normalizer = num_items_in_batch
        return masked_sum / normalizer
    return masked_sum / (per_token.shape[0] * max_completion_length)  # dr_grpo


@torch.no_grad()
def _loss_stats(ratio: torch.Tensor, adv: torch.Tensor, m: torch.Tensor, kl: torch.Tensor | None,
                clip_eps_low: float, clip_eps_high: float) -> dict[str, float]:
    """TRL's clip fractions, the mean k3 KL and the ratio's mean / min / max over the active tokens of ``m``."""
    n_tokens = m.sum()
    denom = n_tokens.clamp(min=1.0)
    r = ratio.detach()
    low = (r < 1 - clip_eps_low) & (adv < 0)
    high = (r > 1 + clip_eps_high) & (adv > 0)
    active = m > 0
    return {
        "clip_frac_low": float((low * m).sum() / denom),
        "clip_frac_high": float((high * m).sum() / denom),
        "clip_frac": float(((low | high) * m).sum() / denom),
        "kl": float((kl.detach() * m).sum() / denom) if kl is not None else 0.0,
        "ratio_mean": float((r * m).sum() / denom),
        "ratio_min": float(r[active].min()) if bool(active.any()) else 1.0,
        "ratio_max": float(r[active].max()) if bool(active.any()) else 1.0,
        "num_tokens": float(n_tokens),
    }


def grpo_loss_part(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    total_rows: int,
    total_tokens: float,
    aggregation: str = "grpo",
    **kwargs,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch's share of the full-batch `grpo_loss` (gradient accumulation).

    For micro-batches that partition a batch of ``total_rows`` completions with ``total_tokens`` active tokens,
    the shares sum to the one-batch loss (so their gradients sum to its gradient), for every aggregation:
    ``grpo`` and ``dr_grpo`` divide by the row count, so the micro-batch loss is scaled by
    ``rows / total_rows``; ``dapo`` and ``bnpo`` become ``sum / total_tokens`` (TRL's ``num_items_in_batch``).
    Unlike TRL's ``bnpo`` (normalised per micro-batch), micro-batching here never changes the objective.
    ``kwargs`` go to `grpo_loss` (clip, beta, max_completion_length).
    """
    if total_rows < 1:
        raise ValueError(f"total_rows must be >= 1, got {total_rows}")
    if aggregation in ("dapo", "bnpo"):
        return grpo_loss(logp, old_logp, ref_logp, advantages, mask, aggregation="dapo",
                         num_items_in_batch=max(float(total_tokens), 1.0), **kwargs)
    loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, aggregation=aggregation, **kwargs)
    return loss * (logp.shape[0] / total_rows), stats


def grpo_micro_losses(model, seqs: dict[str, torch.Tensor], advantages: torch.Tensor,
                      old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None, micro_batch_size: int = 0,
                      **loss_kwargs):
    """The GRPO loss of all ``N`` rows as one `grpo_loss_part` per micro-batch of ``micro_batch_size`` rows
    (0: one), yielded as ``(loss, stats)`` one forward at a time, so that the caller can backward each share
    before the next forward (gradient accumulation: the shares sum to the one-batch loss for every aggregation).
    ``old_logp`` None means the current policy (ratio 1, μ = 1)."""
    n = seqs["input_ids"].shape[0]
    total_tokens = float(seqs["completion_mask"][:, 1:].sum())
    for rows in micro_batches(n, micro_batch_size):
        part = take_rows(seqs, rows)
        logp, mask = completion_logp(model, part)
        width = logp.shape[1]
        old = logp.detach() if old_logp is None else old_logp[rows, :width]
        ref = None if ref_logp is None else ref_logp[rows, :width]
        yield grpo_loss_part(logp, old, ref, advantages[rows], mask, total_rows=n, total_tokens=total_tokens,
                             **loss_kwargs)


def token_weighted(stats: list[dict[str, float]]) -> dict[str, float]:
    """The token-weighted means of ``kl``, ``clip_frac`` and ``ratio_mean`` over micro-batches' stats."""
    sums, tokens = {"kl": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0}, 0.0
    for st in stats:
        tokens += st["num_tokens"]
        for k in sums:
            sums[k] += st[k] * st["num_tokens"]
    return {k: v / tokens if tokens else 0.0 for k, v in sums.items()}


def accumulate_grpo_gradients(model, seqs: dict[str, torch.Tensor], advantages: torch.Tensor,
                              old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                              micro_batch_size: int = 0, **loss_kwargs) -> tuple[float, dict[str, float]]:
    """Backward of the GRPO loss of all ``N`` rows, ``micro_batch_size`` rows per forward (gradient
    accumulation; 0: one forward). Each micro-batch adds its `grpo_loss_part`, so the accumulated gradient is the
    one-batch gradient for every aggregation. ``old_logp`` None means the current policy (ratio 1, μ = 1).
    Returns the loss value and the token-weighted means of ``kl``, ``clip_frac`` and ``ratio_mean``."""
    loss_value, stats = 0.0, []
    for loss, st in grpo_micro_losses(model, seqs, advantages, old_logp, ref_logp, micro_batch_size,
                                      **loss_kwargs):
        loss.backward()
        loss_value += float(loss.detach())
        stats.append(st)
    return loss_value, token_weighted(stats)


def prompt_losses(model, seqs: dict[str, torch.Tensor], advantages: torch.Tensor, old_logp: torch.Tensor | None,
                  ref_logp: torch.Tensor | None, group_size: int,
                  **loss_kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """One loss per prompt, shape ``[B]``: `grpo_loss` over the prompt's own G rollouts (rows ``p * G + i``), so
    that for aggregations ``grpo`` / ``dr_grpo`` (`PER_PROMPT_AGGREGATIONS`) the batch loss is their mean. All
    prompts run in one forward of one packed row each (`logprobs.pack_groups`): a per-sample gradient (DP) is then
    the gradient of one prompt's G rollouts. ``old_logp`` None means the current policy. Returns the losses and the
    token-weighted means of ``kl``, ``clip_frac`` and ``ratio_mean``."""
    logp = packed_logp(model, pack_groups(seqs, group_size))
    mask = seqs["completion_mask"][:, 1:]
    losses, stats = [], []
    for p in range(logp.shape[0] // group_size):
        rows = slice(p * group_size, (p + 1) * group_size)
        old = logp[rows].detach() if old_logp is None else old_logp[rows]
        ref = None if ref_logp is None else ref_logp[rows]
        loss, st = grpo_loss(logp[rows], old, ref, advantages[rows], mask[rows], **loss_kwargs)
        losses.append(loss)
        stats.append(st)
    return torch.stack(losses), token_weighted(stats)
