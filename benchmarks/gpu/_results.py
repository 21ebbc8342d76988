"""The JSON document a GPU script writes: rewritten atomically after every result, so a timeout keeps what finished."""
from __future__ import annotations

import json
import os
import time

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
