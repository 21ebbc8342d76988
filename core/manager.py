"""The plugin manager: builtins, entry-point plugins, environment switches, and registry collection.

Builtins are ordinary plugin modules listed in `DEFAULT_PLUGINS`; third-party packages declare an entry point in
the ``plait`` group::

    [project.entry-points.plait]
    hello = "plait_hello"

Environment variables:

* ``PLAIT_LOAD_PLUGINS=a,b``: load only these third-party plugins (empty string: none); builtins always load.
* ``PLAIT_DISABLE_PLUGINS=a,b``: do not load these plugins (builtin short names such as ``basics`` work too).
* ``PLAIT_TRACE_PLUGINS=1``: print every hook call (name, implementing plugins, milliseconds) to stderr.

A plugin that fails to import or to register is recorded in `PluginHost.failures` with its error; the others
still load. Commands that build something refuse to start while a failure is recorded (see `check_healthy`).
"""
from __future__ import annotations

import importlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pluggy

from . import __version__, hookspecs
from .errors import PluginError
from .registry import KINDS, Registries

DEFAULT_PLUGINS: tuple[str, ...] = (
    "plait.plugins.basics",
    "plait.plugins.zo2",
    "plait.plugins.flashdp",
    "plait.plugins.infinite_sampling",
    "plait.plugins.sam_if",
    "plait.plugins.distzo2",
    "plait.plugins.capsule",
    "plait.plugins.wip",
    "plait.plugins.parallel",
)

ENTRY_POINT_GROUP = "plait"


@dataclass
class PluginInfo:
    name: str
    module: str
    version: str
    builtin: bool
    hooks: list[str] = field(default_factory=list)


@dataclass
class PluginHost:
    """A loaded plugin manager with its registries, plugin metadata and failures."""

    pm: pluggy.PluginManager
    registries: Registries
    plugins: dict[str, PluginInfo]
    failures: dict[str, str]  # plugin name -> one-line error

    def check_healthy(self) -> None:
        """Raise `PluginError` if any plugin failed to load (a run must not silently lose a component)."""
        if self.failures:
            name, err = next(iter(self.failures.items()))
            raise PluginError(f"{err}; fix the plugin or skip it with PLAIT_DISABLE_PLUGINS={name}")

    def observers(self, hook_name: str) -> list:
        """The plain functions implementing an observer hook, for direct calls on hot paths."""
        return [impl.function for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls())]


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _trace_hook_calls(pm: pluggy.PluginManager) -> None:
    """Write one stderr line per hook call: its name, the plugins implementing it and its wall time.

    Only names and timings: pluggy's own tracing prints every argument's repr (whole models, configs).
    """
    starts: list[float] = []

    def before(hook_name, hook_impls, kwargs):
        starts.append(time.perf_counter())

    def after(outcome, hook_name, hook_impls, kwargs):
        ms = (time.perf_counter() - starts.pop()) * 1e3
        names = ",".join(impl.plugin_name for impl in hook_impls) or "-"
        sys.stderr.write(f"plait trace: {hook_name} [{names}] {ms:.2f} ms\n")

    pm.add_hookcall_monitoring(before, after)


def create_plugin_manager() -> PluginHost:
    """Load builtins and entry-point plugins, then fill the registries. Never raises for a bad plugin."""
    pm = pluggy.PluginManager("plait")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("PLAIT_TRACE_PLUGINS") == "1":
        _trace_hook_calls(pm)
    disabled = set(_env_list("PLAIT_DISABLE_PLUGINS") or [])
    allowed = _env_list("PLAIT_LOAD_PLUGINS")
    plugins: dict[str, PluginInfo] = {}
    failures: dict[str, str] = {}

    def add(name: str, module_name: str, load, version: str, builtin: bool) -> None:
        try:
            module = load()
            pm.register(module, name=name)
        except Exception as exc:  # a broken plugin must not take the others down
            if os.environ.get("PLAIT_TRACE_PLUGINS") == "1":
                traceback.print_exc()
            failures[name] = f"plugin {name!r} ({module_name}) failed to load: {_one_line(exc)}"
            return
        plugins[name] = PluginInfo(name, module_name, version, builtin)

    for module_name in DEFAULT_PLUGINS:
        name = module_name.rsplit(".", 1)[-1]
        if name not in disabled:
            add(name, module_name, lambda m=module_name: importlib.import_module(m), __version__, True)

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in disabled or ep.name in plugins or (allowed is not None and ep.name not in allowed):
            continue
        version = ep.dist.version if ep.dist is not None else "?"
        add(ep.name, ep.value, ep.load, version, False)

    registries = _collect_registries(pm, failures)
    for name, info in plugins.items():
        plugin = pm.get_plugin(name)
        if plugin is not None:
            info.hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
    return PluginHost(pm, registries, plugins, failures)


def _collect_registries(pm: pluggy.PluginManager, failures: dict[str, str]) -> Registries:
    """Call every ``register_<kind>`` implementation once, attributing entries and errors to its plugin.

    Each implementation is called on its own so that one plugin raising does not stop the others, and a
    plugin's entries of one hook are committed only if the whole hook call succeeded.
    """
    registries = Registries()
    for kind in KINDS:
        registry = registries.by_kind[kind.name]
        for impl in getattr(pm.hook, kind.hook).get_hookimpls():  # registration order: builtins first
            if impl.plugin_name in failures:
                continue
            staged: list[tuple[tuple, dict]] = []

            def register(name, factory, **kwargs: Any) -> None:
                staged.append(((name, factory), kwargs))

            t0 = time.perf_counter()
            try:
                impl.function(**{arg: register for arg in impl.argnames})
                for args, kwargs in staged:
                    registry.register(*args, plugin=impl.plugin_name, **kwargs)
            except PluginError as exc:
                failures[impl.plugin_name] = str(exc)
            except Exception as exc:
                failures[impl.plugin_name] = (f"plugin {impl.plugin_name!r} failed in {kind.hook}: "
                                              f"{_one_line(exc)}")
            if os.environ.get("PLAIT_TRACE_PLUGINS") == "1":
                sys.stderr.write(f"plait trace: {kind.hook} [{impl.plugin_name}] "
                                 f"{(time.perf_counter() - t0) * 1e3:.2f} ms\n")
    return registries


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host, created on first use."""
    global _HOST
    if _HOST is None:
        _HOST = create_plugin_manager()
    return _HOST


def reset_host() -> None:
    """Forget the loaded plugins (tests, or after changing the environment variables)."""
    global _HOST
    _HOST = None
