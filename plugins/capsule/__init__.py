"""Builtin plugin ``capsule``: capsule endoscopy models (V2-SfMLearner depth + ego-motion, pooling ViT).

Work in progress: model families, recipes and datasets are registered here as they land.
"""
