"""Config composition: run defaults ⊕ YAML file (with optional ``base:`` list) ⊕ command-line dotlist.

``load_config(path, overrides)`` returns an OmegaConf ``DictConfig``; ``validate(cfg, registries)`` checks every
component section against its registry entry's dataclass schema (unknown keys, wrong types, missing values)
and fills defaults in, before anything is built.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from .errors import ConfigError
from .registry import KINDS, KINDS_BY_SECTION, Entry, Registries


@dataclass
class RunSection:
    """The ``run:`` section: what every run has, whatever the recipe."""

    name: str = "run"
    seed: int = 0
    steps: int = 100
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only before the first and after the last step
    ckpt_every: int = 0  # 0: checkpoint only at the end (and on Ctrl-C)
    out_dir: str = "runs"
    resume: str | None = None  # a run directory to continue from its newest complete checkpoint
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    progress: bool = True  # show a progress bar
    keep_checkpoints: int = 2  # newest complete checkpoints kept; 0 keeps all
    on_nonfinite: str = "stop"  # a NaN/inf training loss: stop (status diverged, last good checkpoint) | skip


SECTIONS = ("run",) + tuple(k.section for k in KINDS)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int, first: int):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports unhashable keys
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise _DuplicateKey(key, line, seen[key])
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found" if not path.exists() else
                          f"config file '{path}' is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (undecodable byte at offset {exc.start})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise ConfigError(f"config file '{path}': duplicate key '{exc.key}' at line {exc.line} (first at line "
                          f"{exc.first}); each key may appear once per mapping") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file '{path}' is not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections (run:, recipe:, model: …), "
                          f"not a {type(data).__name__}")
    try:
        return OmegaConf.create(data)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config file '{path}': {exc.msg if hasattr(exc, 'msg') else exc}") from None


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> DictConfig:
    path = path.resolve() if path.exists() else path
    if path in seen:
        chain = " -> ".join(str(p) for p in seen + (path,))
        raise ConfigError(f"config 'base:' entries form a cycle: {chain}")
    cfg = _load_yaml(path)
    bases = cfg.pop("base", None)
    if bases is None:
        return cfg
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, (list, ListConfig)) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config file '{path}': 'base' must be a file path or a list of file paths")
    merged = OmegaConf.create({})
    for base in bases:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.exists():
            raise ConfigError(f"config file '{path}': base '{base}' not found (looked at '{base_path}')")
        merged = _merge(merged, _load_with_bases(base_path, seen + (path,)))
    return _merge(merged, cfg)


def _merge(base: DictConfig, layer: DictConfig) -> DictConfig:
    """Deep merge, except that a component section whose ``name`` changes is replaced, not merged: the
    options of the old entry mean nothing to the new one (``data.name=jsonl`` drops ``n_train``). A section that
    changes between one mapping and a list (``grad_transform``) is replaced too."""
    base = base.copy()
    for section in list(layer.keys()):
        if section == "run" or section not in base:
            continue
        old, new = base._get_node(section), layer._get_node(section)
        if isinstance(old, (DictConfig, ListConfig)) != isinstance(new, (DictConfig, ListConfig)) or (
                isinstance(old, DictConfig) != isinstance(new, DictConfig)):
            with _open(base):  # a mapping replaced by a list or a scalar (recipe=[1,2]): validate names it
                del base[section]
            continue
        old, new = base[section], layer[section]
        if (isinstance(old, DictConfig) and isinstance(new, DictConfig) and old.get("name") is not None
                and new.get("name") is not None and old.get("name") != new.get("name")) or (
                isinstance(old, (DictConfig, ListConfig)) and isinstance(new, (DictConfig, ListConfig))
                and type(old) is not type(new)):
            with _open(base):
                del base[section]
    return OmegaConf.merge(base, layer)


def _parse_overrides(overrides: list[str]) -> list[tuple[str, list[str]]]:
    """The overrides as runs in command-line order: ``("set", [key=value, …])`` and ``("delete", [key])``, so
    that ``~model.config model.config={…}`` replaces the mapping (a delete applies where it stands)."""
    groups: list[tuple[str, list[str]]] = []
    for item in overrides:
        if item.startswith("~"):
            groups.append(("delete", [item[1:]]))
        elif "=" in item and not item.startswith("="):
            if groups and groups[-1][0] == "set":
                groups[-1][1].append(item)
            else:
                groups.append(("set", [item]))
        else:
            raise ConfigError(f"override '{item}' is not of the form key=value or ~key")
    return groups


def _delete(cfg: DictConfig, dotted: str) -> None:
    if dotted == "run" or dotted.startswith("run."):
        raise ConfigError(f"override '~{dotted}': keys of the run section cannot be deleted; set them instead "
                          f"(run.{dotted.partition('.')[2] or 'KEY'}=VALUE)")
    parent_key, _, leaf = dotted.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise ConfigError(f"override '~{dotted}': no such key to delete")
    with _open(parent):
        del parent[leaf]


class _open:
    """Temporarily lift struct mode on a node (structured sections reject deletes)."""

    def __init__(self, node: DictConfig):
        self.node, self.flag = node, OmegaConf.is_struct(node)

    def __enter__(self):
        OmegaConf.set_struct(self.node, False)

    def __exit__(self, *exc):
        OmegaConf.set_struct(self.node, self.flag)


def _explain(exc: OmegaConfBaseException) -> str:
    msg = getattr(exc, "msg", None) or str(exc)
    return msg.splitlines()[0].strip()


def _merge_sets(cfg: DictConfig, sets: list[str]) -> DictConfig:
    """``cfg`` ⊕ the ``key=value`` overrides ``sets`` (checked as the file's sections are)."""
    try:
        dot = OmegaConf.from_dotlist(sets)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"command-line overrides: {_explain(exc)}") from None
    except yaml.YAMLError as exc:  # a value such as {a: 1, a: 2}
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"command-line overrides: {problem} (each key may appear once per mapping)") from None
    unknown = [k for k in dot.keys() if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"override '{unknown[0]}…': unknown section '{unknown[0]}'; allowed sections: "
                          f"{', '.join(SECTIONS)}")
    _check_run_node(dot, "command-line overrides")
    return _merge_checked(cfg, dot, "override {key}: {msg} (run keys: {run_keys})")


