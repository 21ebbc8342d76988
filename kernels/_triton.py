"""The one guarded Triton import the kernels share.

triton is a Linux/x86_64-only dependency; every kernel module keeps a PyTorch reference path that works without
it. ``INTERPRET`` is read once, at import: Triton itself reads ``TRITON_INTERPRET`` when it is first imported,
so setting it later has no effect.
"""
from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the platform
    triton = None
    tl = None
    HAVE_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

__all__ = ["HAVE_TRITON", "INTERPRET", "tl", "triton"]
