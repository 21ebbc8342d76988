"""Pure-Python scheduling for Infinite Sampling: plans, dispatchers and a step simulator (no torch).

A *job* is one rollout ``(prompt_idx, sample_idx)``; its length ``L`` is the number of completion tokens it emits
(EOS included). ``g`` decode slots run jobs; one *decode step* emits one token for every busy slot.

Step semantics (shared by the samplers in ``samplers.py`` and by `simulate_slots`, so the simulator is an exact
oracle of the samplers' step counts and live KV):

* at the start of step ``s`` every free slot takes its next job (the job's prompt KV is placed in the slot);
* every busy slot emits one token; a job emitting its ``L``-th token ends and frees its slot for step ``s + 1``;
* during its ``j``-th step a job holds ``P + j - 1`` tokens of KV (the prompt plus the tokens fed so far).

Hence barrier rounds (HF ``generate``: rows stay until the round ends) take ``max L`` steps per round, and a slot
that is refilled at once runs its jobs back to back, so continuous decoding takes the makespan of the lanes.

Plans:

* `sort_and_chunk` — rounds of ``g`` over lengths sorted longest first: optimal for the barrier objective
  ``sum_r max_{i in r} L_i`` (the r-th round's maximum is at least the ((r-1)g+1)-th largest length).
* `lpt` — longest processing time first list scheduling, makespan ≤ (4/3 - 1/(3m)) OPT.
* `fptas_makespan` — P||Cmax with m lanes: lengths rounded up to multiples of ``K = eps * LB / n``
  (``LB = max(ceil(sum/m), max)``), exact DP over sorted rounded-load vectors (pruned by the LPT bound), so the
  true makespan is ≤ OPT + n K ≤ (1 + eps) OPT. Falls back to LPT when the state count passes ``max_states``.

Dispatchers decide, at run time, which pending job a freed slot takes: `FifoDispatcher` (continuous sampling: the
next sample of the same prompt, then the next prompt's group) and `PlannedDispatcher` (length-aware: the slot's
FPTAS lane, shortest predicted job first (SJF); an empty lane steals the shortest job of the lane with the most
predicted work left, which never increases the planned makespan).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Hashable, Sequence

Job = Hashable  # usually (prompt_idx, sample_idx)


# --------------------------------------------------------------------------------------------------- objectives
def barrier_steps(rounds_lengths: Sequence[Sequence[int]]) -> int:
    """Decode steps of barrier rounds: sum over rounds of the longest job."""
    return sum(max(r) for r in rounds_lengths if len(r))


def makespan(lanes_lengths: Sequence[Sequence[int]]) -> int:
    """Decode steps of lanes run back to back: the largest lane sum."""
    return max((sum(lane) for lane in lanes_lengths), default=0)


def makespan_lower_bound(lengths: Sequence[int], m: int) -> int:
    return max(math.ceil(sum(lengths) / m), max(lengths, default=0))


# --------------------------------------------------------------------------------------------------- plans
def sort_and_chunk(lengths: Sequence[int], g: int) -> list[list[int]]:
    """Indices of ``lengths`` in rounds of ``g``, longest first: the optimum of the barrier objective."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[k:k + g] for k in range(0, len(order), g)]


