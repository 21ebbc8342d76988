"""Rollout samplers for grouped RL (GRPO): four schedulers, one `Rollouts` result.

``scheduler.generate(model, prompts, group_size=G, max_new_tokens, step, sampling, eos_id, pad_id)`` draws ``G``
completions for each of the ``B`` prompts (``N = B * G`` jobs ``(prompt_idx, sample_idx)``) and returns
`Rollouts` (per job: prompt ids, completion ids, length, truncated; plus `RolloutStats`).

* ``full_group``  — each prompt's G samples decode together in one batch padded to the longest (what HF
  ``generate`` does): finished rows keep decoding pad tokens until the batch ends. Steps per prompt = ``max L``.
* ``micro_group`` — each prompt's group in rounds of ``g`` rows, the KV cache released between rounds.
  Steps = ``sum over rounds of max L``; peak KV ≤ ``g (P + L_max)`` tokens whatever G is.
* ``continuous``  — ``g`` slots kept busy: a finished row is evicted and refilled in the next step with the next
  pending sample (same prompt, then the next prompt's group). Steps = makespan of the slot lanes.
* ``length_aware`` — continuous with predicted lengths: FPTAS lanes (LPT fallback), longest predicted job first
  within a lane, SJF refill by stealing (`schedule.PlannedDispatcher`). Predictions come from
  ``predicted_lengths`` (a list, flat ``[N]`` or nested ``[B][G]``, or a callable
  ``(prompt_idx, sample_idx, prompt_ids) -> int``).

Every step follows the semantics in ``schedule.py`` (a job's first token comes from its prompt's prefill logits,
later tokens from one batched decode forward over the slot cache of ``kv_cache.py``), so `schedule.simulate_*`
predict ``decode_steps`` and the live-KV trace exactly. Each job samples with its own ``torch.Generator`` seeded by
``(seed, step, prompt_idx, sample_idx)``, one draw per token, so completions do not depend on the scheduler (up
to float rounding of batched matmuls, which greedy/argmax and inverse-CDF draws are insensitive to in practice).

Partial decode (``length_aware`` with ``prefix_tokens = k > 0``, the paper's token-conditioned prediction): every
job first decodes its first ``k`` tokens in probe rounds of ``g`` rows (barrier rounds that stop at ``k`` tokens;
the KV is freed after each round, so memory stays bounded by ``g`` rows); then a predictor
(``predict_batch(prompts, prefixes)``, `predictor.py`) gives each unfinished job's remaining length from its
prompt and those ``k`` tokens, and the remaining tokens run on the planned slots. A resumed job re-prefills its
prompt and prefix (one batch-1 forward; its own generator continues), so completions stay the same as with any
other scheduler. Decode steps = probe steps (``stats.probe_steps``) + the makespan of the remaining lengths.

Tests force lengths with ``forced_lengths={(p, i): L}`` (or a callable): EOS is banned before token L and forced
at token L (``max_new_tokens`` still truncates).
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .kv_cache import PromptKV, SlotKVCache, prefill
from .schedule import LANE_ORDERS, FifoDispatcher, PlannedDispatcher


# --------------------------------------------------------------------------------------------------- results
@dataclass
class RolloutStats:
    decode_steps: int = 0  # token-emitting steps (the prefill-logit step of a batch counts as one)
    forward_calls: int = 0  # batched decode forwards
    prefills: int = 0  # prompt prefills (batch 1)
    tokens_generated: int = 0  # sum of completion lengths
    idle_slot_steps: int = 0  # row-steps that emitted nothing useful (pad rows, empty slots)
    probe_steps: int = 0  # length_aware with prefix_tokens k > 0: steps of the k-token probe rounds (included)
    peak_kv_bytes: int = 0  # peak live KV of the slot caches, measured each step
    peak_prompt_kv_bytes: int = 0  # peak KV held by shared prompt prefills waiting to be copied into rows
    peak_allocated_kv_bytes: int = 0  # largest preallocated slot cache
    live_kv_trace: list[int] = field(default_factory=list)  # live KV bytes per decode step
    wall_time_s: float = 0.0


@dataclass
class Rollouts:
    """``G`` completions for each of ``B`` prompts; ``[b][i]`` indexes prompt b, sample i."""

    prompt_ids: list[list[int]]
    completions: list[list[list[int]]]
    lengths: list[list[int]]
    truncated: list[list[bool]]
    stats: RolloutStats

    @property
    def group_size(self) -> int:
        return len(self.completions[0]) if self.completions else 0

    def sequences(self, pad_id: int) -> dict[str, torch.Tensor]:
        """Rows ``b * G + i`` = prompt + completion, right-padded: ``input_ids``, ``attention_mask``,
        ``completion_mask`` (1 on completion tokens) ``[N, T]``, ``prompt_index`` ``[N]``."""
        rows = [(b, self.prompt_ids[b], c) for b, group in enumerate(self.completions) for c in group]
        width = max(len(p) + len(c) for _, p, c in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        comp = torch.zeros((len(rows), width), dtype=torch.long)
        for n, (_, p, c) in enumerate(rows):
            ids[n, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
            attn[n, :len(p) + len(c)] = 1
            comp[n, len(p):len(p) + len(c)] = 1
        index = torch.tensor([b for b, _, _ in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": attn, "completion_mask": comp, "prompt_index": index}


# --------------------------------------------------------------------------------------------------- sampling
def sample_seed(seed: int, step: int, prompt_idx: int, sample_idx: int) -> int:
    """A 63-bit seed for one rollout, independent of how rollouts are scheduled."""
    digest = hashlib.blake2b(f"{seed}:{step}:{prompt_idx}:{sample_idx}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class Sampling:
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: the whole vocabulary

    @classmethod
    def parse(cls, sampling: dict | None) -> Sampling:
        d = dict(sampling or {})
        unknown = set(d) - {"greedy", "temperature", "top_k"}
        if unknown:
            raise ValueError(f"unknown sampling keys {sorted(unknown)}; allowed: greedy, temperature, top_k")
        s = cls(**d)
        if s.temperature == 0:
            s.greedy = True
        if not s.greedy and s.temperature < 0:
            raise ValueError(f"sampling temperature must be > 0 (or greedy=True), got {s.temperature}")
        if s.top_k < 0:
            raise ValueError(f"sampling top_k must be >= 0, got {s.top_k}")
        return s

    def draw(self, logits: torch.Tensor, gen: torch.Generator | None) -> int:
        """One token from float logits ``[V]`` (argmax, or an inverse-CDF draw with one uniform from ``gen``)."""
        if self.greedy:
            return int(torch.argmax(logits))
        z = logits.double().cpu() / self.temperature
        if 0 < self.top_k < z.numel():
            kth = torch.topk(z, self.top_k).values[-1]
            z = z.masked_fill(z < kth, float("-inf"))
        cdf = torch.cumsum(torch.softmax(z, dim=-1), dim=-1)
        u = torch.rand((), generator=gen, dtype=torch.float64)
        return min(int(torch.searchsorted(cdf, u * cdf[-1], right=True)), z.numel() - 1)


# --------------------------------------------------------------------------------------------------- one call
class _Job:
    __slots__ = ("p", "i", "gen", "tokens", "forced", "done", "truncated")

    def __init__(self, p: int, i: int, gen, forced: int | None):
        self.p, self.i, self.gen, self.forced = p, i, gen, forced
        self.tokens: list[int] = []
        self.done = self.truncated = False


class _Run:
    """State of one ``generate`` call: jobs, shared prompt KV, statistics."""

    def __init__(self, sched, model, prompts, G, max_new, step, sampling, eos_id, pad_id, forced_lengths):
        self.model, self.prompts, self.G, self.max_new = model, prompts, G, max_new
        self.sampling, self.eos_id, self.pad_id = sampling, eos_id, pad_id
        self.share = sched.share_prompt_kv
        self.capacity = sched.cache_capacity or max(len(p) for p in prompts) + max_new - 1
        self.stats = RolloutStats()
        self.jobs: dict[tuple[int, int], _Job] = {}
        for p in range(len(prompts)):
            for i in range(G):
                forced = forced_lengths(p, i) if callable(forced_lengths) else (forced_lengths or {}).get((p, i))
                if forced is not None and (eos_id is None or int(forced) < 1):
                    raise ValueError(f"forced length {forced!r} for job {(p, i)} needs eos_id and a value >= 1")
                gen = None
                if not sampling.greedy:
                    gen = torch.Generator().manual_seed(sample_seed(sched.seed, step, p, i))
                self.jobs[(p, i)] = _Job(p, i, gen, None if forced is None else int(forced))
        self._unstarted = [G] * len(prompts)
        self._shared: dict[int, PromptKV] = {}

    def take_prompt(self, p: int) -> PromptKV:
        """The prompt KV to copy into a row; shared prefills are kept until the prompt's last sample starts."""
        kv = self._shared.get(p) if self.share else None
        if kv is None:
            kv = prefill(self.model, self.prompts[p])
            self.stats.prefills += 1
            if self.share:
                self._shared[p] = kv
        held = sum(k.nbytes() for k in self._shared.values())
        self.stats.peak_prompt_kv_bytes = max(self.stats.peak_prompt_kv_bytes, held)
        self._unstarted[p] -= 1
        if self._unstarted[p] == 0:
            self._shared.pop(p, None)
        return kv

    def resume(self, job: _Job) -> PromptKV:
        """KV of a probed job (prompt + its tokens so far, one prefill); its logits give the next token."""
        self.stats.prefills += 1
        return prefill(self.model, self.prompts[job.p] + job.tokens)

    def emit(self, job: _Job, logits: torch.Tensor) -> None:
        """Append one token to ``job`` from ``logits`` [V]; mark it done at EOS or max_new_tokens."""
        j = len(job.tokens) + 1
        if job.forced is not None and j == job.forced:
            tok = self.eos_id
        else:
            if job.forced is not None:
                logits = logits.clone()
                logits[self.eos_id] = float("-inf")
            tok = self.sampling.draw(logits, job.gen)
        job.tokens.append(tok)
        if self.eos_id is not None and tok == self.eos_id:
            job.done = True
        elif j >= self.max_new:
            job.done = job.truncated = True

    def measure(self, cache: SlotKVCache) -> None:
        live = cache.live_bytes()
        self.stats.live_kv_trace.append(live)
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, live)
        self.stats.peak_allocated_kv_bytes = max(self.stats.peak_allocated_kv_bytes, cache.allocated_bytes())

    def run_barrier_round(self, round_jobs: list[tuple[int, int]], limit: int = 0) -> None:
        """HF-generate-style batch: rows stay (decoding pad) until every job of the round is done (or, with
        ``limit`` > 0, has ``limit`` tokens: a probe round); then the round's cache is freed."""
        jobs = [self.jobs[k] for k in round_jobs]

        def stopped(job: _Job) -> bool:
            return job.done or (limit > 0 and len(job.tokens) >= limit)

        cache = SlotKVCache(self.model, len(jobs), self.capacity)
        first = []
        for r, job in enumerate(jobs):
            kv = self.take_prompt(job.p)
            cache.fill(r, kv)
            first.append(kv.last_logits)
        fed = [self.pad_id] * len(jobs)
        t = 0
        while not all(stopped(job) for job in jobs):
            t += 1
            logits = None
            if t > 1:
                logits = cache.decode(self.model, fed, [True] * len(jobs))
                self.stats.forward_calls += 1
            self.stats.decode_steps += 1
            self.measure(cache)
            for r, job in enumerate(jobs):
                if stopped(job):
                    self.stats.idle_slot_steps += 1
                    fed[r] = self.pad_id
                    continue
                self.emit(job, first[r] if logits is None else logits[r])
                fed[r] = job.tokens[-1]
        del cache

    def run_slots(self, g: int, dispatcher) -> None:
        """``g`` slots, each refilled as soon as its job ends (continuous / length-aware)."""
        cache = SlotKVCache(self.model, g, self.capacity)
        slot: list[_Job | None] = [None] * g
        fresh: list[torch.Tensor | None] = [None] * g  # prompt logits of a job that starts this step
        while True:
            for s in range(g):
                if slot[s] is None:
                    key = dispatcher.next_job(s)
                    if key is not None:
                        slot[s] = self.jobs[key]
                        kv = self.resume(slot[s]) if slot[s].tokens else self.take_prompt(slot[s].p)
                        cache.fill(s, kv)
                        fresh[s] = kv.last_logits
            if all(job is None for job in slot):
                break
            active = [job is not None and fresh[s] is None for s, job in enumerate(slot)]
            logits = None
            if any(active):
                fed = [job.tokens[-1] if a else self.pad_id for job, a in zip(slot, active)]
                logits = cache.decode(self.model, fed, active)
                self.stats.forward_calls += 1
            self.stats.decode_steps += 1
            self.measure(cache)
            for s, job in enumerate(slot):
                if job is None:
                    self.stats.idle_slot_steps += 1
                    continue
                self.emit(job, fresh[s] if fresh[s] is not None else logits[s])
                fresh[s] = None
                if job.done:
                    cache.release(s)
                    slot[s] = None
        del cache

    def rollouts(self) -> Rollouts:
        B = len(self.prompts)
        grid = [[self.jobs[(p, i)] for i in range(self.G)] for p in range(B)]
        self.stats.tokens_generated = sum(len(j.tokens) for j in self.jobs.values())
        return Rollouts(
            prompt_ids=[list(p) for p in self.prompts],
            completions=[[list(j.tokens) for j in row] for row in grid],
            lengths=[[len(j.tokens) for j in row] for row in grid],
            truncated=[[j.truncated for j in row] for row in grid],
            stats=self.stats,
        )


