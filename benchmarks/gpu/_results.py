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
