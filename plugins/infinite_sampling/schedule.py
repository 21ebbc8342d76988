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
  true makespan is ≤ OPT + n K ≤ (1 + eps) OPT. The DP is skipped when LPT already meets ``(1 + eps) LB`` (then
  LPT carries the same guarantee; the common case at g = 8 on long-tailed lengths), and it falls back
  to LPT as soon as it has built ``max_states`` states (its state space is exponential in m: at g = 8 the
  DP would build millions of states and take tens of seconds in Python before giving up).

Dispatchers decide, at run time, which pending job a freed slot takes: `FifoDispatcher` (continuous sampling: the
next sample of the same prompt, then the next prompt's group) and `PlannedDispatcher` (length-aware: the slot's
FPTAS lane; an empty lane refills shortest-job-first (SJF) by stealing the shortest pending job of the lane with
the most predicted work left, which never increases the planned makespan).

Within a lane the default order is the longest predicted job first (``lane_order="longest_first"``). The order
inside a lane does not change the planned makespan, but it decides how prediction errors land: with SJF inside
lanes (``"shortest_first"``) every lane ends on its longest job, so an under-predicted long job starts last and
sticks out past the other lanes, with nothing left to steal. Longest-first leaves the short jobs for the end,
where stealing balances the lanes (LPT's rule). On a long-tailed length distribution (lognormal, G = 32, g = 8,
1 prompt) with multiplicative lognormal prediction noise sigma = 1, simulated decode steps are 0.60 x naive micro
groups with SJF lanes and 0.50 x with longest-first lanes (0.44 for both with exact predictions); see
``benchmarks/infinite_sampling/sampling.py``.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

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
    exact_dp: bool  # True: the rounded DP ran to the end (False: LPT, because it sufficed or the DP was too big)
    states: int = 0  # DP states built (for reports)
    guaranteed: bool = True  # makespan <= (1 + eps) x optimum is proven (DP, or LPT within (1 + eps) x LB)


def fptas_makespan(lengths: Sequence[int], m: int, eps: float = 0.1, max_states: int = 20_000,
                   lpt_shortcut: bool = True) -> FptasResult:
    """(1 + eps)-approximate P||Cmax over ``m`` lanes (see the module docstring); LPT when it suffices
    (``lpt_shortcut``) or as the fallback."""
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
    if lpt_shortcut and fallback_span <= (1 + eps) * lb:  # OPT >= LB, so LPT is already within (1 + eps) OPT
        return FptasResult(fallback, fallback_span, False)
    k = max(eps * lb / n, 1e-12)
    q = [math.ceil(p / k) for p in lengths]
    # LPT's rounded makespan bounds the DP optimum; partial loads only grow, so prune above it.
    ub = max(sum(q[i] for i in lane) for lane in fallback)
    order = sorted(range(n), key=lambda i: -q[i])  # big jobs first keeps the frontier small
    # state: sorted rounded loads -> (unsorted loads of a representative, its lane per processed job)
    states: dict[tuple, tuple[tuple, tuple]] = {tuple([0] * m): (tuple([0] * m), ())}
    built = 1
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
                    built += 1
                    if built > max_states:
                        return FptasResult(fallback, fallback_span, False, built, guaranteed=False)
        states = nxt
    best_loads, best_assign = min(states.values(), key=lambda v: max(v[0]))
    lanes: list[list[int]] = [[] for _ in range(m)]
    for i, lane in zip(order, best_assign):
        lanes[lane].append(i)
    span = makespan([[lengths[i] for i in lane] for lane in lanes])
    if span > fallback_span:  # cannot happen beyond rounding ties, but never return worse than LPT
        return FptasResult(fallback, fallback_span, True, built)
    return FptasResult(lanes, span, True, built)


# --------------------------------------------------------------------------------------------------- dispatchers
class FifoDispatcher:
    """Jobs in the given order (prompt-major): a freed slot takes the next pending job."""

    def __init__(self, jobs: Sequence[Job]):
        self._queue = list(jobs)[::-1]

    def next_job(self, slot: int) -> Job | None:
        return self._queue.pop() if self._queue else None

    def pending(self) -> int:
        return len(self._queue)


LANE_ORDERS = ("longest_first", "shortest_first")


class PlannedDispatcher:
    """Length-aware dispatch: FPTAS lanes over predicted lengths, ``lane_order`` within a lane, and SJF stealing
    (an empty lane takes the shortest pending job of the lane with the most predicted work left)."""

    def __init__(self, jobs: Sequence[Job], predicted: Sequence[int], g: int, eps: float = 0.1,
                 max_states: int = 20_000, lane_order: str = "longest_first"):
        if len(jobs) != len(predicted):
            raise ValueError(f"got {len(predicted)} predicted lengths for {len(jobs)} jobs")
        if lane_order not in LANE_ORDERS:
            raise ValueError(f"lane_order {lane_order!r} is not allowed; allowed: {', '.join(LANE_ORDERS)}")
        self.plan = fptas_makespan(list(predicted), g, eps, max_states)
        sign = -1 if lane_order == "longest_first" else 1
        # each lane: (predicted, position, job) in its own dispatch order; a steal searches for the shortest
        self._lanes = [sorted(((predicted[i], i, jobs[i]) for i in lane), key=lambda x: (sign * x[0], x[1]))
                       for lane in self.plan.lanes]

    def next_job(self, slot: int) -> Job | None:
        lane = self._lanes[slot] if slot < len(self._lanes) else []
        if lane:
            return lane.pop(0)[2]
        victim = max(self._lanes, key=lambda ln: (sum(p for p, _, _ in ln), -len(ln)))
        if not victim:
            return None
        shortest = min(range(len(victim)), key=lambda k: (victim[k][0], victim[k][1]))
        return victim.pop(shortest)[2]

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
