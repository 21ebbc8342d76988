"""Config dataclasses of the zo2 plugin (the schemas of its registry entries)."""
from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING


@dataclass
class MeZOConfig:
    """Perturbation ``mezo``: SPSA with the seed trick."""

    eps: float = 1.0e-3
    lr: float = 1.0e-4
    weight_decay: float = 0.0
    distribution: str = "gaussian"  # gaussian | rademacher
    q: int = 1  # perturbations per step (n-SPSA), estimates averaged
    one_sided: bool = False  # (f(θ+εz) - f(θ)) / ε instead of the central difference
    no_decay: list[str] = field(default_factory=lambda: ["bias", "norm", "ln_", "layernorm"])
    schedule: str = "constant"  # constant | linear | cosine (to 0 at run.steps)
    warmup_steps: int = 0


@dataclass
class ZORecipeConfig:
    """Recipe ``zo``: forward-only fine-tuning with prompt + label-word loss."""

    batch_size: int = 16
    max_length: int = 128
    eval_batch_size: int = 64
    eval_examples: int = 0  # 0: the whole eval split
    grad_accum: int = 1  # must stay 1: a ZO step estimates one scalar from one batch


@dataclass
class NoOffloadConfig:
    """Offload policy ``none``: every parameter on the compute device; classic in-place MeZO steps."""


@dataclass
class ZO2OffloadConfig:
    """Offload policy ``zo2``: transformer blocks stream from host memory (or disk) through the device."""

    blocks: list[int] | None = None  # which blocks stream; None: all of them, []: none
    overlap: bool = True  # upload block i+1 and offload block i-1 while block i computes
    bucket: bool = True  # one flat buffer per block (one copy per transfer) instead of one per tensor
    storage_dtype: str = "model"  # model (the blocks' own dtype) | fp32 | fp16 | bf16: dtype of the host copy
    pin_memory: bool = True  # pinned host buffers on CUDA (ignored on CPU)
    # directory of memory-mapped block shards (disk tier), rewritten from the model at start; "run": in the run
    # dir; null: host memory, or "run" for a zo2_shards model (its own shards are never written)
    disk_dir: str | None = None


@dataclass
class ShardedModelConfig:
    """Model family ``zo2_shards``: a directory written by scripts/make_shards.py."""

    path: str = MISSING