def _merge_checked(cfg: DictConfig, layer: DictConfig, error: str, **fields: Any) -> DictConfig:
    """`_merge`, a failure (a wrong type of a ``run`` key, …) as a ConfigError formatted from ``error`` with
    ``{key}``, ``{msg}``, ``{run_keys}`` and ``fields``."""
    try:
        return _merge(cfg, layer)
    except OmegaConfBaseException as exc:
        run_keys = ", ".join(f.name for f in dataclasses.fields(RunSection))
        raise ConfigError(error.format(key=getattr(exc, "full_key", "") or "", msg=_explain(exc),
                                       run_keys=run_keys, **fields)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Compose run defaults ⊕ file (and its ``base:`` files) ⊕ dotlist overrides, resolved."""
    cfg = OmegaConf.create({"run": OmegaConf.structured(RunSection)})
    file_cfg = _load_with_bases(Path(path)) if path is not None else OmegaConf.create({})
    unknown = [k for k in file_cfg.keys() if k not in SECTIONS]
    if unknown:
        raise ConfigError(f"config file '{path}': unknown section '{unknown[0]}'; allowed sections: "
                          f"{', '.join(SECTIONS)}")
    _check_run_node(file_cfg, f"config file '{path}'")
    groups = _parse_overrides(list(overrides))
    cfg = _merge_checked(cfg, file_cfg, "{key}: {msg} (in '{path}'; run keys: {run_keys})", path=path)
    for kind, items in groups:  # in command-line order
        if kind == "delete":
            _delete(cfg, items[0])
        else:
            cfg = _merge_sets(cfg, items)
    try:
        OmegaConf.resolve(cfg)
    except (InterpolationResolutionError, OmegaConfBaseException) as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"{key}: cannot resolve interpolation: {_explain(exc)}") from None
    _check_run_section(cfg.run)
    return cfg


def _check_run_node(layer: DictConfig, where: str) -> None:
    """An empty ``run:`` (every key commented out) means the defaults; anything but a mapping is an error."""
    if "run" not in layer:
        return
    node = layer._get_node("run")
    if node._is_none():
        with _open(layer):
            del layer["run"]
    elif not isinstance(node, DictConfig):
        raise ConfigError(f"run: must be a mapping of run keys ({', '.join(f.name for f in dataclasses.fields(RunSection))}), "
                          f"got {node._value()!r} in {where}")
    else:
        check_scalars(RunSection, _raw(node), "run", f" (in {where})")


def _raw(node: DictConfig) -> dict:
    try:
        return OmegaConf.to_container(node, resolve=False)
    except OmegaConfBaseException:
        return {}


_INT_TYPES = {"int", "Optional[int]", "int | None", "None | int"}
_FLOAT_TYPES = {"float", "Optional[float]", "float | None", "None | float"}
INT_LIMIT = 2**63  # torch / numpy take int64


def check_scalars(schema: type, raw: Any, where: str, suffix: str = "") -> None:
    """The shared schema check of every section (not per plugin): an ``int`` option refuses a float (1e23, 2.5)
    and values beyond int64; a ``float`` option refuses NaN and ±inf (``1e400`` reads as inf) unless its field
    declares ``metadata={"allow_inf": True}``."""
    if not isinstance(raw, dict) or not dataclasses.is_dataclass(schema):
        return
    for f in dataclasses.fields(schema):
        if f.name not in raw:
            continue
        value, kind = raw[f.name], f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if isinstance(value, bool) or value is None or (isinstance(value, str) and "${" in value):
            continue
        if kind in _INT_TYPES:
            number = _number(value)
            if isinstance(number, float):
                raise ConfigError(f"{where}.{f.name}: must be an integer, got {value!r}{suffix}")
            if isinstance(number, int) and not -INT_LIMIT <= number < INT_LIMIT:
                raise ConfigError(f"{where}.{f.name}: must be an integer in the 64-bit range, got {number}{suffix}")
        elif kind in _FLOAT_TYPES:
            number = _number(value)
            if isinstance(number, (int, float)) and not math.isfinite(number):
                if math.isinf(number) and f.metadata.get("allow_inf"):
                    continue
                raise ConfigError(f"{where}.{f.name}: must be a finite number, got {value!r}{suffix}")


def _number(value: Any) -> Any:
    """A YAML/OmegaConf scalar as a number when it reads as one ('1e23' is a string to YAML 1.1)."""
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            return value
    return value


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _check_run_section(run: DictConfig) -> None:
    for key in ("steps", "log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
        if run[key] is None or run[key] < 0:
            raise ConfigError(f"run.{key}: must be a non-negative integer, got {run[key]}")
    if run.log_every == 0:
        raise ConfigError("run.log_every: must be at least 1")
    if run.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"run.on_nonfinite: {run.on_nonfinite!r}; allowed: stop, skip")
    if not DEVICE.fullmatch(run.device):
        raise ConfigError(f"run.device: {run.device!r} is not a device; allowed: auto, cpu, cuda, cuda:N, mps")
    if not 0 <= run.seed < 2**63:  # torch.manual_seed's range (numpy takes it modulo 2**32)
        raise ConfigError(f"run.seed: must be an integer in [0, 2**63), got {run.seed}")


@dataclass
class Component:
    """A validated config section: its registry entry and its typed options (the entry's dataclass)."""

    section: str
    entry: Entry
    options: Any  # an instance of entry.config

    def kwargs(self) -> dict[str, Any]:
        return {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}


def renamed_key(schema: type, key: str) -> str | None:
    """The option that replaced ``key`` in an entry's schema: a field declares its former spellings with
    ``field(metadata={"renamed_from": ("old",)})``. None if ``key`` is a field or was never one."""
    if not dataclasses.is_dataclass(schema):
        return None
    fields = dataclasses.fields(schema)
    if any(f.name == key for f in fields):
        return None
    return next((f.name for f in fields if key in f.metadata.get("renamed_from", ())), None)


def find_renamed(cfg: Any, registries: Registries) -> str | None:
    """The first entry name or option key in a config (a saved ``config.yaml`` of an older run) that has since
    been renamed, as ``"<key path>: 'old' was renamed to 'new'"``; None if every name is current."""
    data = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    if not isinstance(data, dict):
        return None
    for section, node in data.items():
        kind = KINDS_BY_SECTION.get(section)
        if kind is None:
            continue
        items = [(f"{section}[{i}]", n) for i, n in enumerate(node)] if isinstance(node, list) else [(section, node)]
        registry = registries.for_section(section)
        for where, item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            new = registry.renamed(item["name"])
            if new is not None:
                return f"{where}.name: {item['name']!r} was renamed to {new!r}"
            if item["name"] in registry:
                schema = registry.get(item["name"]).config
                for key in item:
                    new = renamed_key(schema, str(key))
                    if new is not None:
                        return f"{where}.{key}: {key!r} was renamed to {new!r}"
    return None


def validate_section(section: str, node: Any, registries: Registries, where: str) -> tuple[Component, DictConfig]:
    """Check one component node against its registry entry; returns (Component, the node with defaults filled)."""
    registry = registries.for_section(section)
    if not isinstance(node, DictConfig):
        shape = "a mapping with a 'name' key, or a list of them" if registry.kind.chain and where == section else \
            "a mapping with a 'name' key"
        raise ConfigError(f"{where}: must be {shape}; available: {registry.describe_available()}")
    if node.get("name") is None:
        raise ConfigError(f"{where}.name: missing; available: {registry.describe_available()}")
    if str(node.name) not in registry:  # named by its place (transforms[0].name), not just its section
        raise registry.unknown(str(node.name), f"{where}.name")
    entry = registry.get(str(node.name))
    schema = OmegaConf.structured(entry.config)
    options = OmegaConf.masked_copy(node, [k for k in node.keys() if k != "name"])
    label = f"{section} {entry.name!r} (plugin {entry.plugin!r})"
    for key in options.keys():
        new = renamed_key(entry.config, str(key))
        if new is not None:
            raise ConfigError(f"{where}.{key}: {str(key)!r} was renamed to {new!r} for {label}; write "
                              f"{where}.{new} instead")
    allowed = ", ".join(f.name for f in dataclasses.fields(entry.config)) or "none"
    check_scalars(entry.config, _raw(options), where)
    try:
        merged = OmegaConf.merge(schema, options)
        obj = OmegaConf.to_object(merged)
    except ConfigKeyError as exc:
        key = getattr(exc, "key", None) or _explain(exc)
        raise ConfigError(f"{where}.{key}: unknown key for {label}; allowed keys: {allowed}") from None
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"{where}.{key}: required value missing for {label}") from None
    except ValidationError as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"{where}.{key}: {_explain(exc)} for {label}") from None
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"{where}.{key}: {_explain(exc)} for {label}") from None
    check = entry.extra.get("check")  # the factory's own checks, run without building anything heavy
    if check is not None:
        try:
            check(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)})
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"{where} {entry.name!r}: {exc}") from None
    full = OmegaConf.merge(OmegaConf.create({"name": entry.name}), OmegaConf.structured(obj))
    return Component(section, entry, obj), full


