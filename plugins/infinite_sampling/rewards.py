"""Reward functions for GRPO, and the combinator that evaluates them safely.

A reward function is any callable::

    reward(prompts: list[str], completions: list[str], **example_fields) -> list[float | None]

called on a batch of N samples: ``example_fields`` holds, per dataset field
(e.g. ``answer``), a list of N values aligned with ``prompts``.  This is
TRL's reward-function convention (extra dataset columns arrive as keyword
lists).  ``None`` means "does not apply to this sample" and counts as 0 in
the weighted sum (TRL uses nansum for the same purpose).

* ``ExactMatch(field="answer", strip=True)``: 1.0 when the completion equals
  the example's field (both whitespace-stripped when ``strip``), else 0.0.
* ``RegexFormat(pattern, reward=1.0, mode="fullmatch")``: ``reward`` when the
  pattern matches, else 0.0.  ``mode="fullmatch"`` (default) needs the
  *whole* completion to match (``re.fullmatch``); ``mode="search"`` accepts a
  match anywhere (``re.search``).
* ``PythonCallable("package.module:function")``: the user's own function,
  imported by path.
* ``evaluate_rewards(fns, weights, ...)``: runs every function, checks each
  value, and returns the weighted total per sample.  A raise or a
  non-finite value is reported with the sample index and the function's
  name: a one-line ``ValueError`` with ``on_error="fail"``, or a 0 reward and
  a count with ``on_error="skip"``.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

ON_ERROR = ("fail", "skip")
REGEX_MODES = ("fullmatch", "search")


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_batch(prompts: Sequence[str], completions: Sequence[str], fields: Mapping[str, Sequence]) -> int:
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts but {n} completions")
    for key, values in fields.items():
        if len(values) != n:
            raise ValueError(f"field {key!r} has {len(values)} values but there are {n} completions")
    return n


class ExactMatch:
    """1.0 when ``completion == example[field]`` (compared as strings), else 0.0.

    With ``strip`` (default) both sides lose leading/trailing whitespace
    first, so " 7" matches "7" and a trailing newline does not matter.
    """

    def __init__(self, field: str = "answer", strip: bool = True):
        self.field, self.strip = field, strip
        self.name = f"exact_match[{field}]"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence) -> list[float]:
        if self.field not in fields:
            raise ValueError(
                f"{self.name}: the examples have no field {self.field!r} "
                f"(fields passed: {sorted(fields) or 'none'})"
            )
        targets = fields[self.field]
        _check_batch(prompts, completions, {self.field: targets})
        out = []
        for completion, target in zip(completions, targets):
            a, b = str(completion), str(target)
            if self.strip:
                a, b = a.strip(), b.strip()
            out.append(1.0 if a == b else 0.0)
        return out

    def __repr__(self) -> str:
        return f"ExactMatch(field={self.field!r}, strip={self.strip})"


class RegexFormat:
    """``reward`` when the completion matches ``pattern``, else 0.0.

    ``mode="fullmatch"`` (default): the whole completion must match
    (``re.fullmatch``), e.g. ``r"\\d+"`` rejects "7 apples".
    ``mode="search"``: a match anywhere counts (``re.search``).
    ``flags`` are ``re`` flags (e.g. ``re.DOTALL`` for multi-line formats).
    """

    def __init__(self, pattern: str, reward: float = 1.0, mode: str = "fullmatch", flags: int = 0):
        if mode not in REGEX_MODES:
            raise ValueError(f"unknown regex mode {mode!r}; allowed: {', '.join(REGEX_MODES)}")
        if not math.isfinite(reward):
            raise ValueError(f"reward must be finite, got {reward}")
        try:
            self.regex = re.compile(pattern, flags)
        except re.error as e:
            raise ValueError(f"invalid regex {pattern!r}: {e}") from None
        self.pattern, self.reward, self.mode = pattern, float(reward), mode
        self.name = f"regex_{mode}[{pattern}]"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence) -> list[float]:
        _check_batch(prompts, completions, {})
        match = self.regex.fullmatch if self.mode == "fullmatch" else self.regex.search
        return [self.reward if match(str(c)) is not None else 0.0 for c in completions]

    def __repr__(self) -> str:
        return f"RegexFormat({self.pattern!r}, reward={self.reward}, mode={self.mode!r})"


class PythonCallable:
    """A user reward function imported from ``"package.module:function"``.

    The part after ``:`` may be a dotted attribute path (``"mod:Class.method"``);
    ``"package.module.function"`` (no colon) is read as module + last name.
    The import happens here, so a wrong path fails at construction with a
    ``ValueError`` naming it.  Calls are forwarded unchanged.
    """

    def __init__(self, path: str):
        if not isinstance(path, str) or not path.strip():
            raise ValueError(f"reward function path must be a non-empty 'module:function' string, got {path!r}")
        path = path.strip()
        if path.startswith("file:"):
            file_name, _, attr_path = path[len("file:"):].rpartition(":")
            if not file_name or not attr_path:
                raise ValueError(f"reward function path {path!r} must look like 'file:path/to/rewards.py:function'")
            module_name = file_name
            module = _import_file(path, file_name)
        else:
            if ":" in path:
                module_name, _, attr_path = path.partition(":")
            else:
                module_name, _, attr_path = path.rpartition(".")
            if not module_name or not attr_path:
                raise ValueError(f"reward function path {path!r} must look like 'package.module:function'")
            try:
                with _without_working_folder():
                    module = importlib.import_module(module_name)
            except Exception as e:  # ImportError, or whatever the module raises on import
                raise ValueError(
                    f"reward function {path!r}: cannot import module {module_name!r} "
                    f"({type(e).__name__}: {_one_line(e)}; modules are not imported from the working folder: "
                    f"install it, or name the file explicitly as 'file:path/to/module.py:function')"
                ) from e
        obj: Any = module
        for part in attr_path.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"reward function {path!r}: {module_name!r} has no attribute {attr_path!r}")
            obj = getattr(obj, part)
        if not callable(obj):
            raise ValueError(f"reward function {path!r} is not callable (it is a {type(obj).__name__})")
        self.path, self.fn, self.name = path, obj, path

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **fields: Sequence):
        return self.fn(prompts, completions, **fields)

    def __repr__(self) -> str:
        return f"PythonCallable({self.path!r})"


@contextlib.contextmanager
def _without_working_folder():
    """Import as if the working folder were not on sys.path: ``python -m plait`` (and every ``--nproc`` rank)
    puts it first, so a file dropped there would run from a config naming it. Only that first entry ('' or
    the working folder) is hidden; the installed packages' paths stay."""
    saved = list(sys.path)
    cwd = os.path.realpath(os.getcwd())
    if sys.path and (sys.path[0] in ("", ".") or os.path.realpath(sys.path[0]) == cwd):
        del sys.path[0]
    try:
        yield
    finally:
        sys.path[:] = saved


