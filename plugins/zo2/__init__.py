"""Builtin plugin ``zo2``: zeroth-order (MeZO) fine-tuning with parameters offloaded and streamed (ZO2).

Registers perturbation ``mezo``, recipe ``zo``, offload policies ``none`` (plain in-place MeZO) and ``zo2``
(fused dual forward; transformer blocks stream from host memory or memory-mapped disk shards), and model
family ``zo2_shards`` (a model larger than RAM, loaded block by block from a sharded directory).

    plait run configs/zo2/opt.yaml
    plait run configs/zo2/opt.yaml offload.name=none        # the plain MeZO baseline
"""
from __future__ import annotations

from plait import hookimpl

from .config import MeZOConfig, NoOffloadConfig, ShardedModelConfig, ZO2OffloadConfig, ZORecipeConfig


def build_mezo(**kwargs):
    from .mezo import MeZO

    return MeZO(**kwargs)


def build_no_offload(model, device, mezo, run_dir=None):
    from .mezo import InPlaceMeZO

    return InPlaceMeZO(model, device, mezo)


def build_zo2(model, device, mezo, run_dir=None, **kwargs):
    import os
    from pathlib import Path

    from .fused import ZO2Engine

    disk_dir = kwargs.get("disk_dir")
    if disk_dir is None and getattr(model, "_plait_shard_dir", None):
        disk_dir = "run"  # a zo2_shards model trains a working copy of its shards, never the source
    if disk_dir == "run":  # shards inside the run directory
        if run_dir is None:
            raise ValueError("offload.disk_dir 'run' needs a run directory")
        disk_dir = Path(run_dir) / "block_shards"
        disk_dir.mkdir(parents=True, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if disk_dir is not None and world > 1 and Path(disk_dir).is_dir():
        # ranks share the directory and rewrite their shards at start: each writes and maps its own
        disk_dir = Path(disk_dir) / f"rank{int(os.environ.get('RANK', '0'))}"
        disk_dir.mkdir(exist_ok=True)
    kwargs["disk_dir"] = None if disk_dir is None else str(disk_dir)
    return ZO2Engine(model, device, mezo, **kwargs)


def build_zo_recipe(run, **kwargs):
    from .zo_recipe import ZORecipe

    return ZORecipe(run, **kwargs)


def build_sharded_model(path):
    from plait.plugins.basics import CausalLMBundle

    from .shards import load_sharded_model

    model, tokenizer = load_sharded_model(path)
    return CausalLMBundle(model, tokenizer)


@hookimpl
def register_model_families(register):
    register("zo2_shards", build_sharded_model, config=ShardedModelConfig, renamed_from=("zo2-shards",),
             doc="a causal LM from a sharded directory (scripts/make_shards.py); blocks memory-mapped, for models "
                 "larger than RAM")


@hookimpl
def register_perturbations(register):
    register("mezo", build_mezo, config=MeZOConfig, check=build_mezo, doc="SPSA with the seed trick: z regenerated per parameter, "
             "never stored; Gaussian or Rademacher, n-SPSA, one-sided")


@hookimpl
def register_recipes(register):
    register("zo", build_zo_recipe, config=ZORecipeConfig, doc="zeroth-order fine-tuning (forward passes only)",
             requires=("model", "data", "perturbation"), uses=("offload", "transforms", "grad_transform"),
             update="zeroth_order")


@hookimpl
def register_offload_policies(register):
    register("none", build_no_offload, config=NoOffloadConfig,
             doc="every parameter on the compute device (plain in-place MeZO for the zo recipe)")
    register("zo2", build_zo2, config=ZO2OffloadConfig,
             doc="blocks stream from host memory or disk; fused dual forward, lazy update, overlap")
