"""The JSON document a GPU script writes: rewritten atomically after every result, so a timeout keeps what finished."""
from __future__ import annotations

import gc
import importlib
import json
import os
import platform
import sys
import time
import traceback
import types
from pathlib import Path

import torch

T_START = time.perf_counter()  # the importing script's start, near enough (imported first)


class Results:
    """The JSON document, rewritten atomically after every change."""

    def __init__(self, path: str | None, doc: dict):
        self.path, self.doc = path, doc

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - T_START, 1)
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=2)
        os.replace(tmp, self.path)


REPO = Path(__file__).resolve().parents[2]
# plait's import packages and where they live in a checkout (pyproject's package-dir)
_PACKAGE_DIRS = {"plait": "core", "plait.plugins": "plugins", "plait.kernels": "kernels"}


def import_from_checkout(dotted: str, log=lambda *a: print(*a, file=sys.stderr)):
    """``importlib.import_module(dotted)``; if plait is not installed (a bare GPU machine where only torch is),
    every plait package of this checkout (the roots and each plugin folder) is registered as an empty package
    pointing at its folder, so that no package ``__init__`` (they need pluggy/omegaconf) runs and a module that
    needs only torch/transformers imports, whichever plait packages it reaches into."""
    try:
        return importlib.import_module(dotted)
    except ImportError as exc:
        log(f"plait not importable ({exc}); importing {dotted} from {REPO}")
    for k in [k for k in sys.modules if k == "plait" or k.startswith("plait.")]:
        del sys.modules[k]
    packages = {name: REPO / folder for name, folder in _PACKAGE_DIRS.items()}
    packages.update({f"plait.plugins.{d.name}": d for d in (REPO / "plugins").iterdir()
                     if (d / "__init__.py").is_file()})
    for name, path in packages.items():
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        mod.__package__ = name
        sys.modules[name] = mod
    return importlib.import_module(dotted)


# --- report helpers shared by the GPU scripts ---------------------------------------------------------------------
def err(exc: BaseException) -> dict:
    """An exception as a result entry: the message and the end of the traceback (call inside ``except``)."""
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": traceback.format_exc()[-3000:]}


def open_device(name: str, log) -> torch.device | None:
    """``torch.device(name)``; None (after a log line) where CUDA is asked for and not available. On CPU (the
    --tiny logic check) torch gets up to 8 threads."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        log("CUDA is not available; use --device cpu --tiny to check the logic on CPU")
        return None
    if device.type == "cpu":
        torch.set_num_threads(min(os.cpu_count() or 1, 8))
    return device


def machine(device: torch.device, **versions) -> dict:
    """The ``machine`` entry of a document: platform, python, torch, ``versions`` (other libraries), CUDA, GPU."""
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            **versions, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "cpus": os.cpu_count()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def gib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**30, 3)


def mem_now(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def mem_peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def run_check(doc: dict, res: Results, device: torch.device, check, describe, log) -> None:
    """``doc["correctness"] = check()``, logged as ``describe(result)``; an exception is recorded (`err`) and
    logged instead. Saved; the peak-memory counters are reset for what follows."""
    try:
        doc["correctness"] = check()
        log(describe(doc["correctness"]))
    except Exception as exc:  # noqa: BLE001
        doc["correctness"] = err(exc)
        log(f"correctness check failed: {exc}")
    res.save()
    reset_peak(device)


def run_entry(entries: dict, key: str, bench, res: Results, log, t_start: float, budget_s: float,
              after=None) -> None:
    """``bench()``, which fills ``entries[key]``, unless ``budget_s`` seconds have passed since ``t_start`` (then
    the entry says it was skipped); an exception (OOM included) is recorded in the entry and logged, and the next
    entry runs. ``after()`` runs after ``bench`` either way. Saved."""
    if time.perf_counter() - t_start > budget_s:
        entries[key] = {"skipped": "time budget spent"}
        res.save()
        return
    try:
        bench()
    except Exception as exc:  # noqa: BLE001
        entries.setdefault(key, {}).update(err(exc))
        log(f"{key} failed: {exc}")
    finally:
        if after is not None:
            after()
    res.save()
