"""The interfaces that registered objects satisfy. Recipes call these objects directly on the hot path.

They are `typing.Protocol`s: a plugin's class needs no base class, only these methods.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

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
    """A zeroth-order step engine built by an offload policy: where parameters live and how they move.

    ``factory(model=..., device=..., mezo=..., run_dir=..., **options)`` returns it.
    """

    def step(self, batch: dict[str, torch.Tensor], seed: int, lr: float) -> tuple[list[float], list[float]]:
        """One ZO step: (loss of each forward chunk, projected gradient of each sample)."""

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def flush(self) -> None:
        """Apply pending (lazy) updates so that the model's parameters are current."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class Perturbation(Protocol):
    """A zeroth-order perturbation strategy (z per parameter from a seed, shifts, estimate, update)."""

    eps: float
    n_chunks: int

    def z(self, p: torch.Tensor, index: int, seed: int, sample: int) -> torch.Tensor: ...

    def estimate(self, losses: list[float]) -> list[float]: ...

    def lr_at(self, step: int, total: int) -> float: ...


@runtime_checkable
class GradTransform(Protocol):
    """Transforms gradients between backward and the optimizer step (clipping, noise, ascent).

    Optional members the shared step (`plait.step.FirstOrderStep`) uses when present: ``prepare(model, *,
    dataset_size, batch_size, steps, seed, grad_accum) -> model`` (before the optimizer is built),
    ``batch_indices(step) -> list[int] | None`` (the step's batch, e.g. Poisson sampling),
    ``before_forward(model, step)`` / ``after_transforms(model, step)`` (around the step, e.g. DP-SAT's ascent),
    ``set_loss_closure(fn)``, ``before_backward(step)``, ``loss_reduction`` ("mean" | "sum"),
    ``replaces_clipping`` (bool), ``state_dict()`` / ``load_state_dict()`` (checkpointed), ``summary()``,
    ``log_metrics(step) -> dict[str, float]`` (only at logged steps, not averaged: cumulative or costly values).
    """

    def __call__(self, model: torch.nn.Module, step: int) -> dict[str, float]: ...


@runtime_checkable
class SamplerScheduler(Protocol):
    """Decides which rollouts decode together under a memory budget, and generates them."""

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], group_size: int, max_new_tokens: int,
                 step: int, sampling: dict, eos_id: int, pad_id: int, **kwargs: Any) -> Any:
        """G completions per prompt (a ``Rollouts``), identical whatever the schedule."""


@runtime_checkable
class InfluenceEstimator(Protocol):
    """Scores training examples by their influence on a test loss."""

    def scores(self, model: torch.nn.Module, train: Any, test: Any) -> torch.Tensor: ...


@runtime_checkable
class ParallelStrategy(Protocol):
    """How work is split across processes (rank, world size, the collectives a recipe needs).

    Optional members the core uses when present: ``check_config(text)`` (refuse ranks whose resolved configs
    differ), ``broadcast_object(obj)`` (rank 0 hands the run directory to the others), ``close()`` (end the
    process group) and ``splits_eval`` (True: evaluation is split across ranks through its ``eval_share`` /
    ``eval_sum`` / ``eval_gather``, see `plait.run.eval_share`). Optional members the ``zo`` recipe uses:
    ``wrap_perturbation``, ``wrap_engine``, ``local_batch`` and ``metrics`` (plugins/distzo2). Only rank 0 writes
    the run directory. `plait.distributed.ProcessGroup` is the base of the multi-process strategies.
    """

    rank: int
    world_size: int

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor: ...


__all__ = ["ModelBundle", "Dataset", "OffloadPolicy", "Perturbation", "GradTransform", "SamplerScheduler",
           "InfluenceEstimator", "ParallelStrategy"]
