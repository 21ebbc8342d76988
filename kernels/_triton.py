"""The one guarded Triton import the kernels share.

triton is a Linux/x86_64-only dependency; every kernel module keeps a PyTorch reference path that works without
it. ``INTERPRET`` is read once, at import: Triton itself reads ``TRITON_INTERPRET`` when it is first imported,
so setting it later has no effect.
"""
from __future__ import annotations

import contextlib
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


def on_device(t):
    """Context for a kernel launch on ``t``'s device: Triton launches on the *current* CUDA device, not the
    tensors' (with run.device=cuda:1 a launch would race on GPU 0). A no-op for CPU (interpreter) tensors."""
    import torch

    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


__all__ = ["HAVE_TRITON", "INTERPRET", "on_device", "tl", "triton"]
