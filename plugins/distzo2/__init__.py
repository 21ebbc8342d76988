"""Builtin plugin ``distzo2``: distributed zeroth-order fine-tuning on torch.distributed (DistZO2).

Work in progress: the parallel strategies ``pertp``, ``zo_ddp`` and ``2d`` are registered here as they land.
"""