# --------------------------------------------------------------------------------------------------- schedulers
def _check_prompts(prompts, max_new_tokens: int, capacity: int) -> None:
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt (a list of token ids)")
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {b} is empty; every prompt needs at least one token")
        if capacity:
            if len(p) > capacity:
                raise ValueError(f"prompt {b} has {len(p)} tokens, longer than cache_capacity {capacity}")
            need = len(p) + max_new_tokens - 1
            if need > capacity:
                raise ValueError(f"prompt {b} has {len(p)} tokens: a row needs {len(p)} + max_new_tokens "
                                 f"{max_new_tokens} - 1 = {need} cache positions but cache_capacity is {capacity}")


class _Scheduler:
    """Shared ``generate``; subclasses define ``_uses_g``, ``schedule`` and ``_execute``."""

    name = "?"
    _uses_g = True

    def __init__(self, g: int = 4, cache_capacity: int = 0, share_prompt_kv: bool = True, seed: int = 0):
        if self._uses_g and g < 1:
            raise ValueError(f"{self.name}: g (concurrent rows) must be >= 1, got {g}")
        if cache_capacity < 0:
            raise ValueError(f"{self.name}: cache_capacity must be >= 0 (0: sized per call), got {cache_capacity}")
        self.g, self.cache_capacity, self.share_prompt_kv, self.seed = g, cache_capacity, share_prompt_kv, seed

    def _check(self, prompts, group_size: int, max_new_tokens: int) -> None:
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO normalises rewards within a group), got {group_size}")
        if self._uses_g and self.g > group_size:
            raise ValueError(f"{self.name}: g={self.g} concurrent rows exceeds group_size G={group_size}; "
                             "use g <= G")
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        _check_prompts(prompts, max_new_tokens, self.cache_capacity)

    @torch.no_grad()
    def generate(self, model, prompts: Sequence[Sequence[int]], group_size: int, max_new_tokens: int,
                 step: int = 0, sampling: dict | None = None, eos_id: int | None = None, pad_id: int = 0,
                 forced_lengths: dict | Callable | None = None, predicted_lengths=None) -> Rollouts:
        """``group_size`` completions per prompt; see the module docstring. ``forced_lengths`` is for tests;
        ``predicted_lengths`` is used by ``length_aware`` and ignored by the other schedulers."""
        self._check(prompts, group_size, max_new_tokens)
        params = Sampling.parse(sampling)
        prompts = [list(map(int, p)) for p in prompts]
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            run = _Run(self, model, prompts, group_size, max_new_tokens, step, params, eos_id, pad_id,
                       forced_lengths)
            self._execute(run, len(prompts), group_size, max_new_tokens, predicted_lengths)
        finally:
            model.train(was_training)
        out = run.rollouts()
        out.stats.wall_time_s = time.perf_counter() - t0
        return out

    def schedule(self, prompts: list, group_size: int) -> list[list[tuple[int, int]]]:
        """The static plan (``plait.protocols.SamplerScheduler``): batches of ``(prompt_idx, sample_idx)``."""
        raise NotImplementedError

    def _execute(self, run: _Run, B: int, G: int, max_new: int, predicted_lengths=None) -> None:
        raise NotImplementedError


