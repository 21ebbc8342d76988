"""The interfaces that registered objects satisfy. Recipes call these objects directly on the hot path.

They are `typing.Protocol`s: a plugin's class needs no base class, only these methods.
"""
from __future__ import annotations

from typing import Any, Iterable, Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelBundle(Protocol):
    """What a language-model family builds: the module and its tokenizer."""

    model: torch.nn.Module
    tokenizer: Any


@runtime_checkable
class Dataset(Protocol):
    """A text data source: ``examples("train" | "eval")`` → list of dicts (``prompt``, ``completion``, …)."""

    def examples(self, split: str) -> list[dict]: ...


@runtime_checkable
class OffloadPolicy(Protocol):
    """Where parameters live and how they reach the compute device."""

    def prepare(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module: ...

    def flush(self) -> None:
        """Apply pending (lazy) updates so that the model's parameters are current."""


@runtime_checkable
class Perturbation(Protocol):
    """A zeroth-order perturbation strategy over a set of parameters."""

    def perturb(self, params: Iterable[torch.nn.Parameter], seed: int, scale: float) -> None: ...

    def update(self, params: Iterable[torch.nn.Parameter], seed: int, projected_grad: float, lr: float) -> None: ...


@runtime_checkable
class GradTransform(Protocol):
    """Transforms gradients between backward and the optimizer step (clipping, noise, ascent)."""

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]: ...


@runtime_checkable
class SamplerScheduler(Protocol):
    """Decides which rollouts decode together under a memory budget."""

    def schedule(self, prompts: list, group_size: int) -> Iterable[list]: ...


@runtime_checkable
class InfluenceEstimator(Protocol):
    """Scores training examples by their influence on a test loss."""

    def scores(self, model: torch.nn.Module, train: Any, test: Any) -> torch.Tensor: ...


@runtime_checkable
class ParallelStrategy(Protocol):
    """How work is split across processes (rank, world size, the collectives a recipe needs)."""

    rank: int
    world_size: int

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor: ...


__all__ = ["ModelBundle", "Dataset", "OffloadPolicy", "Perturbation", "GradTransform", "SamplerScheduler",
           "InfluenceEstimator", "ParallelStrategy"]
