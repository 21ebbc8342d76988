"""Stable side-by-side timing for the CPU benchmarks: interleaved rounds, bootstrap intervals, machine load.

A ratio measured on a shared 2-core machine moves by ±30 % from one round to the next, so a single median says
little. `Interleaved` runs every variant once per round (the starting variant rotating, so drift and cache state
spread over all of them), keeps adding rounds until every requested ratio's 95 % interval is within ±5 % (or a
round/time budget runs out), and `ratio` reports the median of the per-round ratios with a bootstrap interval over
rounds (a round's variants ran back to back under the same load, so pairing them cancels most of the drift).
A ratio whose interval is wider than ±``tolerance`` is marked ``"settled": false`` and its goal is reported as
``"unsettled"``, never as met.

Used by ``zo_speed.py`` and ``dp_speed.py``; see benchmarks/README.md.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np

TOLERANCE = 0.05  # a ratio is "settled" when its 95 % interval lies within ±5 % of it


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def bootstrap_ratio(num: Sequence[float], den: Sequence[float], *, resamples: int = 2000, seed: int = 0,
                    level: float = 0.95) -> tuple[float, float, float]:
    """(ratio, low, high): the median over rounds of the per-round ratio num[i]/den[i] (index i of both ran in
    the same round, back to back, so a load change between rounds cancels), and the percentile interval of that
    median over ``resamples`` bootstrap resamples of the rounds."""
    a, b = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired samples need equal non-zero lengths, got {a.size} and {b.size}")
    per_round = a / b
    point = float(np.median(per_round))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(resamples, a.size))
    ratios = np.median(per_round[idx], axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return point, float(low), float(high)


def judge(point: float, low: float, high: float, goal: tuple[str, float] | None = None,
          tolerance: float = TOLERANCE) -> dict:
    """The JSON record of one ratio: value, interval, whether it is settled, and the goal's verdict.

    A goal is ``met`` only when the whole interval satisfies it, ``missed`` when the whole interval fails it,
    and ``unsettled`` otherwise (or whenever the interval is wider than ±tolerance)."""
    settled = (high - low) / 2 <= tolerance * point
    out = {"ratio": round(point, 4), "ci95": [round(low, 4), round(high, 4)], "settled": bool(settled)}
    if goal is not None:
        op, bound = goal
        inside = (high <= bound) if op == "<=" else (low >= bound)
        outside = (low > bound) if op == "<=" else (high < bound)
        out["goal"] = f"{op} {bound}"
        out["verdict"] = "met" if inside and settled else "missed" if outside and settled else "unsettled"
    return out


class Interleaved:
    """Time ``variants`` (name -> zero-argument callable doing one step; it may take the round number) round by
    round until the requested ratios are settled.

    ``pairs``: (numerator, denominator) names whose ratio must settle. ``min_rounds`` are always timed after
    ``warmup`` untimed rounds; then rounds continue until every pair is settled, ``max_rounds`` are timed or
    ``max_seconds`` have passed."""

    def __init__(self, variants: dict[str, Callable[[int], object]], *, pairs: Sequence[tuple[str, str]],
                 warmup: int = 2, min_rounds: int = 8, max_rounds: int = 40, max_seconds: float = 300.0,
                 tolerance: float = TOLERANCE, log: Callable[[str], None] | None = None):
        self.variants, self.pairs = dict(variants), list(pairs)
        self.warmup, self.min_rounds, self.max_rounds = warmup, min_rounds, max_rounds
        self.max_seconds, self.tolerance, self.log = max_seconds, tolerance, log
        self.times: dict[str, list[float]] = {v: [] for v in self.variants}  # timed rounds only
        self.results: dict[str, list[object]] = {v: [] for v in self.variants}  # every round's return value
        self.load_start = self.load_end = None
        self.wall_s = 0.0

    def _round(self, r: int, timed: bool) -> None:
        names = list(self.variants)
        k = r % len(names)
        for v in names[k:] + names[:k]:
            t0 = time.perf_counter()
            out = self.variants[v](r)
            dt = time.perf_counter() - t0
            self.results[v].append(out)
            if timed:
                self.times[v].append(dt)
        if self.log:
            tag = "timed" if timed else "warm-up"
            self.log(f"round {r} ({tag}): " + ", ".join(
                f"{v} {self.times[v][-1]:.3f}s" if timed else v for v in names))

    def settled(self) -> bool:
        return all(judge(*bootstrap_ratio(self.times[a], self.times[b]), tolerance=self.tolerance)["settled"]
                   for a, b in self.pairs)

    def run(self) -> Interleaved:
        self.load_start = load_average()
        t0 = time.perf_counter()
        r = 0
        for _ in range(self.warmup):
            self._round(r, timed=False)
            r += 1
        while True:
            self._round(r, timed=True)
            r += 1
            n = len(next(iter(self.times.values())))
            if n >= self.max_rounds or time.perf_counter() - t0 > self.max_seconds:
                break
            if n >= self.min_rounds and self.settled():
                break
        self.wall_s = time.perf_counter() - t0
        self.load_end = load_average()
        return self

    def ratio(self, num: str, den: str, goal: tuple[str, float] | None = None) -> dict:
        return judge(*bootstrap_ratio(self.times[num], self.times[den]), goal=goal, tolerance=self.tolerance)

    def summary(self, name: str, per_round_units: float | None = None) -> dict:
        ts = self.times[name]
        med = statistics.median(ts)
        out = {"median_s": round(med, 5), "min_s": round(min(ts), 5), "rounds": len(ts),
               "step_s": [round(t, 4) for t in ts]}
        if per_round_units:
            out["units_per_s"] = round(per_round_units / med, 1)
        return out

    def machine(self) -> dict:
        import torch

        return {"load_average_start": self.load_start, "load_average_end": self.load_end,
                "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "wall_s": round(self.wall_s, 1)}
