"""Placement of first-order training: ``parallel: {name: ddp}`` (data parallelism on torch.distributed) and
``parallel: {name: fsdp}`` (FSDP2 sharding of the hf_causal_lm family; `fsdp.FSDP`, docs/parallel.md).

    plait run --nproc 2 configs/basics/sft_quickstart.yaml parallel.name=ddp

``recipe.batch_size`` stays the global batch: each rank takes its contiguous slice of every micro-batch (the
single-process order), the shared `plait.step.FirstOrderStep` weights each rank's loss by its share of the
global batch and all-reduces the gradients once per step (accumulation runs locally, as under ``no_sync``), so
2 ranks compute the single-process update up to summation order. See docs/parallel.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    register("fsdp", build_fsdp, config=FSDPConfig, updates=("first_order",), refuses=FSDP_REFUSES,
             check_components=check_fsdp,
             doc="FSDP2 for hf_causal_lm: parameters, gradients and optimizer state sharded per block")
    register("ddp", build_ddp, config=DDPConfig, updates=("first_order",), refuses=refuses,
             doc="data parallelism: each rank its slice of the global batch, gradients all-reduced once per step")


@dataclass
class MixedPrecisionConfig:
    """FSDP2's MixedPrecisionPolicy: the dtype of the all-gathered parameters and of the gradient reduce-scatter
    (none: the parameters' own dtype; the sharded master copy and the optimizer stay in it)."""

    param_dtype: str = "none"  # none | fp32 | bf16 | fp16
    reduce_dtype: str = "none"  # none | fp32 | bf16 | fp16


@dataclass
class FSDPConfig:
    """FSDP2 (fully_shard per transformer block, then the root) for the hf_causal_lm family."""

    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    timeout_s: float = 300.0  # a collective (or the start-up rendezvous) waiting longer than this fails the run
    reshard_after_forward: bool = True  # free each block's gathered parameters after its forward (gather again)
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)


def build_fsdp(**kwargs):
    from .fsdp import FSDP

    return FSDP(**kwargs)


FSDP_FAMILIES = ("hf_causal_lm",)
FSDP_REFUSES = {
    "grpo": "each rank would sample its own rollouts and normalise rewards over its slice only (as under ddp), "
            "and generation under sharded parameters is not wired",
    "wip_recover": "it trains each swapped copy of the model in its own loop, not the shared first-order step, so "
                   "nothing would be sharded and every rank would run the whole study",
}


def check_fsdp(components) -> None:
    """fsdp at validate: the hf_causal_lm family only, no grad_transform, no model transform, valid dtypes."""
    from .fsdp import parse_dtype

    recipe = components["recipe"].entry.name
    model = components.get("model")
    if model is None or model.entry.name not in FSDP_FAMILIES:
        name = "none" if model is None else repr(model.entry.name)
        raise ValueError(f"parallel: 'fsdp' shards the {', '.join(FSDP_FAMILIES)} family per transformer block; "
                         f"recipe {recipe!r} has model {name}; use parallel ddp for it")
    chain = components.get("grad_transform")
    for i, comp in enumerate(chain if isinstance(chain, list) else [chain] if chain is not None else []):
        where = f"grad_transform[{i}]" if isinstance(chain, list) else "grad_transform"
        extra = comp.entry.extra
        if extra.get("private"):
            why = ("per-sample clipping needs the per-layer hooks to see unsharded parameters and flat clipping a "
                   "global norm across shards; neither is wired; use parallel ddp (private ddp)")
        elif extra.get("reads_data"):
            why = ("its ascent moves the sharded parameters in place and re-runs the step; not wired or tested "
                   "under fsdp; use parallel ddp")
        else:
            why = "not wired or tested under sharded parameters; use parallel ddp"
        raise ValueError(f"{where}: {comp.entry.name!r} under parallel 'fsdp' (recipe {recipe!r}) is not "
                         f"supported: {why}")
    for i, comp in enumerate(components.get("transforms") or []):
        raise ValueError(f"transforms[{i}]: {comp.entry.name!r} under parallel 'fsdp' is not supported yet (a model "
                         f"edit before sharding is not tested under fsdp); remove it or use parallel ddp")
    mp = components["parallel"].options.mixed_precision
    for key in ("param_dtype", "reduce_dtype"):
        try:
            parse_dtype(key, getattr(mp, key))
        except Exception as exc:  # noqa: BLE001 - ConfigError is a PlaitError; pass its line on
            raise ValueError(str(exc)) from None