def lpt(lengths: Sequence[int], m: int) -> list[list[int]]:
    """LPT list scheduling: indices of ``lengths`` per lane (m lanes)."""
    heap = [(0, lane) for lane in range(m)]
    lanes: list[list[int]] = [[] for _ in range(m)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, lane = heapq.heappop(heap)
        lanes[lane].append(i)
        heapq.heappush(heap, (load + lengths[i], lane))
    return lanes


@dataclass
class FptasResult:
    lanes: list[list[int]]  # job indices per lane
    makespan: int  # true (unrounded) makespan of ``lanes``
    exact_dp: bool  # False: the state space was too large and LPT was used
    states: int = 0  # DP states visited (for reports)


def fptas_makespan(lengths: Sequence[int], m: int, eps: float = 0.1, max_states: int = 200_000) -> FptasResult:
    """(1 + eps)-approximate P||Cmax over ``m`` lanes (see the module docstring); LPT fallback."""
    if m < 1:
        raise ValueError(f"need at least one lane, got m={m}")
    if eps <= 0:
        raise ValueError(f"fptas_eps must be > 0, got {eps}")
    if any(p < 0 for p in lengths):
        raise ValueError("job lengths must be >= 0")
    n = len(lengths)
    fallback = lpt(lengths, m)
    fallback_span = makespan([[lengths[i] for i in lane] for lane in fallback])
    if n == 0 or m == 1 or n <= m:
        return FptasResult(fallback, fallback_span, True)
    lb = makespan_lower_bound(lengths, m)
    k = max(eps * lb / n, 1e-12)
    q = [math.ceil(p / k) for p in lengths]
    # LPT's rounded makespan bounds the DP optimum; partial loads only grow, so prune above it.
    ub = max(sum(q[i] for i in lane) for lane in fallback)
    order = sorted(range(n), key=lambda i: -q[i])  # big jobs first keeps the frontier small
    # state: sorted rounded loads -> (unsorted loads of a representative, its lane per processed job)
    states: dict[tuple, tuple[tuple, tuple]] = {tuple([0] * m): (tuple([0] * m), ())}
    visited = 1
    for i in order:
        nxt: dict[tuple, tuple[tuple, tuple]] = {}
        for loads, assign in states.values():
            seen_load = set()
            for lane in range(m):
                if loads[lane] in seen_load:  # lanes with equal load are interchangeable
                    continue
                seen_load.add(loads[lane])
                new = list(loads)
                new[lane] += q[i]
                if new[lane] > ub:
                    continue
                key = tuple(sorted(new))
                if key not in nxt:
                    nxt[key] = (tuple(new), assign + (lane,))
        states = nxt
        visited += len(states)
        if len(states) > max_states:
            return FptasResult(fallback, fallback_span, False, visited)
    best_loads, best_assign = min(states.values(), key=lambda v: max(v[0]))
    lanes: list[list[int]] = [[] for _ in range(m)]
    for i, lane in zip(order, best_assign):
        lanes[lane].append(i)
    span = makespan([[lengths[i] for i in lane] for lane in lanes])
    if span > fallback_span:  # cannot happen beyond rounding ties, but never return worse than LPT
        return FptasResult(fallback, fallback_span, True, visited)
    return FptasResult(lanes, span, True, visited)


# --------------------------------------------------------------------------------------------------- dispatchers
class FifoDispatcher:
    """Jobs in the given order (prompt-major): a freed slot takes the next pending job."""

    def __init__(self, jobs: Sequence[Job]):
        self._queue = list(jobs)[::-1]

    def next_job(self, slot: int) -> Job | None:
        return self._queue.pop() if self._queue else None

    def pending(self) -> int:
        return len(self._queue)


class PlannedDispatcher:
    """Length-aware dispatch: FPTAS lanes over predicted lengths, SJF within a lane, shortest-job stealing."""

    def __init__(self, jobs: Sequence[Job], predicted: Sequence[int], g: int, eps: float = 0.1,
                 max_states: int = 200_000):
        if len(jobs) != len(predicted):
            raise ValueError(f"got {len(predicted)} predicted lengths for {len(jobs)} jobs")
        self.plan = fptas_makespan(list(predicted), g, eps, max_states)
        self._pred = {job: int(p) for job, p in zip(jobs, predicted)}
        # each lane: a min-heap of (predicted length, position) -> shortest predicted job first
        self._lanes = [[(predicted[i], i, jobs[i]) for i in lane] for lane in self.plan.lanes]
        for lane in self._lanes:
            heapq.heapify(lane)

    def next_job(self, slot: int) -> Job | None:
        lane = self._lanes[slot] if slot < len(self._lanes) else []
        if not lane:  # steal from the lane with the most predicted work left
            lane = max(self._lanes, key=lambda ln: (sum(p for p, _, _ in ln), -len(ln)))
            if not lane:
                return None
        return heapq.heappop(lane)[2]

    def pending(self) -> int:
        return sum(len(lane) for lane in self._lanes)


# --------------------------------------------------------------------------------------------------- simulator
@dataclass
class SimResult:
    steps: int
    live_tokens: list[int] = field(default_factory=list)  # KV tokens held by busy slots, per step
    slot_jobs: list[list[Job]] = field(default_factory=list)  # jobs each slot ran, in order

    @property
    def peak_live_tokens(self) -> int:
        return max(self.live_tokens, default=0)


def simulate_slots(lengths: dict, g: int, dispatcher, prompt_len: dict | None = None) -> SimResult:
    """Run ``dispatcher`` over ``g`` slots with known ``lengths[job]`` (refill at once; module semantics)."""
    prompt_len = prompt_len or {}
    slots: list[list | None] = [None] * g  # [job, tokens emitted]
    res = SimResult(0, [], [[] for _ in range(g)])
    while True:
        for s in range(g):
            if slots[s] is None:
                job = dispatcher.next_job(s)
                if job is not None:
                    slots[s] = [job, 0]
                    res.slot_jobs[s].append(job)
        if all(x is None for x in slots):
            return res
        res.steps += 1
        res.live_tokens.append(sum(prompt_len.get(x[0], 0) + x[1] for x in slots if x is not None))
        for s in range(g):
            if slots[s] is not None:
                slots[s][1] += 1
                if slots[s][1] >= lengths[slots[s][0]]:
                    slots[s] = None


def simulate_barrier(rounds_lengths: Sequence[Sequence[int]], prompt_lens: Sequence[int] | None = None) -> SimResult:
    """Barrier rounds (HF generate): every row of a round holds ``P + t - 1`` tokens at the round's step t."""
    res = SimResult(0, [])
    for r, lens in enumerate(rounds_lengths):
        p = prompt_lens[r] if prompt_lens else 0
        for t in range(1, max(lens, default=0) + 1):
            res.steps += 1
            res.live_tokens.append(len(lens) * (p + t - 1))
    return res