def check_chain(section: str, entries: list[Entry]) -> None:
    """Refuse a ``grad_transform:`` chain with no sound meaning; ``entries`` are registry entries in order.

    An entry declares ``private=True`` (it clips per-sample gradients, adds noise and accounts for it) or
    ``reads_data=True`` (it recomputes gradients from the batch, e.g. SAM's ascent) at registration.
    """
    names = [e.name for e in entries]
    for i, e in enumerate(entries):
        if e.name in names[:i]:
            raise ConfigError(f"{section}[{i}]: {e.name!r} appears twice in the chain; a transform acts once per "
                              f"step")
    private = [i for i, e in enumerate(entries) if e.extra.get("private")]
    if len(private) > 1:
        a, b = private[:2]
        raise ConfigError(f"{section}[{b}]: a second private transform ({names[b]!r} after {names[a]!r}) would "
                          f"clip and noise twice and account twice; keep one")
    if private:
        p = private[0]
        for i, e in enumerate(entries):
            if not e.extra.get("reads_data"):
                continue
            if i > p:
                raise ConfigError(f"{section}[{i}]: {e.name!r} after the private {names[p]!r} would recompute the "
                                  f"gradient from the raw batch and release it unprivatized; put {e.name!r} "
                                  f"before {names[p]!r} (it then uses the previous step's private gradient)")
            if not e.extra.get("composes_before_private"):
                raise ConfigError(f"{section}[{i}]: {e.name!r} reads the batch again and has no mode that "
                                  f"composes with the private {names[p]!r}; remove one of them")


