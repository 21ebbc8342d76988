"""benchmarks/_stable.py: the paired bootstrap interval, the verdicts, and the interleaved round order."""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import _stable  # noqa: E402


def test_point_is_the_median_of_per_round_ratios():
    num, den = [1.0, 3.0, 2.0, 10.0, 4.0], [1.0, 2.0, 1.0, 4.0, 2.0]
    point, low, high = _stable.bootstrap_ratio(num, den)
    assert point == pytest.approx(np.median([1.0, 1.5, 2.0, 2.5, 2.0]))
    assert low <= point <= high


def test_interval_matches_the_exact_bootstrap_distribution():
    """For 4 rounds all 4**4 resamples can be enumerated: the Monte-Carlo percentiles must match the exact ones."""
    per_round = np.array([0.9, 1.0, 1.3, 1.1])
    exact = sorted(float(np.median(per_round[list(idx)])) for idx in itertools.product(range(4), repeat=4))
    lo_exact, hi_exact = np.percentile(exact, [2.5, 97.5])
    _, low, high = _stable.bootstrap_ratio(per_round, np.ones(4), resamples=200_000, seed=1)
    assert low == pytest.approx(lo_exact, abs=0.02)
    assert high == pytest.approx(hi_exact, abs=0.02)


def test_verdicts():
    # identical per-round ratios: a zero-width interval, settled
    assert _stable.judge(*_stable.bootstrap_ratio([2.0] * 6, [1.0] * 6), goal=("<=", 2.1))["verdict"] == "met"
    assert _stable.judge(*_stable.bootstrap_ratio([2.0] * 6, [1.0] * 6), goal=("<=", 1.9))["verdict"] == "missed"
    assert _stable.judge(*_stable.bootstrap_ratio([2.0] * 6, [1.0] * 6), goal=(">=", 1.9))["verdict"] == "met"
    # a ratio whose interval is ±20 % is never reported as met, even with the point inside the goal
    wide = _stable.judge(1.0, 0.8, 1.2, goal=("<=", 1.5))
    assert wide["settled"] is False and wide["verdict"] == "unsettled"
    # settled but straddling the goal
    assert _stable.judge(1.0, 0.98, 1.02, goal=("<=", 1.01))["verdict"] == "unsettled"


def test_mismatched_rounds_are_refused():
    with pytest.raises(ValueError):
        _stable.bootstrap_ratio([1.0, 2.0], [1.0])


def test_rounds_rotate_and_stop_once_settled(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(_stable.time, "perf_counter", lambda: clock[0])
    calls = []

    def variant(name, cost):
        def step(r):
            calls.append((r, name))
            clock[0] += cost
        return step

    bench = _stable.Interleaved({"a": variant("a", 2.0), "b": variant("b", 1.0), "c": variant("c", 1.0)},
                                pairs=[("a", "b")], warmup=1, min_rounds=5, max_rounds=50, max_seconds=1e9).run()
    # deterministic costs: the ratio settles at once, so exactly min_rounds timed rounds run after the warm-up
    assert len(bench.times["a"]) == 5 and len(bench.results["a"]) == 6
    firsts = [next(n for r2, n in calls if r2 == r) for r in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert bench.ratio("a", "b", ("<=", 2.0))["verdict"] == "met"


def test_rounds_continue_while_unsettled_until_the_cap(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(_stable.time, "perf_counter", lambda: clock[0])
    costs = itertools.cycle([1.0, 3.0])  # a's cost alternates ±50 %: never within ±5 %

    def a(r):
        clock[0] += next(costs)

    def b(r):
        clock[0] += 1.0

    bench = _stable.Interleaved({"a": a, "b": b}, pairs=[("a", "b")], warmup=0, min_rounds=4, max_rounds=12,
                                max_seconds=1e9).run()
    assert len(bench.times["a"]) == 12
    assert bench.ratio("a", "b")["settled"] is False