class FullGroupScheduler(_Scheduler):
    """All G samples of a prompt in one padded batch (HF ``generate``)."""

    name = "full_group"
    _uses_g = False

    def __init__(self, cache_capacity: int = 0, share_prompt_kv: bool = True, seed: int = 0):
        super().__init__(g=0, cache_capacity=cache_capacity, share_prompt_kv=share_prompt_kv, seed=seed)

    def schedule(self, prompts, group_size):
        return [[(b, i) for i in range(group_size)] for b in range(len(prompts))]

    def _execute(self, run, B, G, max_new, predicted_lengths=None):
        for batch in self.schedule(run.prompts, G):
            run.run_barrier_round(batch)


class MicroGroupScheduler(_Scheduler):
    """Each prompt's group in rounds of ``g`` rows; the KV cache is freed between rounds."""

    name = "micro_group"

    def schedule(self, prompts, group_size):
        return [[(b, i) for i in range(k, min(k + self.g, group_size))]
                for b in range(len(prompts)) for k in range(0, group_size, self.g)]

    def _execute(self, run, B, G, max_new, predicted_lengths=None):
        for batch in self.schedule(run.prompts, G):
            run.run_barrier_round(batch)


class ContinuousScheduler(_Scheduler):
    """``g`` slots kept busy; a finished row is refilled at once (same prompt, then the next group)."""

    name = "continuous"

    def schedule(self, prompts, group_size):
        return [[(b, i) for b in range(len(prompts)) for i in range(group_size)]]  # refill order

    def _execute(self, run, B, G, max_new, predicted_lengths=None):
        run.run_slots(self.g, FifoDispatcher(self.schedule(run.prompts, G)[0]))