def validate(cfg: DictConfig, registries: Registries) -> dict[str, Any]:
    """Check every section against its entry's schema and fill in defaults (in place).

    Returns section → `Component` (``transforms`` → list of `Component`). Raises `ConfigError` naming the key.
    """
    if cfg.get("recipe") is None:
        raise ConfigError(f"recipe: missing; every config names a recipe; available: "
                          f"{registries.recipes.describe_available()}")
    components: dict[str, Any] = {}
    for section in list(cfg.keys()):
        if section == "run":
            continue
        kind = KINDS_BY_SECTION.get(section)
        if kind is None:
            raise ConfigError(f"unknown section '{section}'; allowed sections: {', '.join(SECTIONS)}")
        node = cfg[section]
        if node is None:
            continue
        if kind.many:
            if not isinstance(node, ListConfig):
                raise ConfigError(f"{section}: must be a list of mappings with a 'name' key")
            comps, fulls = [], []
            for i, item in enumerate(node):
                comp, full = validate_section(section, item, registries, f"{section}[{i}]")
                comps.append(comp)
                fulls.append(full)
            components[section] = comps
            cfg[section] = fulls
        elif kind.chain and isinstance(node, ListConfig):
            if len(node) == 0:
                raise ConfigError(f"{section}: an empty list; give one mapping with a 'name' key, a list of them, "
                                  f"or remove the section (~{section})")
            comps, fulls = [], []
            for i, item in enumerate(node):
                comp, full = validate_section(section, item, registries, f"{section}[{i}]")
                comps.append(comp)
                fulls.append(full)
            check_chain(section, [c.entry for c in comps])
            components[section] = comps
            cfg[section] = fulls
        else:
            comp, full = validate_section(section, node, registries, section)
            components[section] = comp
            cfg[section] = full
    recipe = components["recipe"]
    requires, uses = tuple(recipe.entry.extra.get("requires", ())), recipe.entry.extra.get("uses")
    for needed in requires:
        if needed not in components:
            registry = registries.for_section(needed)
            raise ConfigError(f"{needed}: missing; recipe {recipe.entry.name!r} needs a '{needed}:' section; "
                              f"available: {registry.describe_available()}")
    # a section no part of the run reads would be saved in config.yaml and silently ignored (a grad_transform
    # under a recipe without one trains with no DP noise): refuse it. The core itself reads run and parallel.
    # An analysis section (``influence:``) is read after training by its plugin, not by the recipe: its entry
    # declares ``after_run=fn(cfg, components)``, which accepts this run or raises ConfigError with the reason.
    after = {s: c for s, c in components.items() if not isinstance(c, list) and c.entry.extra.get("after_run")}
    for comp in after.values():
        comp.entry.extra["after_run"](cfg, components)
    # A recipe that declares no ``uses`` (an older third-party one) is not checked.
    if uses is None:
        return components
    readable = {"recipe", "parallel", *requires, *uses, *after}
    for section in components:
        if section not in readable:
            used = ", ".join(s for s in (*requires, *uses)) or "none"
            raise ConfigError(f"{section}: recipe {recipe.entry.name!r} does not use a '{section}:' section (its "
                              f"sections: {used}); remove it (~{section}) or choose a recipe that uses it")
    if "grad_transform" in components:
        _check_update_kind(recipe, components["grad_transform"], registries)
    # the recipe's checks across sections (a transform its model or its own update cannot take): the entry's
    # ``check_components=fn(components)``, raising ConfigError (or ValueError) with the line to print
    check_components = recipe.entry.extra.get("check_components")
    if check_components is not None:
        try:
            check_components(components)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if "parallel" in components:
        _check_parallel(recipe, components["parallel"], registries)
        # a strategy's checks across sections (a family or transform it cannot place): ``check_components=fn``
        check_placement = components["parallel"].entry.extra.get("check_components")
        if check_placement is not None:
            try:
                check_placement(components)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
    return components


