"""Builtin plugin ``distzo2``: distributed zeroth-order fine-tuning on torch.distributed (DistZO2).

Registers parallel strategies (the ``parallel:`` section) for the ``zo`` recipe, with the ``mezo``
perturbation and either offload policy (``none`` or the streamed ``zo2`` engine):

* ``zo_ddp``: every rank draws the same z, evaluates both losses on its own micro-batch; g is averaged;
* ``pertp``: perturbation parallelism: a rank pair evaluates f(θ+εz) and f(θ-εz) of the same batch;
* ``zo_2d``: PertP pairs × data-parallel groups.

Each step exchanges one all-gather of a few loss scalars; parameters never travel. Launch with torchrun
(gloo on CPU, NCCL on GPU; multi-node through torchrun's rendezvous)::

    torchrun --nproc-per-node 2 -m plait run configs/distzo2/opt_pertp.yaml
    plait run --nproc 2 configs/distzo2/opt_zo_ddp.yaml          # the same, torchrun started for you
"""
from __future__ import annotations

from plait import hookimpl

from .config import DistZOConfig


def build_zo_ddp(**kwargs):
    from .strategies import ZoDDP

    return ZoDDP(**kwargs)


def build_pertp(**kwargs):
    from .strategies import PertP

    return PertP(**kwargs)


def build_2d(**kwargs):
    from .strategies import TwoD

    return TwoD(**kwargs)


@hookimpl
def register_parallel_strategies(register):
    register("zo_ddp", build_zo_ddp, config=DistZOConfig, updates=("zeroth_order",),
             doc="DistZO2 data parallelism: same z on every rank, own micro-batch, one scalar all-gather per step")
    register("pertp", build_pertp, config=DistZOConfig, updates=("zeroth_order",),
             doc="DistZO2 perturbation parallelism: a rank pair runs f(θ+εz) and f(θ-εz) of one batch")
    register("zo_2d", build_2d, config=DistZOConfig, updates=("zeroth_order",), renamed_from=("2d",),
             doc="DistZO2 2D parallelism: PertP pairs × data-parallel groups (world = 2 × groups)")