def _import_file(path: str, file_name: str) -> Any:
    """The module of an explicit ``file:`` path (the config names the code it runs)."""
    import importlib.util

    target = Path(file_name).expanduser()
    if not target.is_file():
        raise ValueError(f"reward function {path!r}: file '{target}' not found")
    name = f"plait_reward_{abs(hash(str(target.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, target)
    if spec is None or spec.loader is None:
        raise ValueError(f"reward function {path!r}: '{target}' is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - whatever the file raises on import
        raise ValueError(f"reward function {path!r}: cannot import '{target}' ({type(e).__name__}: {_one_line(e)})") \
            from e
    return module


class RewardShapeError(ValueError):
    """A reward function returned the wrong number of values (a bug in the function)."""


def reward_name(fn: Callable) -> str:
    """A readable name for a reward function: its ``name``, ``__name__`` or class name."""
    name = getattr(fn, "name", None)
    if isinstance(name, str) and name:
        return name
    name = getattr(fn, "__name__", None)
    if isinstance(name, str) and name:
        return name
    return type(fn).__name__


@dataclass
class RewardResult:
    """What ``evaluate_rewards`` returns.

    ``rewards``: weighted total per sample.  ``per_function``: each function's
    raw (unweighted) values, keyed by name (made unique with ``#k``); a skipped
    or ``None`` value is 0.0 there.  ``skipped``: how many (sample, function)
    values were skipped on errors; ``skipped_by_function`` by name.
    """

    rewards: list[float]
    per_function: dict[str, list[float]] = dc_field(default_factory=dict)
    skipped: int = 0
    skipped_by_function: dict[str, int] = dc_field(default_factory=dict)


def _to_value(v: Any) -> float | None:
    """A reward value as float (None stays None); raises TypeError for a non-number."""
    if v is None:
        return None
    if isinstance(v, bool):
        return float(v)
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalar
        v = v.item()
    if not isinstance(v, (int, float)):
        raise TypeError(f"expected a number or None, got {type(v).__name__} {v!r}")
    return float(v)


def evaluate_rewards(
    fns: Sequence[Callable],
    weights: Sequence[float] | None,
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Mapping[str, Sequence] | None = None,
    on_error: str = "fail",
) -> RewardResult:
    """Run every reward function on the batch and return the weighted totals.

    ``fields`` maps each example field to a list of N per-sample values; it
    is passed to every function as keyword arguments.  ``weights`` defaults
    to 1.0 each.  Per sample: total = sum_k w_k * value_k, with ``None``
    (function abstains) counted as 0.

    Errors are per (sample, function).  A function is first called on the
    whole batch; if that raises, it is called once per sample to find which
    samples fail.  A raise, a value that is not a number, or a non-finite
    value (nan, inf) is an error: with ``on_error="fail"`` a one-line
    ``ValueError`` names the function, the sample index and the cause; with
    ``"skip"`` the value becomes 0.0 and is counted in ``skipped``.  A
    function that returns the wrong number of values is a bug in the
    function, not in a sample: it raises under both policies.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; allowed: {', '.join(ON_ERROR)}")
    fns = list(fns)
    weights = _checked_weights(fns, weights)
    fields = dict(fields or {})
    n = _check_batch(prompts, completions, fields)
    batch = _Batch(list(prompts), list(completions), {k: list(v) for k, v in fields.items()})

    totals = [0.0] * n
    result = RewardResult(rewards=totals)
    for fn, w, name in zip(fns, weights, _unique_names(fns)):
        values, errors = _score_function(fn, name, batch, on_error)
        if errors:
            first = min(errors)
            if on_error == "fail":
                more = f" (and {len(errors) - 1} more sample(s))" if len(errors) > 1 else ""
                raise ValueError(
                    f"reward function {name!r} failed on sample {first}: {errors[first]}{more}"
                )
            result.skipped += len(errors)
            result.skipped_by_function[name] = len(errors)

        raw_values = [0.0 if v is None else v for v in values]
        result.per_function[name] = raw_values
        for i, v in enumerate(raw_values):
            totals[i] += w * v
    return result


def _checked_weights(fns: list[Callable], weights: Sequence[float] | None) -> list[float]:
    """One finite float weight per function (1.0 each when ``weights`` is None); at least one function."""
    if not fns:
        raise ValueError("evaluate_rewards needs at least one reward function")
    if weights is None:
        weights = [1.0] * len(fns)
    weights = [float(w) for w in weights]
    if len(weights) != len(fns):
        raise ValueError(f"got {len(weights)} weights for {len(fns)} reward functions")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"reward weights must be finite, got {weights}")
    return weights


def _unique_names(fns: list[Callable]) -> list[str]:
    """Each function's `reward_name`, made unique with ``#k``."""
    names: list[str] = []
    for fn in fns:
        base = reward_name(fn)
        name, k = base, 1
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


@dataclass
class _Batch:
    """The samples every reward function is called on (fields: one list of N values per example field)."""

    prompts: list[str]
    completions: list[str]
    fields: dict[str, list]


def _call(fn: Callable, name: str, batch: _Batch, idx: Sequence[int]) -> list:
    """``fn`` on the samples ``idx``: its values as a list of ``len(idx)``, else `RewardShapeError`."""
    sub_fields = {k: [v[i] for i in idx] for k, v in batch.fields.items()}
    out = fn([batch.prompts[i] for i in idx], [batch.completions[i] for i in idx], **sub_fields)
    try:
        out = list(out)
    except TypeError:
        raise RewardShapeError(
            f"reward function {name!r} must return a list of {len(idx)} values, "
            f"got {type(out).__name__}"
        ) from None
    if len(out) != len(idx):
        raise RewardShapeError(
            f"reward function {name!r} returned {len(out)} values for {len(idx)} samples"
        )
    return out


def _checked_value(raw: Any) -> tuple[float | None, str | None]:
    """A returned reward as ``(value, None)``, or ``(None, cause)`` when it is not a number or not finite."""
    try:
        v = _to_value(raw)
    except TypeError as e:
        return None, f"returned a bad value ({e})"
    if v is not None and not math.isfinite(v):
        return None, f"returned a non-finite value {v}"
    return v, None


def _score_function(fn: Callable, name: str, batch: _Batch, on_error: str) -> tuple[list, dict[int, str]]:
    """One function's value per sample (None: abstained or failed) and the failing samples' causes. Called on the
    whole batch first; if that raises, once per sample to find the failing ones."""
    n = len(batch.completions)
    values: list[float | None] = [None] * n
    errors: dict[int, str] = {}  # sample index -> cause

    def check(i: int, raw: Any) -> None:
        v, cause = _checked_value(raw)
        if cause is not None:
            errors[i] = cause
        else:
            values[i] = v

    try:
        batch_out = _call(fn, name, batch, range(n)) if n else []
    except RewardShapeError:
        raise
    except Exception:
        batch_out = None

    if batch_out is not None:
        for i, raw in enumerate(batch_out):
            check(i, raw)
        return values, errors
    # The batched call raised: find the failing samples one by one.
    for i in range(n):
        try:
            (raw,) = _call(fn, name, batch, [i])
        except RewardShapeError:
            raise
        except Exception as e:
            errors[i] = f"raised {type(e).__name__}: {_one_line(e)}"
            continue
        check(i, raw)
    if not errors:
        # Each sample alone is fine, only the batch raises: report the batch.
        try:
            _call(fn, name, batch, range(n))
        except Exception as e:
            if on_error == "fail":
                raise ValueError(
                    f"reward function {name!r} raised on the batch of {n} samples "
                    f"(each sample alone succeeded): {type(e).__name__}: {_one_line(e)}"
                ) from e
    return values, errors