def parallel_choices(recipe: Component, registries: Registries, multi: bool = False) -> list[str]:
    """The ``parallel:`` strategies that declare support for the recipe's update kind (``updates=``; an entry
    without the declaration is taken to support both); ``multi``: only those that can run on several ranks."""
    want = recipe.entry.extra.get("update", "first_order")
    return [e.name for e in registries.for_section("parallel").entries()
            if want in e.extra.get("updates", ("first_order", "zeroth_order"))
            and not (multi and e.extra.get("max_world") == 1)]


def _check_parallel(recipe: Component, parallel: Component, registries: Registries) -> None:
    """A strategy runs only the updates it declares: a zeroth-order strategy under a gradient recipe would run
    one complete, duplicate training per rank."""
    want = recipe.entry.extra.get("update", "first_order")
    have = parallel.entry.extra.get("updates", ("first_order", "zeroth_order"))
    why = (parallel.entry.extra.get("refuses") or {}).get(recipe.entry.name)  # a strategy's own refusals
    if why:
        raise ConfigError(f"parallel: {parallel.entry.name!r} does not run recipe {recipe.entry.name!r} yet: {why}")
    if want not in have:
        allowed = ", ".join(parallel_choices(recipe, registries)) or "none"
        raise ConfigError(f"parallel: {parallel.entry.name!r} runs {'/'.join(h.replace('_', '-') for h in have)} "
                          f"steps, but recipe {recipe.entry.name!r} takes {want.replace('_', '-')} steps; "
                          f"allowed for {recipe.entry.name!r}: {allowed}")


def _check_update_kind(recipe: Component, transform: Any, registries: Registries) -> None:
    """A grad transform acts on the update its recipe makes: first-order gradients (``sft``…) or zeroth-order
    projected gradients (``zo``). Entries declare ``update=`` (default ``first_order``)."""
    want = recipe.entry.extra.get("update", "first_order")
    members = transform if isinstance(transform, list) else [transform]
    for i, comp in enumerate(members):
        have = comp.entry.extra.get("update", "first_order")
        if have == want:
            continue
        where = f"grad_transform[{i}]" if isinstance(transform, list) else "grad_transform"
        alternatives = [e.name for e in registries.for_section("grad_transform").entries()
                        if e.extra.get("update", "first_order") == want
                        and bool(e.extra.get("private")) == bool(comp.entry.extra.get("private"))]
        hint = f"; use {' or '.join(repr(a) for a in alternatives)}" if alternatives else ""
        raise ConfigError(f"{where}: {comp.entry.name!r} transforms {have.replace('_', '-')} gradients, but recipe "
                          f"{recipe.entry.name!r} takes {want.replace('_', '-')} steps{hint}")
