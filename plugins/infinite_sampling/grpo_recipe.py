"""Recipe ``grpo``: group-relative policy optimisation over the rollouts of a ``sampler:`` scheduler.

Each step (a function of ``(run.seed, step)`` and the weights, so a resumed run repeats an uninterrupted one):

1. ``prompts_per_step`` train prompts (a seeded permutation per epoch, as ``plait.step.BatchOrder``), or the
   grad transform's own sample (DP: Poisson sampling of prompts);
2. ``group_size`` completions per prompt from ``run.build("sampler")`` (each rollout seeded by
   ``(sampler.seed, step, prompt, sample)``; under DP by `rollout.rollout_key`), at most ``max_new_tokens``
   tokens, EOS included;
3. rewards: the weighted sum of the ``rewards:`` specs (`scoring.score_completions`; a raising or non-finite value
   fails the run naming the sample, or counts 0 with ``reward_on_error: skip``);
4. advantages `grpo_loss.group_advantages` (scale group / batch / none);
5. ``num_iterations`` updates of the shared first-order step (`plait.step.FirstOrderStep`: AdamW, the LR of
   ``schedule`` — constant / linear / cosine to 0 at ``run.steps``, after ``warmup_steps`` linear warm-up
   steps — set from the step number so that a resumed run follows the same schedule, global-norm clipping at
   ``max_grad_norm``, and the ``grad_transform:`` chain) whose objective is `grpo_loss.grpo_loss` over the step's
   rollouts (clip, k3 KL to a frozen reference when ``beta > 0``). The old-policy log-probs are computed once per
   step, before the first update, without gradient (the snapshot); with ``num_iterations = 1`` they equal the
   current ones (ratio 1). With ``micro_batch_size`` > 0 every forward (loss, snapshot, reference) takes that
   many of the ``B * G`` rows, each trimmed to its longest row, and each micro-batch's share is backwarded before
   the next forward (`grpo_loss.accumulate_grpo_gradients`: the sum of the shares is the one-batch loss for every
   aggregation). Without a grad transform the trajectory is the one this recipe had before the shared step.

Grad transforms (``grad_transform:``, one mapping or a list; see `plait.step`): ``sam`` (its ascent re-runs the
step's loss on the same rollouts, micro-batches included), ``flashdp`` / ``dp_flat`` (DP GRPO). The rollouts,
rewards, advantages, snapshot and reference log-probs are made before the step, at the current weights; the
transform only sees the loss.

DP GRPO — the privacy unit is one training prompt (its record: prompt and answer fields). The transform's Poisson
sampling draws prompts (``batch_indices(step)`` gives prompt indices, rate q = ``prompts_per_step`` / train
prompts, which is what the accountant uses); the G rollouts are then generated for the sampled prompts. Each
prompt's G rollouts and their loss terms are one "sample": `sample_losses` returns one loss per prompt (its share
of the GRPO objective: ``grpo`` — the mean over its G completions of each one's token mean; ``dr_grpo`` — its
token sum over ``G * max_new_tokens``; the batch loss is their mean), and the loss forward packs each prompt's
rollouts into one row (`logprobs.pack_groups`: block-diagonal causal mask, positions restarting per rollout, so
the logits are those of the unpacked rows; the attention of a packed row is quadratic in G * (prompt + completion)
length, and a model that does not honour the 4-D mask and positions is refused at start-up by
`logprobs.check_packing`).
The DP layers take the rows of a forward as the samples, so a row's per-sample gradient is the prompt's whole
gradient and clipping bounds each prompt's influence at C (clipping the B * G unpacked rows would bound each
rollout at C and a prompt at G * C: not the unit sampled). A prompt's loss depends
on its own record only: rewards come from the model's own samples and the record's answer fields; advantages are
scaled within the group; each prompt's rollouts are drawn with seeds keyed by the prompt's text and the step
(`rollout.rollout_key`), not by its place in the batch. Hence refused with a private transform: ``advantage_scale:
batch`` and aggregations ``dapo`` / ``bnpo`` (they normalise over the batch), ``num_iterations`` > 1 (several
updates per sampled batch), ``micro_batch_size`` > 0 (the DP layers clip and add noise in one backward per step),
``warmup_sft_steps`` > 0 and a length ``predictor`` (both learn from the prompts without DP). Reward functions
must score each completion from its own prompt and fields (the built-in ones do). The logged ``train/*`` values
are computed from the sampled batch and are not covered by ε (as in ``sft``): the guarantee is for the weights.

The policy runs in eval mode throughout (no dropout): sampling, old log-probs and the loss then see the same
function, so the ratio is exactly 1 on the first pass (`FirstOrderStep` switches the model to train mode at each
step; the objective switches it back before any forward, and the step ends in eval mode).
``warmup_sft_steps`` > 0 first trains on the task's ``completion`` field (teacher forcing, AdamW at
``warmup_lr``); the reference model is the model after warm-up. Warm-up runs only in a fresh run (a resumed run
restores the weights it produced).

Evaluation: greedy decoding of the eval prompts; ``eval/accuracy`` is exact match against ``answer`` (stripped),
``eval/reward_mean`` the configured reward.

The parts live beside this module: `rollout` (sampling through the scheduler, length predictions, greedy
completions), `scoring` (reward specs, rewards, group advantages), `logprobs` (the forwards: plain, micro-batched,
packed) and `grpo_loss` (the clipped objective with k3 KL, its micro-batch and per-prompt forms), `reporting`
(metrics, the eval completions' text table).

    plait run configs/grpo/addition.yaml
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from plait.errors import ConfigError
from plait.plugins.basics.data import collate, tokenize_example
from plait.run import Run, train_loop
from plait.step import Backwarded, BatchOrder, FirstOrderStep, StepProgress

from .config import GRPORecipeConfig
from .grpo_loss import (
    AGGREGATIONS,
    PER_PROMPT_AGGREGATIONS,
    SCALES,
    accumulate_grpo_gradients,
    grpo_micro_losses,
    prompt_losses,
    token_weighted,
)
from .logprobs import PACKING_TOLERANCE, batched_logp, check_packing
from .predictor import PREDICTORS, build_predictor
from .reporting import mean_over_iterations, rollout_metrics, samples_table
from .rewards import ON_ERROR, ExactMatch
from .rollout import generate_rollouts, greedy_generate, learn_lengths, predicted_lengths
from .scoring import build_rewards, group_scores, plain, score_completions

LR_SCHEDULES = ("constant", "linear", "cosine")


class GRPORecipe(StepProgress):
    """Builds model, data, sampler and rewards from the run; the shared `FirstOrderStep` moves the parameters
    (the GRPO loss over the step's rollouts is its objective); `train_loop` drives."""

    def __init__(self, run: Run, **options: Any):
        self.run = run
        self._last_step = run.resume_state[0] if run.resume_state is not None else 0  # for eval text summaries
        self.cfg = c = GRPORecipeConfig(**options)
        self._check_options()
        self.private = _declares_private(run)
        if self.private:
            self._check_private()
        self.fns, self.weights = build_rewards([plain(s) for s in c.rewards])
        self.sampler = run.build("sampler")
        g = getattr(self.sampler, "g", 0)
        if getattr(self.sampler, "_uses_g", True) and g and g > c.group_size:
            raise ConfigError(f"sampler.g: {g} concurrent rows exceeds recipe.group_size G={c.group_size}; "
                              "use g <= G")
        self.device = run.device
        bundle = run.build("model")
        model = bundle.model
        for transform in run.build_transforms():
            model = transform(model)
        self.model = model.to(self.device).eval()
        self.tok = bundle.tokenizer
        self.eos_id, self.pad_id = self.tok.eos_token_id, self.tok.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.eos_id if self.eos_id is not None else 0
        self._load_data(run)
        self.ref = None  # made after warm-up (fresh run) or from the checkpoint (resume)
        if c.beta > 0:  # copied before the grad transforms prepare the policy (a DP transform swaps its layers)
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.step = self._first_order_step(run)
        self.model, self.optimizer, self.grad_transform = self.step.model, self.step.optimizer, self.step.transform
        self._batch: _StepBatch | None = None  # the rollouts of the step in progress
        self._stats: dict[str, float] | None = None
        self.skipped = 0
        self.prefix_tokens = int(getattr(self.sampler, "prefix_tokens", 0) or 0)
        if self.prefix_tokens and c.predictor == "none":
            raise ConfigError(f"sampler.prefix_tokens: {self.prefix_tokens} probed tokens need a length predictor; "
                              "set recipe.predictor to constant, running_mean or mlp (or prefix_tokens: 0)")
        self.predictor = build_predictor(c.predictor, constant=c.predictor_constant or c.max_new_tokens,
                                         lr=c.predictor_lr, seed=run.cfg.run.seed, prefix_tokens=self.prefix_tokens)

    def _load_data(self, run: Run) -> None:
        """Train and eval examples and their prompts' token ids, the fields every train example has (passed to the
        rewards), the seeded prompt order."""
        c = self.cfg
        self.data = run.build("data")
        self.train_examples = self.data.examples("train")
        eval_examples = self.data.examples("eval")
        self.eval_examples = eval_examples[:c.eval_examples] if c.eval_examples else eval_examples
        if not self.train_examples:
            raise ConfigError("data: the train split is empty")
        for split, examples in (("train", self.train_examples), ("eval", self.eval_examples)):
            for i, e in enumerate(examples):
                if "prompt" not in e:
                    raise ConfigError(f"data: {split} example {i} has no 'prompt' field")
        self.train_prompts = [self._prompt_ids(e["prompt"]) for e in self.train_examples]
        self.eval_prompts = [self._prompt_ids(e["prompt"]) for e in self.eval_examples]
        self._check_capacity()
        self.fields = sorted(set.intersection(*(set(e) for e in self.train_examples)) - {"prompt"})
        self.order = BatchOrder(len(self.train_prompts), c.prompts_per_step, run.cfg.run.seed)

    def _first_order_step(self, run: Run) -> FirstOrderStep:
        """The shared first-order step with the ``grad_transform:`` chain. A transform that sums per-sample losses
        (DP) makes the run private: one loss per prompt, from one packed row per prompt."""
        c = self.cfg
        transform = run.build("grad_transform") if run.has("grad_transform") else None
        self.per_prompt = getattr(transform, "loss_reduction", "mean") == "sum"
        if self.per_prompt:
            self.private = True
            self._check_private()
            self._check_packing()
        return FirstOrderStep(run, self.model, self, optimizer="adamw", lr=c.lr, weight_decay=c.weight_decay,
                              schedule=c.schedule, warmup_steps=c.warmup_steps,
                              max_grad_norm=c.max_grad_norm, grad_accum=1, batch_size=c.prompts_per_step,
                              dataset_size=len(self.train_prompts), transform=transform)

    # --- checks -------------------------------------------------------------------------------------------------
    def _check_options(self) -> None:
        c = self.cfg
        if c.group_size < 2:
            raise ConfigError(f"recipe.group_size: must be >= 2 (GRPO normalises rewards within a group), "
                              f"got {c.group_size}")
        for key in ("prompts_per_step", "max_new_tokens", "num_iterations", "warmup_batch_size"):
            if getattr(c, key) < 1:
                raise ConfigError(f"recipe.{key}: must be at least 1, got {getattr(c, key)}")
        for key in ("warmup_sft_steps", "eval_examples", "eval_max_new_tokens", "top_k"):
            if getattr(c, key) < 0:
                raise ConfigError(f"recipe.{key}: must be >= 0, got {getattr(c, key)}")
        if c.temperature < 0:
            raise ConfigError(f"recipe.temperature: must be > 0 (0: greedy), got {c.temperature}")
        if c.temperature == 0:
            raise ConfigError("recipe.temperature: 0 (greedy) makes every completion of a group identical, so "
                              "every advantage is 0; use a temperature > 0")
        if c.reward_on_error not in ON_ERROR:
            raise ConfigError(f"recipe.reward_on_error: {c.reward_on_error!r}; allowed: {', '.join(ON_ERROR)}")
        if c.advantage_scale not in SCALES:
            raise ConfigError(f"recipe.advantage_scale: {c.advantage_scale!r}; allowed: {', '.join(SCALES)}")
        if c.aggregation not in AGGREGATIONS:
            raise ConfigError(f"recipe.aggregation: {c.aggregation!r}; allowed: {', '.join(AGGREGATIONS)}")
        if not (0 <= c.clip_eps_low < 1) or c.clip_eps_high < 0:
            raise ConfigError(f"recipe.clip_eps_low/high: need 0 <= clip_eps_low < 1 and clip_eps_high >= 0, got "
                              f"{c.clip_eps_low} and {c.clip_eps_high}")
        if c.beta < 0:
            raise ConfigError(f"recipe.beta: must be >= 0, got {c.beta}")
        if c.predictor not in PREDICTORS:
            raise ConfigError(f"recipe.predictor: {c.predictor!r}; allowed: {', '.join(PREDICTORS)}")
        if c.predictor_constant < 0:
            raise ConfigError(f"recipe.predictor_constant: must be >= 0 (0: max_new_tokens), got "
                              f"{c.predictor_constant}")
        if c.schedule not in LR_SCHEDULES:
            raise ConfigError(f"recipe.schedule: {c.schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
        for key in ("micro_batch_size", "warmup_steps"):
            if getattr(c, key) < 0:
                raise ConfigError(f"recipe.{key}: must be >= 0, got {getattr(c, key)}")
        for key in ("lr", "warmup_lr", "predictor_lr"):
            if not getattr(c, key) > 0:
                raise ConfigError(f"recipe.{key}: must be positive, got {getattr(c, key)}")

    def _prompt_ids(self, prompt: str) -> list[int]:
        bos = [] if self.tok.bos_token_id is None else [self.tok.bos_token_id]
        ids = bos + self.tok(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ConfigError(f"data: prompt {prompt!r} tokenizes to nothing")
        return ids

    def _check_capacity(self) -> None:
        c = self.cfg
        cap = getattr(self.sampler, "cache_capacity", 0)
        longest = max(range(len(self.train_prompts)), key=lambda i: len(self.train_prompts[i]))
        n = len(self.train_prompts[longest])
        if cap and n + c.max_new_tokens - 1 > cap:
            raise ConfigError(f"sampler.cache_capacity: {cap} positions, but train prompt {longest} "
                              f"({self.train_examples[longest]['prompt']!r}) has {n} tokens and needs {n} + "
                              f"max_new_tokens {c.max_new_tokens} - 1 = {n + c.max_new_tokens - 1}; raise "
                              f"cache_capacity or lower recipe.max_new_tokens")
        limit = getattr(self.model.config, "max_position_embeddings", None)
        everything = self.train_prompts + self.eval_prompts
        need = max(len(p) for p in everything) + max(c.max_new_tokens, c.eval_max_new_tokens)
        if limit and need > limit:
            key = "eval_max_new_tokens" if c.eval_max_new_tokens > c.max_new_tokens else "max_new_tokens"
            raise ConfigError(f"recipe.{key}: the longest prompt plus {key} is {need} tokens, more than the "
                              f"model's {limit} positions")

    def _check_private(self) -> None:
        """What a private ``grad_transform:`` (DP) cannot compose with: each would spend privacy the accountant does
        not count, or give a prompt a loss that depends on other prompts (no per-prompt sensitivity)."""
        c = self.cfg
        refusals = [
            (c.warmup_sft_steps > 0, f"recipe.warmup_sft_steps: {c.warmup_sft_steps} supervised steps train on the "
             "private prompts' completions without DP; set 0 and start from a model tuned on public data"),
            (c.num_iterations > 1, f"recipe.num_iterations: {c.num_iterations} updates on one Poisson-sampled batch "
             "would each be counted by the accountant as a fresh sample; use 1"),
            (c.micro_batch_size > 0, f"recipe.micro_batch_size: {c.micro_batch_size}; under DP the step's loss is one "
             "forward and one backward (the DP layers clip every prompt's gradient and add the noise in that "
             "backward); use 0"),
            (c.advantage_scale == "batch", "recipe.advantage_scale: 'batch' scales every advantage by the std of the "
             "whole batch's rewards, so one prompt's loss depends on the others; use group or none"),
            (c.aggregation not in PER_PROMPT_AGGREGATIONS, f"recipe.aggregation: {c.aggregation!r} divides by the "
             "batch's total token count, so one prompt's loss depends on the others; use grpo or dr_grpo"),
            (c.predictor != "none", f"recipe.predictor: {c.predictor!r} learns from the private prompts' rollout "
             "lengths without DP (and is saved in checkpoints); use none"),
        ]
        for refused, message in refusals:
            if refused:
                raise ConfigError(f"{message} (with a private grad_transform)")

    def _check_packing(self) -> None:
        """A private transform's loss reads one packed row per prompt: refuse a model that computes it otherwise."""
        gap = check_packing(self.model, self.train_prompts, self.pad_id)
        if not gap < PACKING_TOLERANCE:
            raise ConfigError(f"model: {type(self.model).__name__} does not compute packed rollouts (a 4-D "
                              f"attention mask and position_ids) like unpacked ones (log-probs differ by "
                              f"{gap:.3g}); a private grad_transform needs one packed row per prompt — use an "
                              f"HF causal LM with attn_implementation eager or sdpa")

    # --- run ----------------------------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        if self.run.resume_state is None and self.cfg.warmup_sft_steps:
            self.run.log(0, self._warmup())
            if self.ref is not None:
                self.ref.load_state_dict(self.model.state_dict())
        result = train_loop(self.run, self)
        result["reward_skipped"] = self.skipped
        result["headline_metric"] = "train/reward_mean"  # the end-of-run table's training line
        result.update(self.step.summary())
        return result

    def _warmup(self) -> dict[str, float]:
        """Supervised steps on ``completion`` (teacher forcing); returns the mean loss of the last 10."""
        c = self.cfg
        if any("completion" not in e for e in self.train_examples):
            raise ConfigError("recipe.warmup_sft_steps: needs a 'completion' field in every train example")
        items = [tokenize_example(self.tok, e["prompt"], e["completion"], 10_000) for e in self.train_examples]
        order = BatchOrder(len(items), c.warmup_batch_size, self.run.cfg.run.seed + 1)
        opt = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=c.warmup_lr)
        losses = []
        for k in range(c.warmup_sft_steps):
            batch = collate([items[i] for i in order(k)], self.pad_id)
            batch = {key: v.to(self.device) for key, v in batch.items()}
            loss = self.model(**batch).loss
            loss.backward()
            if c.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return {"warmup/loss": sum(losses[-10:]) / len(losses[-10:]), "warmup/steps": float(c.warmup_sft_steps)}

    def _decode(self, ids: list[int]) -> str:
        if self.eos_id is not None and ids and ids[-1] == self.eos_id:
            ids = ids[:-1]
        return self.tok.decode(ids, skip_special_tokens=True)

    def _score(self, examples: list[dict], completions: list[str], step: int | None) -> tuple[list[float], int]:
        return score_completions(self.fns, self.weights, self.fields, examples, completions,
                                 self.cfg.reward_on_error, step)

    def _sequences(self, rollouts) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in rollouts.sequences(self.pad_id).items()}

    def _generate(self, prompts: list[list[int]], examples: list[dict], step: int, predicted):
        """The G rollouts of each prompt (`rollout.generate_rollouts`: under a private transform, one sampler call
        per prompt, seeded by the prompt's record)."""
        c = self.cfg
        return generate_rollouts(self.sampler, self.model, prompts, examples, step, predicted, private=self.private,
                                 group_size=c.group_size, max_new_tokens=c.max_new_tokens,
                                 sampling={"temperature": c.temperature, "top_k": c.top_k}, eos_id=self.eos_id,
                                 pad_id=self.pad_id)

    # --- Task protocol ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        self._last_step = step
        chain = self.step.transform
        idx = chain.batch_indices(step) if chain is not None else None  # Poisson-sampled prompts (DP)
        sampled = idx is not None
        if idx is None:
            idx = self.batch_indices(step, 0)
        out: dict[str, float] = {"train/prompts": float(len(idx))} if sampled else {}
        self._batch = self._rollout_batch(step, list(idx), out) if len(idx) else None
        out.update(mean_over_iterations([self._update(step) for _ in range(self.cfg.num_iterations)]))
        self._batch = None
        return out

    def _update(self, step: int) -> dict[str, float]:
        """One update of the shared step on the step's rollouts: its metrics, with the loss's kl / clip_frac /
        ratio_mean."""
        self._stats = None
        metrics = self.step(step)  # an empty Poisson batch: the transform supplies the (noise) update
        self.model.eval()  # FirstOrderStep sets train mode; the policy runs in eval mode (no dropout)
        if self._stats is not None:
            metrics.update({f"train/{k}": v for k, v in self._stats.items()})
        return metrics

    def _rollout_batch(self, step: int, idx: list[int], out: dict[str, float]) -> _StepBatch:
        """Rollouts, rewards and advantages of the step's prompts, and the snapshot / reference log-probs; the
        step's metrics are added to ``out``."""
        c, G = self.cfg, self.cfg.group_size
        examples = [self.train_examples[i] for i in idx]
        prompts = [self.train_prompts[i] for i in idx]
        predicted = predicted_lengths(self.predictor, self.prefix_tokens, prompts, G)
        rollouts = self._generate(prompts, examples, step, predicted)
        pred_metrics = learn_lengths(self.predictor, self.prefix_tokens, self.sampler, prompts, rollouts, predicted, G)
        texts = [self._decode(comp) for group in rollouts.completions for comp in group]
        rewards, skipped = self._score([e for e in examples for _ in range(G)], texts, step)
        self.skipped += skipped
        r, adv = group_scores(rewards, G, c.advantage_scale)
        adv = adv.to(self.device)
        seqs = self._sequences(rollouts)
        mb = c.micro_batch_size
        old_logp = batched_logp(self.model, seqs, mb) if c.num_iterations > 1 else None
        ref_logp = batched_logp(self.ref, seqs, mb) if self.ref is not None else None
        out.update({**rollout_metrics(r, rollouts, skipped), **pred_metrics})
        return _StepBatch(step, idx, seqs, adv, old_logp, ref_logp)

    # --- Objective (plait.step) -----------------------------------------------------------------------------
    def batch_indices(self, step: int, micro: int) -> list[int]:
        """The step's prompts (dataset indices) when no transform samples them: a seeded permutation per epoch."""
        return self.order(step - 1)

    def _current(self, idx) -> _StepBatch:
        b = self._batch
        if b is None or list(idx) != b.idx:
            raise RuntimeError(f"grpo: the step asked for the loss of prompts {list(idx)[:8]}, but the rollouts were "
                               f"generated for {None if b is None else b.idx[:8]}: a grad transform's "
                               f"batch_indices(step) must return the same prompts every time it is asked")
        self.model.eval()
        return b

    def _loss_kwargs(self) -> dict[str, Any]:
        c = self.cfg
        return dict(clip_eps_low=c.clip_eps_low, clip_eps_high=c.clip_eps_high, beta=c.beta,
                    aggregation=c.aggregation, max_completion_length=c.max_new_tokens)

    def _note(self, stats: dict[str, float]) -> None:
        """The step's kl / clip_frac / ratio_mean: from its first loss (SAM's ascent recomputes it at w + e)."""
        if self._stats is None:
            self._stats = stats

    def mean_loss(self, idx) -> torch.Tensor:
        """The step's GRPO loss (`grpo_loss` over its ``B * G`` rollouts, ``aggregation`` as configured). With
        ``micro_batch_size`` > 0 each micro-batch's share is backwarded as soon as it is computed (only one
        micro-batch's activations are alive) and the value comes back as `plait.step.Backwarded`."""
        b = self._current(idx)
        if self.cfg.micro_batch_size == 0:
            loss, stats = next(grpo_micro_losses(self.model, b.seqs, b.adv, b.old_logp, b.ref_logp, 0,
                                                 **self._loss_kwargs()))
            self._note(token_weighted([stats]))
            return loss
        value, stats = accumulate_grpo_gradients(self.model, b.seqs, b.adv, b.old_logp, b.ref_logp,
                                                 micro_batch_size=self.cfg.micro_batch_size, **self._loss_kwargs())
        self._note(stats)
        return Backwarded(value)

    def sample_losses(self, idx) -> torch.Tensor:
        """One loss per prompt, shape [B]: the prompt's share of the GRPO objective, ``grpo_loss`` over its own G
        rollouts (``grpo``: the mean over them of each one's token mean; ``dr_grpo``: their token sum over
        ``G * max_new_tokens``), so that the batch loss is their mean. All prompts run in one forward of one packed
        row each (`grpo_loss.prompt_losses`): a per-sample gradient (DP) is then the gradient of one prompt's G
        rollouts."""
        c = self.cfg
        if c.aggregation not in PER_PROMPT_AGGREGATIONS or c.advantage_scale == "batch":
            raise RuntimeError(f"grpo: aggregation {c.aggregation!r} / advantage_scale {c.advantage_scale!r} couple "
                               f"the prompts of a batch: there is no per-prompt loss")
        b = self._current(idx)
        losses, stats = prompt_losses(self.model, b.seqs, b.adv, b.old_logp, b.ref_logp, c.group_size,
                                      **self._loss_kwargs())
        self._note(stats)
        return losses

    def log_metrics(self, step: int) -> dict[str, float]:
        """The grad transforms' values at a logged step (e.g. DP's ε so far), not window-averaged."""
        return self.step.log_metrics(step)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        c = self.cfg
        self.model.eval()
        comps = greedy_generate(self.model, self.eval_prompts, c.eval_max_new_tokens or c.max_new_tokens,
                                self.eos_id, self.pad_id)
        texts = [self._decode(t) for t in comps]
        out = {"eval/mean_length": sum(map(len, comps)) / len(comps)}
        if all("answer" in e for e in self.eval_examples):
            em = ExactMatch("answer")([e["prompt"] for e in self.eval_examples], texts,
                                      answer=[e["answer"] for e in self.eval_examples])
            out["eval/accuracy"] = sum(em) / len(em)
        rewards, _ = self._score(self.eval_examples, texts, None)
        out["eval/reward_mean"] = sum(rewards) / len(rewards)
        # the first eval prompts' greedy completions with their rewards (TEXT tab), at the training step of this
        # evaluation (0 before training)
        self.run.logger.text("eval/samples", samples_table(self.eval_examples, texts, rewards), self._last_step)
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), **self.step.state_dict(), "reward_skipped": self.skipped}
        if self.ref is not None:
            state["ref"] = self.ref.state_dict()
        if self.predictor is not None:
            state["predictor"] = self.predictor.state_dict()
        return state

    def progress_state(self) -> dict[str, Any]:
        """What a skipped step keeps: `StepProgress`'s and the count of unscorable rollouts (they were made)."""
        return {**super().progress_state(), "reward_skipped": self.skipped}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        super().load_progress_state(state)
        self.skipped = int(state["reward_skipped"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.step.load_state_dict(state)
        self.skipped = int(state.get("reward_skipped", 0))
        if self.predictor is not None and "predictor" in state:
            self.predictor.load_state_dict(state["predictor"])
        if self.ref is not None:
            if "ref" not in state:
                raise ConfigError("run.resume: the checkpoint has no reference model (it was made with beta = 0); "
                                  "resume with the beta it was trained with")
            self.ref.load_state_dict(state["ref"])


@dataclass
class _StepBatch:
    """What one step's loss needs: its prompts (dataset indices), rollouts as rows ``b * G + i``, advantages and
    the snapshot / reference log-probs (None: the current policy / no reference)."""

    step: int
    idx: list[int]
    seqs: dict[str, torch.Tensor]
    adv: torch.Tensor
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None


def _declares_private(run: Run) -> bool:
    """Whether a ``grad_transform:`` entry (or a chain member) is registered as private (DP)."""
    comp = run.components.get("grad_transform")
    comps = comp if isinstance(comp, list) else [comp] if comp is not None else []
    return any(c.entry.extra.get("private") for c in comps)
