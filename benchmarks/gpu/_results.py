"""The JSON document a GPU script writes: rewritten atomically after every result, so a timeout keeps what finished."""
from __future__ import annotations

import importlib
import json
import os
import sys
import time
import types
from pathlib import Path

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
    the packages on the way are registered as empty packages pointing into this checkout (their ``__init__``
    needs pluggy/omegaconf), so a module that needs only torch still imports."""
    try:
        return importlib.import_module(dotted)
    except ImportError as exc:
        log(f"plait not importable ({exc}); importing {dotted} from {REPO}")
    for k in [k for k in sys.modules if k == "plait" or k.startswith("plait.")]:
        del sys.modules[k]
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        name = ".".join(parts[:i])
        top = next((p for p in sorted(_PACKAGE_DIRS, key=len, reverse=True) if name == p or
                    name.startswith(p + ".")), None)
        if top is None:
            continue
        path = REPO / _PACKAGE_DIRS[top]
        for sub in name[len(top):].split(".")[1:]:
            path = path / sub
        mod = types.ModuleType(name)
        mod.__path__ = [str(path)]
        mod.__package__ = name
        sys.modules[name] = mod
    return importlib.import_module(dotted)
