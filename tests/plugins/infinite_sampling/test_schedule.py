"""Scheduling oracles of the infinite_sampling plugin: brute-force optima, FPTAS bound, dispatch simulator."""
from __future__ import annotations

import itertools
import random

import pytest

from plait.plugins.infinite_sampling.schedule import (
    FifoDispatcher, PlannedDispatcher, barrier_steps, fptas_makespan, lpt, makespan, makespan_lower_bound,
    simulate_barrier, simulate_slots, sort_and_chunk)


def brute_force_makespan(lengths, m):
    """Exact P||Cmax by branch and bound (longest first, empty lanes interchangeable)."""
    jobs = sorted(lengths, reverse=True)
    best = [sum(jobs)]

    def go(k, loads):
        if max(loads) >= best[0]:
            return
        if k == len(jobs):
            best[0] = max(loads)
            return
        tried = set()
        for lane in range(m):
            if loads[lane] in tried:
                continue
            tried.add(loads[lane])
            loads[lane] += jobs[k]
            go(k + 1, loads)
            loads[lane] -= jobs[k]

    go(0, [0] * m)
    return best[0] if jobs else 0


def brute_force_barrier(lengths, g):
    """Minimum of sum_r max over all assignments of jobs to ceil(n/g) rounds of at most g jobs."""
    rounds = -(-len(lengths) // g)
    best = None
    for assign in itertools.product(range(rounds), repeat=len(lengths)):
        if any(assign.count(r) > g for r in range(rounds)):
            continue
        cost = sum(max((l for l, a in zip(lengths, assign) if a == r), default=0) for r in range(rounds))
        best = cost if best is None else min(best, cost)
    return best


def test_sort_and_chunk_is_optimal_for_the_barrier_objective():
    rng = random.Random(0)
    for _ in range(40):
        n, g = rng.randint(1, 8), rng.randint(2, 3)
        lengths = [rng.randint(1, 30) for _ in range(n)]
        rounds = sort_and_chunk(lengths, g)
        assert sorted(i for r in rounds for i in r) == list(range(n)) and all(len(r) <= g for r in rounds)
        assert barrier_steps([[lengths[i] for i in r] for r in rounds]) == brute_force_barrier(lengths, g)


@pytest.mark.parametrize("eps", [0.5, 0.1, 0.01])
def test_fptas_is_within_one_plus_eps_of_the_optimum(eps):
    rng = random.Random(1)
    for _ in range(60):
        n, m = rng.randint(1, 12), rng.randint(1, 3)
        lengths = [rng.choice([rng.randint(1, 10), rng.randint(1, 200)]) for _ in range(n)]
        res = fptas_makespan(lengths, m, eps)
        assert res.exact_dp
        assert sorted(i for lane in res.lanes for i in lane) == list(range(n)) and len(res.lanes) == m
        assert res.makespan == makespan([[lengths[i] for i in lane] for lane in res.lanes])
        opt = brute_force_makespan(lengths, m)
        assert opt <= res.makespan <= (1 + eps) * opt + 1e-9


def test_fptas_falls_back_to_lpt_when_the_state_space_is_too_large():
    lengths = [random.Random(2).randint(1, 500) for _ in range(30)]
    res = fptas_makespan(lengths, 4, eps=0.01, max_states=10)
    assert not res.exact_dp
    assert res.lanes == lpt(lengths, 4)


def test_lpt_bound():
    rng = random.Random(3)
    for _ in range(40):
        n, m = rng.randint(1, 10), rng.randint(2, 3)
        lengths = [rng.randint(1, 50) for _ in range(n)]
        span = makespan([[lengths[i] for i in lane] for lane in lpt(lengths, m)])
        assert span <= (4 / 3 - 1 / (3 * m)) * brute_force_makespan(lengths, m) + 1e-9


def test_fptas_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fptas_eps"):
        fptas_makespan([1, 2], 2, eps=0)
    with pytest.raises(ValueError, match="lane"):
        fptas_makespan([1, 2], 0)


def test_fifo_simulation_by_hand():
    # g = 2, lengths 3,1,1,1: slot 0 runs job 0 (steps 1-3), slot 1 runs jobs 1, 2, 3 (one step each)
    lengths = {0: 3, 1: 1, 2: 1, 3: 1}
    res = simulate_slots(lengths, 2, FifoDispatcher([0, 1, 2, 3]), prompt_len={k: 5 for k in lengths})
    assert res.steps == 3 and res.slot_jobs == [[0], [1, 2, 3]]
    # live tokens per step: (5 + j - 1) per busy job
    assert res.live_tokens == [5 + 5, 6 + 5, 7 + 5]
    # a tail: lengths 2, 5, 1 on 2 slots -> slot 0: 2 then 1 (3 steps), slot 1: 5 -> 5 steps
    assert simulate_slots({0: 2, 1: 5, 2: 1}, 2, FifoDispatcher([0, 1, 2])).steps == 5


def test_barrier_simulation_by_hand():
    res = simulate_barrier([[2, 4], [3]], prompt_lens=[10, 10])
    assert res.steps == 4 + 3
    assert res.live_tokens == [20, 22, 24, 26, 10, 11, 12]


def test_planned_dispatch_realises_the_plan_with_exact_predictions():
    rng = random.Random(4)
    for _ in range(30):
        n, g = rng.randint(2, 12), rng.randint(1, 3)
        lengths = [rng.randint(1, 40) for _ in range(n)]
        d = PlannedDispatcher(list(range(n)), lengths, g, eps=0.05)
        res = simulate_slots(dict(enumerate(lengths)), g, d)
        assert res.steps == d.plan.makespan  # lanes run back to back; stealing never lengthens them
        assert makespan_lower_bound(lengths, g) <= res.steps <= 1.05 * brute_force_makespan(lengths, g) + 1e-9


def test_planned_dispatch_with_noisy_predictions_still_runs_every_job_once():
    rng = random.Random(5)
    lengths = [rng.randint(1, 60) for _ in range(24)]
    noisy = [max(1, int(l * rng.uniform(0.5, 1.5))) for l in lengths]
    d = PlannedDispatcher(list(range(24)), noisy, 4)
    res = simulate_slots(dict(enumerate(lengths)), 4, d)
    assert sorted(j for lane in res.slot_jobs for j in lane) == list(range(24))
    assert res.steps >= makespan_lower_bound(lengths, 4)
