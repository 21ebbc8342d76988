"""Placement of first-order training: ``parallel: {name: ddp}`` (data parallelism on torch.distributed).

    plait run --nproc 2 configs/basics/sft_quickstart.yaml parallel.name=ddp

``recipe.batch_size`` stays the global batch: each rank takes its contiguous slice of every micro-batch (the
single-process order), the shared `plait.step.FirstOrderStep` weights each rank's loss by its share of the
global batch and all-reduces the gradients once per step (accumulation runs locally, as under ``no_sync``), so
2 ranks compute the single-process update up to summation order. See docs/parallel.md.
"""
from __future__ import annotations

from dataclasses import dataclass

from plait import hookimpl


@dataclass
class DDPConfig:
    """Data parallelism for the first-order recipes, launched by ``plait run --nproc N`` or torchrun."""

    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    timeout_s: float = 300.0  # a collective (or the start-up rendezvous) waiting longer than this fails the run


def build_ddp(**kwargs):
    from .ddp import DDP

    return DDP(**kwargs)


@hookimpl
def register_parallel_strategies(register):
    # recipes whose step is not yet exact under ddp (refused at validate rather than run differently per rank)
    refuses = {
        "depth": "its BatchNorm statistics would be taken per rank over each rank's slice, so 2 ranks would not "
                 "train what one process trains (SyncBatchNorm or model.norm=group is not wired in yet)",
        "grpo": "each rank would sample its own rollouts and normalise rewards over its slice only; the group "
                "statistics need a gather across ranks that ddp does not do yet",
    }
    register("ddp", build_ddp, config=DDPConfig, updates=("first_order",), refuses=refuses,
             doc="data parallelism: each rank its slice of the global batch, gradients all-reduced once per step")
