"""Length predictors for the ``length_aware`` sampler: prompt (+ the first k generated tokens) -> remaining length.

Three predictors share one interface:

* ``predict(prompt_ids, prefix_ids=()) -> float`` — predicted remaining length (tokens still to come after
  ``prefix_ids``, EOS included); ``predict_batch(prompts, prefixes)`` for many;
* ``update(prompts, prefixes, lengths)`` — learn online from observed remaining lengths (one call per step);
* ``state_dict()`` / ``load_state_dict()`` — for checkpoints;
* ``__call__(prompt_idx, sample_idx, prompt_ids)`` — the callable form ``LengthAwareScheduler`` accepts
  (``predict(prompt_ids)``, no prefix).

`ConstantPredictor` (a fixed value) and `RunningMeanPredictor` (mean of every length observed so far) are the
baselines; `LengthPredictor` is a tiny trainable model: token ids hashed into ``buckets`` embeddings, features
``[mean(prompt), last(prompt), mean(prefix[:k]), log1p(len prompt), len prefix]`` -> 2-layer MLP -> ``log1p``
of the remaining length, trained with Adam on a squared error in log space (``steps_per_update`` steps per
``update``). Its output bias starts at the log-mean of the first batch it sees, so it begins as the running mean.

Metrics (numpy): `smape` (symmetric mean absolute percentage error as a fraction in [0, 2]; a pair with both
values 0 counts 0) and `kendall_tau` (tau-b, tie-corrected as ``scipy.stats.kendalltau``; NaN when either side is
constant).

In the ``grpo`` recipe (``predictor: constant | running_mean | mlp``) predictions are made before generation (empty
prefix), or, with the ``length_aware`` sampler's ``prefix_tokens: k`` > 0, after a k-token probe of every job
(partial decode: the prediction is the remaining length, conditioned on the prompt and those k tokens).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


# --------------------------------------------------------------------------------------------------- metrics
def smape(pred, true) -> float:
    """Mean of ``2 |p - t| / (|p| + |t|)`` (0 where both are 0); in [0, 2]."""
    p = np.asarray(pred, dtype=np.float64).ravel()
    t = np.asarray(true, dtype=np.float64).ravel()
    if p.shape != t.shape:
        raise ValueError(f"smape: {p.size} predictions for {t.size} true values")
    if p.size == 0:
        return float("nan")
    den = np.abs(p) + np.abs(t)
    num = 2.0 * np.abs(p - t)
    ratio = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return float(ratio.mean())


def kendall_tau(pred, true) -> float:
    """Kendall tau-b: ``(C - D) / sqrt((n0 - n1)(n0 - n2))`` over all pairs, with ``n1`` / ``n2`` the pairs tied in
    ``pred`` / ``true`` (a pair tied in both counts in both). NaN when fewer than 2 values or a side is constant."""
    x = np.asarray(pred, dtype=np.float64).ravel()
    y = np.asarray(true, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"kendall_tau: {x.size} predictions for {y.size} true values")
    n = x.size
    if n < 2:
        return float("nan")
    iu = np.triu_indices(n, k=1)
    dx = np.sign(x[:, None] - x[None, :])[iu]
    dy = np.sign(y[:, None] - y[None, :])[iu]
    s = float(np.sum(dx * dy))  # concordant - discordant
    n0 = n * (n - 1) / 2
    n1 = float(np.sum(dx == 0))
    n2 = float(np.sum(dy == 0))
    den = math.sqrt((n0 - n1) * (n0 - n2))
    if den == 0:
        return float("nan")
    return s / den


# --------------------------------------------------------------------------------------------------- baselines
class _Predictor:
    name = "?"

    def predict(self, prompt_ids: Sequence[int], prefix_ids: Sequence[int] = ()) -> float:
        raise NotImplementedError

    def predict_batch(self, prompts, prefixes=None) -> list[float]:
        prefixes = prefixes if prefixes is not None else [()] * len(prompts)
        return [self.predict(p, q) for p, q in zip(prompts, prefixes)]

    def update(self, prompts, prefixes, lengths) -> None:
        pass

    def __call__(self, prompt_idx: int, sample_idx: int, prompt_ids: Sequence[int]) -> float:
        return self.predict(prompt_ids, ())

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ConstantPredictor(_Predictor):
    """Always ``value``."""

    name = "constant"

    def __init__(self, value: float):
        self.value = float(value)

    def predict(self, prompt_ids, prefix_ids=()) -> float:
        return self.value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = float(state["value"])


class RunningMeanPredictor(_Predictor):
    """The mean of every length passed to ``update`` so far (``initial`` before the first)."""

    name = "running_mean"

    def __init__(self, initial: float = 1.0):
        self.initial = float(initial)
        self.total = 0.0
        self.count = 0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else self.initial

    def predict(self, prompt_ids, prefix_ids=()) -> float:
        return self.mean

    def update(self, prompts, prefixes, lengths) -> None:
        v = np.asarray(lengths, dtype=np.float64).ravel()
        self.total += float(v.sum())
        self.count += int(v.size)

    def state_dict(self):
        return {"initial": self.initial, "total": self.total, "count": self.count}

    def load_state_dict(self, state):
        self.initial, self.total, self.count = float(state["initial"]), float(state["total"]), int(state["count"])


# --------------------------------------------------------------------------------------------------- model
class _Net(torch.nn.Module):
    def __init__(self, buckets: int, dim: int, hidden: int):
        super().__init__()
        self.buckets = buckets
        self.emb = torch.nn.Embedding(buckets, dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(3 * dim + 2, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, prompts: list[list[int]], prefixes: list[list[int]]) -> torch.Tensor:
        def bag(rows):  # mean embedding per row (an empty row gives zeros)
            flat = torch.tensor([t % self.buckets for r in rows for t in r], dtype=torch.long)
            offsets = torch.tensor([0] + [len(r) for r in rows[:-1]], dtype=torch.long).cumsum(0)
            return torch.nn.functional.embedding_bag(flat, self.emb.weight, offsets, mode="mean")

        last = self.emb(torch.tensor([p[-1] % self.buckets for p in prompts], dtype=torch.long))
        extra = torch.tensor([[math.log1p(len(p)), float(len(q))] for p, q in zip(prompts, prefixes)])
        feats = torch.cat([bag(prompts), last, bag(prefixes), extra], dim=1)
        return self.mlp(feats).squeeze(-1)  # log1p(remaining length)


class LengthPredictor(_Predictor):
    """Hashed token embeddings of prompt + first ``prefix_tokens`` generated tokens -> MLP -> log1p(length);
    trained online with Adam (``steps_per_update`` full-batch steps per ``update``). Deterministic given ``seed``."""

    name = "mlp"

    def __init__(self, buckets: int = 4096, dim: int = 16, hidden: int = 64, lr: float = 1.0e-2,
                 prefix_tokens: int = 0, steps_per_update: int = 4, seed: int = 0):
        if buckets < 1 or dim < 1 or hidden < 1 or steps_per_update < 1 or prefix_tokens < 0 or not lr > 0:
            raise ValueError("LengthPredictor: buckets, dim, hidden, steps_per_update >= 1, prefix_tokens >= 0 "
                             "and lr > 0 are required")
        self.prefix_tokens, self.steps_per_update = prefix_tokens, steps_per_update
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = _Net(buckets, dim, hidden)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.initialized = False

    def _prep(self, prompts, prefixes):
        prompts = [list(map(int, p)) for p in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("LengthPredictor: every prompt needs at least one token")
        prefixes = prefixes if prefixes is not None else [()] * len(prompts)
        prefixes = [list(map(int, q))[:self.prefix_tokens] for q in prefixes]
        return prompts, prefixes

    @torch.no_grad()
    def predict_batch(self, prompts, prefixes=None) -> list[float]:
        if not prompts:
            return []
        prompts, prefixes = self._prep(prompts, prefixes)
        out = torch.expm1(self.net(prompts, prefixes)).clamp_min(0.0)
        return [float(v) for v in out]

    def predict(self, prompt_ids, prefix_ids=()) -> float:
        return self.predict_batch([prompt_ids], [prefix_ids])[0]

    def update(self, prompts, prefixes, lengths) -> float:
        """Adam steps on the batch; returns the last loss (mean squared error of log1p lengths)."""
        if not prompts:
            return float("nan")
        prompts, prefixes = self._prep(prompts, prefixes)
        target = torch.log1p(torch.tensor([float(v) for v in lengths]).clamp_min(0.0))
        if target.numel() != len(prompts):
            raise ValueError(f"LengthPredictor.update: {target.numel()} lengths for {len(prompts)} prompts")
        if not self.initialized:
            with torch.no_grad():
                self.net.mlp[-1].bias.fill_(float(target.mean()))
            self.initialized = True
        loss = torch.tensor(float("nan"))
        for _ in range(self.steps_per_update):
            loss = torch.nn.functional.mse_loss(self.net(prompts, prefixes), target)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def state_dict(self):
        # deep copies: a loaded optimizer keeps the given moment tensors, which Adam then updates in place
        return copy.deepcopy({"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "initialized": self.initialized})

    def load_state_dict(self, state):
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.initialized = bool(state["initialized"])


PREDICTORS = ("none", "constant", "running_mean", "mlp")


def build_predictor(kind: str, *, constant: float = 1.0, lr: float = 1.0e-2, seed: int = 0, prefix_tokens: int = 0):
    """``none`` -> None; ``constant`` -> `ConstantPredictor` (``constant``); ``running_mean`` (starts at
    ``constant``); ``mlp`` -> `LengthPredictor` reading the first ``prefix_tokens`` generated tokens."""
    if kind == "none":
        return None
    if kind == "constant":
        return ConstantPredictor(constant)
    if kind == "running_mean":
        return RunningMeanPredictor(constant)
    if kind == "mlp":
        return LengthPredictor(lr=lr, seed=seed, prefix_tokens=prefix_tokens)
    raise ValueError(f"unknown predictor {kind!r}; allowed: {', '.join(PREDICTORS)}")
