"""Recipe ``grpo``: group-relative policy optimisation over the rollouts of a ``sampler:`` scheduler.

Each step (a function of ``(run.seed, step)`` and the weights, so a resumed run repeats an uninterrupted one):

1. ``prompts_per_step`` train prompts (a seeded permutation per epoch, as ``plait.step.BatchOrder``);
2. ``group_size`` completions per prompt from ``run.build("sampler")`` (each rollout seeded by
   ``(sampler.seed, step, prompt, sample)``), at most ``max_new_tokens`` tokens, EOS included;
3. rewards: the weighted sum of the ``rewards:`` specs (`rewards.evaluate_rewards`; a raising or non-finite value
   fails the run naming the sample, or counts 0 with ``reward_on_error: skip``);
4. advantages `grpo_loss.group_advantages` (scale group / batch / none);
5. ``num_iterations`` AdamW updates on `grpo_loss.grpo_loss` (clip, k3 KL to a frozen reference when
   ``beta > 0``). The old-policy log-probs are computed once per step, before the first update, without
   gradient (the snapshot); with ``num_iterations = 1`` they equal the current ones (ratio 1). With
   ``micro_batch_size`` > 0 every forward (loss, snapshot, reference) takes that many of the ``B * G`` rows,
   each trimmed to its longest row, and the gradients accumulate (`accumulate_grpo_gradients`: the sum of
   the micro-batch shares is the one-batch loss for every aggregation). The LR follows ``lr_schedule``
   (constant / linear / cosine to 0 at ``run.steps``, after ``lr_warmup_steps`` linear warm-up steps), set
   from the step number, so a resumed run follows the same schedule.

The policy runs in eval mode throughout (no dropout): sampling, old log-probs and the loss then see the same
function, so the ratio is exactly 1 on the first pass. ``warmup_sft_steps`` > 0 first trains on the task's
``completion`` field (teacher forcing, AdamW at ``warmup_lr``); the reference model is the model after warm-up.
Warm-up runs only in a fresh run (a resumed run restores the weights it produced).

Evaluation: greedy decoding of the eval prompts; ``eval/accuracy`` is exact match against ``answer`` (stripped),
``eval/reward_mean`` the configured reward.

    plait run configs/grpo/addition.yaml
"""
from __future__ import annotations

import copy
import math
import re
from typing import Any

import torch

from plait.errors import ConfigError
from plait.plugins.basics.data import collate, tokenize_example
from plait.step import BatchOrder, lr_factor
from plait.run import Run, train_loop

from .config import GRPORecipeConfig
from .grpo_loss import AGGREGATIONS, SCALES, group_advantages, grpo_loss_part
from .predictor import PREDICTORS, build_predictor, kendall_tau, smape
from .rewards import ON_ERROR, REGEX_MODES, ExactMatch, PythonCallable, RegexFormat, evaluate_rewards

LR_SCHEDULES = ("constant", "linear", "cosine")
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


