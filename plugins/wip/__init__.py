"""Builtin plugin ``wip``: multiplication-less attention for LLMs (WiP light adaptation).

Work in progress: operators, the ``wip_attention`` model transform and recovery are registered here as they land.
"""
