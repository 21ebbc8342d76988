"""Config dataclasses of the distzo2 plugin (the schemas of its ``parallel:`` entries)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistZOConfig:
    """Parallel strategies ``zo_ddp``, ``pertp`` and ``zo_2d``: torch.distributed, launched by torchrun."""

    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    timeout_s: float = 300.0  # a collective (or the start-up rendezvous) waiting longer than this fails the run
    sliced_upload: bool = False  # with offload zo2: each rank of a node uploads 1/k of a block, an all-gather completes it
