"""Scheduling oracles of the infinite_sampling plugin: brute-force optima, FPTAS bound, dispatch simulator."""
from __future__ import annotations

import itertools
import random

import pytest

from plait.plugins.infinite_sampling.schedule import (
    FifoDispatcher,
    PlannedDispatcher,
    barrier_steps,
    fptas_makespan,
    lpt,
    makespan,
    makespan_lower_bound,
    simulate_barrier,
    simulate_slots,
    sort_and_chunk,
)


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
        opt = brute_force_makespan(lengths, m)
        for shortcut in (True, False):  # False: the rounded DP always runs
            res = fptas_makespan(lengths, m, eps, lpt_shortcut=shortcut)
            assert res.guaranteed and (res.exact_dp or shortcut)
            assert sorted(i for lane in res.lanes for i in lane) == list(range(n)) and len(res.lanes) == m
            assert res.makespan == makespan([[lengths[i] for i in lane] for lane in res.lanes])
            assert opt <= res.makespan <= (1 + eps) * opt + 1e-9


def test_fptas_beats_lpt_where_lpt_is_off_by_more_than_eps():
    lengths = [3, 3, 2, 2, 2]  # LPT: {3, 2, 2} {3, 2} = 7; optimum {3, 3} {2, 2, 2} = 6
    assert makespan([[lengths[i] for i in lane] for lane in lpt(lengths, 2)]) == 7
    res = fptas_makespan(lengths, 2, eps=0.1)
    assert res.exact_dp and res.guaranteed and res.makespan == 6


def test_fptas_skips_the_dp_when_lpt_already_meets_the_bound():
    lengths = [random.Random(6).randint(1, 256) for _ in range(128)]
    res = fptas_makespan(lengths, 8, eps=0.1)  # m = 8: the DP would build millions of states
    span = makespan([[lengths[i] for i in lane] for lane in lpt(lengths, 8)])
    assert span <= 1.1 * makespan_lower_bound(lengths, 8)
    assert res.lanes == lpt(lengths, 8) and res.guaranteed and not res.exact_dp and res.states == 0


def test_fptas_falls_back_to_lpt_when_the_state_space_is_too_large():
    lengths = [3, 3, 2, 2, 2] * 6  # LPT is 2 over LB = 18 (> 1 %), so the DP starts
    assert makespan([[lengths[i] for i in lane] for lane in lpt(lengths, 4)]) > 1.01 * makespan_lower_bound(
        lengths, 4)
    res = fptas_makespan(lengths, 4, eps=0.01, max_states=10)
    assert not res.exact_dp and not res.guaranteed and res.states == 11
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
    for order in ("longest_first", "shortest_first"):
        d = PlannedDispatcher(list(range(24)), noisy, 4, lane_order=order)
        res = simulate_slots(dict(enumerate(lengths)), 4, d)
        assert sorted(j for lane in res.slot_jobs for j in lane) == list(range(24))
        assert res.steps >= makespan_lower_bound(lengths, 4)


def test_lane_order_and_sjf_stealing_by_hand():
    # predictions: lanes {10, 1, 1} and {6, 6} (makespan 12); within a lane the longest predicted job goes first
    jobs, pred = ["a", "b", "c", "d", "e"], [10, 6, 6, 1, 1]
    d = PlannedDispatcher(jobs, pred, 2)
    lanes = [[jobs[i] for i in lane] for lane in d.plan.lanes]
    assert sorted(map(sorted, lanes)) == [["a", "d", "e"], ["b", "c"]]
    la, lb = (0, 1) if "a" in lanes[0] else (1, 0)
    assert d.next_job(la) == "a" and d.next_job(lb) in ("b", "c")
    d.next_job(lb)  # lane b is now empty
    assert d.next_job(lb) == "d"  # steals the shortest job of the lane with the most work left
    sjf = PlannedDispatcher(jobs, pred, 2, lane_order="shortest_first")
    assert sjf.next_job(la) == "d"
    # "a" really takes 20: SJF lanes start it last (at step 2), longest-first at step 0
    true = {"a": 20, "b": 6, "c": 6, "d": 1, "e": 1}
    assert simulate_slots(true, 2, PlannedDispatcher(jobs, pred, 2)).steps == 20
    assert simulate_slots(true, 2, PlannedDispatcher(jobs, pred, 2, lane_order="shortest_first")).steps == 22
    with pytest.raises(ValueError, match="lane_order"):
        PlannedDispatcher(jobs, pred, 2, lane_order="random")