def completion_logp(model, seqs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of each next token ``[N, T-1]`` and the completion mask aligned with them."""
    logits = model(input_ids=seqs["input_ids"], attention_mask=seqs["attention_mask"]).logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32; fp64 stays
    targets = seqs["input_ids"][:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp, seqs["completion_mask"][:, 1:]


def micro_batches(n: int, size: int) -> list[slice]:
    """Row slices of at most ``size`` rows (``size`` 0: one slice of all ``n``)."""
    size = size if size > 0 else n
    return [slice(k, min(k + size, n)) for k in range(0, n, size)]


def take_rows(seqs: dict[str, torch.Tensor], rows: slice) -> dict[str, torch.Tensor]:
    """Rows of `Rollouts.sequences`, trimmed to their longest row (right padding only, so the causal logits of
    the kept positions do not change)."""
    width = int(seqs["attention_mask"][rows].sum(1).max())
    return {k: v[rows, :width] if v.dim() == 2 else v[rows] for k, v in seqs.items()}


@torch.no_grad()
def batched_logp(model, seqs: dict[str, torch.Tensor], micro_batch_size: int = 0) -> torch.Tensor:
    """`completion_logp` ``[N, T-1]`` computed ``micro_batch_size`` rows at a time (0 at padded positions past a
    micro-batch's longest row), for the old-policy snapshot and the reference model."""
    n, t = seqs["input_ids"].shape
    out = torch.zeros((n, t - 1), dtype=torch.float32, device=seqs["input_ids"].device)
    for rows in micro_batches(n, micro_batch_size):
        logp = completion_logp(model, take_rows(seqs, rows))[0]
        out = out.to(logp.dtype)
        out[rows, :logp.shape[1]] = logp
    return out


def accumulate_grpo_gradients(model, seqs: dict[str, torch.Tensor], advantages: torch.Tensor,
                              old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                              micro_batch_size: int = 0, **loss_kwargs) -> tuple[float, dict[str, float]]:
    """Backward of the GRPO loss of all ``N`` rows, ``micro_batch_size`` rows per forward (gradient
    accumulation; 0: one forward). Each micro-batch adds its `grpo_loss_part`, so the accumulated gradient is the
    one-batch gradient for every aggregation. ``old_logp`` None means the current policy (ratio 1, μ = 1).
    Returns the loss value and the token-weighted means of ``kl``, ``clip_frac`` and ``ratio_mean``."""
    n = seqs["input_ids"].shape[0]
    total_tokens = float(seqs["completion_mask"][:, 1:].sum())
    loss_value, sums, tokens = 0.0, {"kl": 0.0, "clip_frac": 0.0, "ratio_mean": 0.0}, 0.0
    for rows in micro_batches(n, micro_batch_size):
        part = take_rows(seqs, rows)
        logp, mask = completion_logp(model, part)
        width = logp.shape[1]
        old = logp.detach() if old_logp is None else old_logp[rows, :width]
        ref = None if ref_logp is None else ref_logp[rows, :width]
        loss, stats = grpo_loss_part(logp, old, ref, advantages[rows], mask, total_rows=n,
                                     total_tokens=total_tokens, **loss_kwargs)
        loss.backward()
        loss_value += float(loss.detach())
        tokens += stats["num_tokens"]
        for k in sums:
            sums[k] += stats[k] * stats["num_tokens"]
    return loss_value, {k: v / tokens if tokens else 0.0 for k, v in sums.items()}


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


class GRPORecipe:
    """Builds model, data, sampler, rewards and AdamW from the run, then drives `train_loop`."""

    def __init__(self, run: Run, **options: Any):
        self.run = run
        self.cfg = c = GRPORecipeConfig(**options)
        self._check_options()
        self.fns, self.weights = build_rewards([_plain(s) for s in c.rewards])
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
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        self.ref = None  # made after warm-up (fresh run) or from the checkpoint (resume)
        if c.beta > 0:
            self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.skipped = 0
        self.prefix_tokens = int(getattr(self.sampler, "prefix_tokens", 0) or 0)
        if self.prefix_tokens and c.predictor == "none":
            raise ConfigError(f"sampler.prefix_tokens: {self.prefix_tokens} probed tokens need a length predictor; "
                              "set recipe.predictor to constant, running_mean or mlp (or prefix_tokens: 0)")
        self.predictor = build_predictor(c.predictor, constant=c.predictor_constant or c.max_new_tokens,
                                         lr=c.predictor_lr, seed=run.cfg.run.seed, prefix_tokens=self.prefix_tokens)

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
        if c.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"recipe.lr_schedule: {c.lr_schedule!r}; allowed: {', '.join(LR_SCHEDULES)}")
        for key in ("micro_batch_size", "lr_warmup_steps"):
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

    # --- run ----------------------------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        if self.run.resume_state is None and self.cfg.warmup_sft_steps:
            self.run.log(0, self._warmup())
            if self.ref is not None:
                self.ref.load_state_dict(self.model.state_dict())
        result = train_loop(self.run, self)
        result["reward_skipped"] = self.skipped
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
        prompts = [e["prompt"] for e in examples]
        fields = {k: [e.get(k) for e in examples] for k in self.fields}
        try:
            res = evaluate_rewards(self.fns, self.weights, prompts, completions, fields,
                                   on_error=self.cfg.reward_on_error)
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

    def _sequences(self, rollouts) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in rollouts.sequences(self.pad_id).items()}

    # --- Task protocol ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        c = self.cfg
        idx = self.order(step - 1)
        examples = [self.train_examples[i] for i in idx]
        prompts = [self.train_prompts[i] for i in idx]
        predicted = None
        if self.prefix_tokens:  # partial decode: the sampler probes k tokens, then asks the predictor
            predicted = self.predictor
        elif self.predictor is not None:  # before generation: no prefix; one value per prompt, repeated G times
            per_prompt = self.predictor.predict_batch(prompts, [[] for _ in prompts])
            predicted = [[v] * c.group_size for v in per_prompt]
        rollouts = self.sampler.generate(self.model, prompts, group_size=c.group_size,
                                         max_new_tokens=c.max_new_tokens, step=step,
                                         sampling={"temperature": c.temperature, "top_k": c.top_k},
                                         eos_id=self.eos_id, pad_id=self.pad_id, predicted_lengths=predicted)
        pred_metrics: dict[str, float] = {}
        if self.prefix_tokens:  # score and train on the remaining lengths of the jobs that outlived the probe
            k, planned = self.prefix_tokens, self.sampler.last_predictions
            left = sorted(planned)
            if left:
                observed = [rollouts.lengths[b][i] - k for b, i in left]
                flat_pred = [planned[j] for j in left]
                pred_metrics = {"predictor/smape": smape(flat_pred, observed),
                                "predictor/kendall_tau": kendall_tau(flat_pred, observed),
                                "perf/probe_steps": float(rollouts.stats.probe_steps)}
                self.predictor.update([prompts[b] for b, _ in left],
                                      [rollouts.completions[b][i][:k] for b, i in left], observed)
        elif self.predictor is not None:
            observed = [n for row in rollouts.lengths for n in row]
            flat_pred = [v for row in predicted for v in row]
            pred_metrics = {"predictor/smape": smape(flat_pred, observed),
                            "predictor/kendall_tau": kendall_tau(flat_pred, observed)}
            self.predictor.update([p for p in prompts for _ in range(c.group_size)],
                                  [[] for _ in observed], observed)
        G = c.group_size
        flat_examples = [e for e in examples for _ in range(G)]
        texts = [self._decode(comp) for group in rollouts.completions for comp in group]
        rewards, skipped = self._score(flat_examples, texts, step)
        self.skipped += skipped
        r = torch.tensor(rewards, dtype=torch.float32).view(len(examples), G)
        adv = group_advantages(r, scale=c.advantage_scale).reshape(-1).to(self.device)
        seqs = self._sequences(rollouts)
        lr = c.lr * lr_factor(step, self.run.cfg.run.steps, c.lr_schedule, c.lr_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mb = c.micro_batch_size
        old_logp = batched_logp(self.model, seqs, mb) if c.num_iterations > 1 else None
        ref_logp = batched_logp(self.ref, seqs, mb) if self.ref is not None else None
        stats_sum: dict[str, float] = {}
        losses = []
        for _ in range(c.num_iterations):
            loss, stats = accumulate_grpo_gradients(
                self.model, seqs, adv, old_logp, ref_logp, micro_batch_size=mb, clip_eps_low=c.clip_eps_low,
                clip_eps_high=c.clip_eps_high, beta=c.beta, aggregation=c.aggregation,
                max_completion_length=c.max_new_tokens)
            if c.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            for k in ("kl", "clip_frac", "ratio_mean"):
                stats_sum[k] = stats_sum.get(k, 0.0) + stats[k]
        st = rollouts.stats
        lengths = [n for row in rollouts.lengths for n in row]
        return {
            "train/reward_mean": float(r.mean()),
            "train/reward_std": float(r.std()),
            "train/loss": sum(losses) / len(losses),
            "train/kl": stats_sum["kl"] / c.num_iterations,
            "train/clip_frac": stats_sum["clip_frac"] / c.num_iterations,
            "train/ratio_mean": stats_sum["ratio_mean"] / c.num_iterations,
            "train/completion_len": sum(lengths) / len(lengths),
            "train/lr": lr,
            "train/reward_skipped": float(skipped),
            "perf/decode_steps": float(st.decode_steps),
            "perf/rollout_s": float(st.wall_time_s),
            "mem/peak_kv_bytes": float(st.peak_kv_bytes),
            **pred_metrics,
        }

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.eval_examples:
            return {}
        c = self.cfg
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
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "reward_skipped": self.skipped}
        if self.ref is not None:
            state["ref"] = self.ref.state_dict()
        if self.predictor is not None:
            state["predictor"] = self.predictor.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped = int(state.get("reward_skipped", 0))
        if self.predictor is not None and "predictor" in state:
            self.predictor.load_state_dict(state["predictor"])
        if self.ref is not None:
            if "ref" not in state:
                raise ConfigError("run.resume: the checkpoint has no reference model (it was made with beta = 0); "
                                  "resume with the beta it was trained with")
            self.ref.load_state_dict(state["ref"])


def _plain(spec: Any) -> Any:
    """An OmegaConf node (or anything) as plain Python containers."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(spec):
            return OmegaConf.to_container(spec, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return dict(spec) if isinstance(spec, dict) else spec
