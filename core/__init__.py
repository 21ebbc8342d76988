"""plait: a runtime for efficient and private training of large models in which every method is a plugin.

The core defines hook specs (`plait.hookspecs`), keeps the registries that plugins fill
(`plait.registry`), composes a run from YAML + command-line overrides (`plait.config`, `plait.run`), tracks it
(`plait.metrics`, `plait.checkpoint`) and exposes the `plait` command (`plait.cli`). Methods live in plugins.

A plugin module implements hooks with the `hookimpl` marker::

    from plait import hookimpl

    @hookimpl
    def register_recipes(register):
        register("my-recipe", MyRecipe, config=MyRecipeConfig, doc="what it does")
"""
from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    __version__ = version("plait")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

hookimpl = pluggy.HookimplMarker("plait")

__all__ = ["hookimpl", "__version__"]
