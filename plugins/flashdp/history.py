"""What a privacy accountant records and the checks of its inputs, shared by :mod:`.rdp` and :mod:`.prv`.

:class:`StepHistory` keeps the steps a run has taken as ``[noise_multiplier, sample_rate, steps]`` entries and
(de)serialises them; the ``check_*`` functions turn a bad δ, q, σ or step count into a ValueError that names
it. Standard library only, and no import from the rest of the plugin: every accounting module builds on it.
"""
from __future__ import annotations

import math

__all__ = ["StepHistory", "check_delta", "check_sample_rate"]


def check_sample_rate(sample_rate: float) -> float:
    """Return ``sample_rate`` as a float; raise ValueError unless it lies in (0, 1]."""
    q = float(sample_rate)
    if not (0.0 < q <= 1.0) or math.isnan(q):
        raise ValueError(f"sample rate q={sample_rate!r} must be in (0, 1] (q = batch size / dataset size)")
    return q


def check_delta(delta: float, n: int | None = None) -> float:
    """Return ``delta`` as a float; raise ValueError unless ``0 < δ < 1`` and, given the dataset size ``n``,
    ``δ < 1/N`` (a δ of 1/N or more allows leaking one whole example outright)."""
    d = float(delta)
    if not (0.0 < d < 1.0) or math.isnan(d):
        raise ValueError(f"privacy.delta={delta!r} must be in (0, 1)")
    if n is not None:
        n = int(n)
        if n <= 0:
            raise ValueError(f"dataset size N={n} must be positive")
        if d >= 1.0 / n:
            raise ValueError(f"privacy.delta={delta!r} must be < 1/N = {1.0 / n:.6g} (N={n} training examples)")
    return d


def _check_sigma(noise_multiplier: float) -> float:
    s = float(noise_multiplier)
    if not (s >= 0.0) or math.isinf(s):
        raise ValueError(f"noise multiplier sigma={noise_multiplier!r} must be a finite number >= 0")
    return s


def _check_steps(steps: int) -> int:
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative integer")
    return int(steps)



class StepHistory:
    """The steps an accountant has seen: ``history`` is a list of ``[noise_multiplier, sample_rate, steps]``;
    consecutive steps with the same ``(σ, q)`` are merged into one entry. Shared by the RDP and PRV accountants."""

    mechanism = ""

    def __init__(self) -> None:
        self.history: list[list] = []

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        sigma = _check_sigma(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = _check_steps(num_steps)
        if n == 0:
            return
        if self.history and self.history[-1][0] == sigma and self.history[-1][1] == q:
            self.history[-1][2] += n
        else:
            self.history.append([sigma, q, n])

    def _history_state(self) -> dict:
        return {"mechanism": self.mechanism, "history": [[float(s), float(q), int(n)] for s, q, n in self.history]}

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or "history" not in state:
            raise ValueError("accountant state must be a dict with a 'history' list of [sigma, q, steps]")
        if state.get("mechanism", "rdp") != self.mechanism:
            raise ValueError(f"accountant state is for mechanism {state.get('mechanism')!r}, not {self.mechanism!r}")
        history: list[list] = []
        for entry in state["history"]:
            if len(entry) != 3:
                raise ValueError(f"accountant history entry {entry!r} must be [sigma, q, steps]")
            history.append([_check_sigma(entry[0]), check_sample_rate(entry[1]), _check_steps(entry[2])])
        self.history = history

    def __len__(self) -> int:
        return sum(int(n) for _, _, n in self.history)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={len(self)}, history={self.history})"

