"""Registries of named components that plugins fill through the ``register_<kind>`` hooks.

Each kind maps a config section (``model:``, ``offload:`` …) to a registry. An entry holds the factory,
its config dataclass (the schema), a one-line doc and the plugin that registered it.

Entry names are snake_case (``hf_causal_lm``, ``sam_train``), like the option keys of the YAML. An entry that
was known by another name declares it (``renamed_from=("hf-causal-lm",)``); the registry uses former names only
to answer a config that still says them with a one-line hint to the new name.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, PluginError


@dataclass(frozen=True)
class Kind:
    """A kind of component: the hook that registers it and the config section that selects it."""

    name: str  # registry name, e.g. "model_families"
    section: str  # config section, e.g. "model"
    hook: str  # hook name, e.g. "register_model_families"
    many: bool = False  # the section is a list of entries (transforms)
    chain: bool = False  # the section is one entry or a list applied in order (grad_transform)


KINDS: tuple[Kind, ...] = (
    Kind("recipes", "recipe", "register_recipes"),
    Kind("model_families", "model", "register_model_families"),
    Kind("datasets", "data", "register_datasets"),
    Kind("offload_policies", "offload", "register_offload_policies"),
    Kind("perturbations", "perturbation", "register_perturbations"),
    Kind("grad_transforms", "grad_transform", "register_grad_transforms", chain=True),
    Kind("sampler_schedulers", "sampler", "register_sampler_schedulers"),
    Kind("influence_estimators", "influence", "register_influence_estimators"),
    Kind("parallel_strategies", "parallel", "register_parallel_strategies"),
    Kind("model_transforms", "transforms", "register_model_transforms", many=True),
)
KINDS_BY_NAME = {k.name: k for k in KINDS}
KINDS_BY_SECTION = {k.section: k for k in KINDS}


@dataclass
class EmptyConfig:
    """Schema of an entry that takes no options."""


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    name: str
    factory: Callable[..., Any]
    config: type = EmptyConfig
    doc: str = ""
    plugin: str = "?"
    extra: dict = field(default_factory=dict)  # kind-specific metadata, e.g. a recipe's ``requires``
    renamed_from: tuple[str, ...] = ()  # former names, answered with a hint to this one


class Registry:
    """Name → `Entry` for one kind."""

    def __init__(self, kind: Kind):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._renamed: dict[str, str] = {}  # former name -> current name

    def register(self, name: str, factory: Callable[..., Any], *, config: type = EmptyConfig, doc: str = "",
                 plugin: str = "?", renamed_from: tuple[str, ...] | list[str] | str = (), **extra: Any) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin {plugin!r} registered a {self.kind.section} with an invalid name {name!r}")
        if not dataclasses.is_dataclass(config):
            raise PluginError(f"plugin {plugin!r}: {self.kind.section} {name!r} config must be a dataclass, "
                              f"got {config!r}")
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(f"{self.kind.section} {name!r} is registered twice: by plugin {other!r} and by "
                              f"plugin {plugin!r}; disable one with PLAIT_DISABLE_PLUGINS")
        former = (renamed_from,) if isinstance(renamed_from, str) else tuple(renamed_from)
        if not all(isinstance(old, str) and old and old != name for old in former):
            raise PluginError(f"plugin {plugin!r}: {self.kind.section} {name!r} has an invalid renamed_from "
                              f"{renamed_from!r}; give the former names as a tuple of strings")
        self._entries[name] = Entry(name, factory, config, doc, plugin, dict(extra), former)
        for old in former:
            self._renamed.setdefault(old, name)

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise self.unknown(name, f"{self.kind.section}.name") from None

    def renamed(self, name: str) -> str | None:
        """The current name of an entry formerly called ``name`` (None if ``name`` is current or unknown)."""
        if name in self._entries:
            return None
        new = self._renamed.get(name)
        return new if new in self._entries else None

    def unknown(self, name: str, where: str) -> ConfigError:
        """The error for a name that is not registered: a hint to the new name if it was renamed."""
        new = self.renamed(name)
        if new is not None:
            return ConfigError(f"{where}: {name!r} was renamed to {new!r}; write {new} instead")
        return ConfigError(f"{where}: unknown {self.kind.section} {name!r}; available: {self.describe_available()}")

    def describe_available(self) -> str:
        if not self._entries:
            return "none (no loaded plugin registers one)"
        return ", ".join(f"{e.name} ({e.plugin})" for e in self.entries())

    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class Registries:
    """All registries, attribute-accessible by kind name (``registries.model_families``)."""

    def __init__(self) -> None:
        self.by_kind: dict[str, Registry] = {k.name: Registry(k) for k in KINDS}

    def __getattr__(self, name: str) -> Registry:
        try:
            return self.__dict__["by_kind"][name]
        except KeyError:
            raise AttributeError(name) from None

    def for_section(self, section: str) -> Registry:
        return self.by_kind[KINDS_BY_SECTION[section].name]