class LengthAwareScheduler(ContinuousScheduler):
    """Continuous decoding planned from predicted lengths: FPTAS lanes (LPT fallback) + SJF refill."""

    name = "length_aware"

    def __init__(self, g: int = 4, cache_capacity: int = 0, share_prompt_kv: bool = True, seed: int = 0,
                 fptas_eps: float = 0.1, max_states: int = 20_000, lane_order: str = "longest_first",
                 prefix_tokens: int = 0, predictor: Callable | None = None):
        super().__init__(g=g, cache_capacity=cache_capacity, share_prompt_kv=share_prompt_kv, seed=seed)
        if prefix_tokens < 0:
            raise ValueError(f"length_aware: prefix_tokens must be >= 0, got {prefix_tokens}")
        if fptas_eps <= 0:
            raise ValueError(f"length_aware: fptas_eps must be > 0, got {fptas_eps}")
        if max_states < 0:
            raise ValueError(f"length_aware: max_states must be >= 0 (0: always the LPT fallback), got {max_states}")
        if lane_order not in LANE_ORDERS:
            raise ValueError(f"length_aware: lane_order {lane_order!r} is not allowed; allowed: "
                             f"{', '.join(LANE_ORDERS)}")
        self.fptas_eps, self.max_states, self.lane_order = fptas_eps, max_states, lane_order
        self.prefix_tokens, self.predictor = prefix_tokens, predictor
        self.last_plan = None  # the FptasResult of the latest generate call
        self.last_predictions: dict = {}  # job -> the length planned with (remaining after the probe if k > 0)

    def predictions(self, prompts, group_size: int, max_new: int, predicted_lengths=None) -> list[int]:
        """Predicted length per job in prompt-major order, clamped to [1, max_new]; max_new when unknown."""
        source = predicted_lengths if predicted_lengths is not None else self.predictor
        n = len(prompts) * group_size
        if source is None:
            values = [max_new] * n
        elif callable(source):
            values = [source(b, i, prompts[b]) for b in range(len(prompts)) for i in range(group_size)]
        else:
            values = list(source)
            if values and isinstance(values[0], (list, tuple)):
                values = [v for row in values for v in row]
            if len(values) != n:
                raise ValueError(f"predicted_lengths has {len(values)} values for {len(prompts)} prompts x "
                                 f"group_size {group_size} = {n} jobs")
        return [min(max(int(round(v)), 1), max_new) for v in values]

    def schedule(self, prompts, group_size, predicted_lengths=None, max_new_tokens: int = 1):
        jobs = super().schedule(prompts, group_size)[0]
        pred = self.predictions(prompts, group_size, max_new_tokens, predicted_lengths)
        plan = PlannedDispatcher(jobs, pred, self.g, self.fptas_eps, self.max_states, self.lane_order).plan
        return [[jobs[k] for k in lane] for lane in plan.lanes]

    def _execute(self, run, B, G, max_new, predicted_lengths=None):
        jobs = super().schedule(run.prompts, G)[0]
        k = self.prefix_tokens
        if k > 0:
            source = predicted_lengths if predicted_lengths is not None else self.predictor
            if not hasattr(source, "predict_batch"):
                raise ValueError(f"length_aware: prefix_tokens = {k} needs a predictor with predict_batch(prompts, "
                                 f"prefixes) (see predictor.py), got {type(source).__name__}")
            for r in range(0, len(jobs), self.g):  # probe: the first k tokens of every job, rounds of g
                run.run_barrier_round(jobs[r:r + self.g], limit=k)
            run.stats.probe_steps = run.stats.decode_steps
            jobs = [j for j in jobs if not run.jobs[j].done]
            rem = source.predict_batch([run.prompts[b] for b, _ in jobs], [list(run.jobs[j].tokens) for j in jobs])
            pred = [min(max(int(round(v)), 1), max(max_new - k, 1)) for v in rem]
        else:
            pred = self.predictions(run.prompts, G, max_new, predicted_lengths)
        self.last_predictions = dict(zip(jobs, pred))
        dispatcher = PlannedDispatcher(jobs, pred, self.g, self.fptas_eps, self.max_states, self.lane_order)
        self.last_plan = dispatcher.plan
        run.run_slots(self.g, dispatcher)


SCHEDULERS = {c.name: c for c in (FullGroupScheduler, MicroGroupScheduler, ContinuousScheduler,
                                  LengthAwareScheduler)}
