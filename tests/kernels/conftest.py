"""Shared by the kernel tests: run a script in a fresh interpreter with TRITON_INTERPRET=1 (Triton reads it at
import, so it cannot be switched on inside the test process) and return the JSON it prints after ``RESULT ``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def run_under_interpreter():
    def run(script: str, timeout: int, kernel) -> dict:
        """``kernel``: the plait.kernels module the script drives; without triton the test is skipped."""
        if not kernel.HAVE_TRITON:
            pytest.skip("triton not installed")
        env = dict(os.environ, TRITON_INTERPRET="1")
        proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stderr[-4000:]
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
        return json.loads(line[len("RESULT "):])

    return run


@pytest.fixture
def triton_aot():
    """``(triton, GPUTarget, ASTSource)`` for compiling a kernel ahead of time for a GPU target (no GPU needed); the
    test is skipped where triton's AOT API has moved."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:  # pragma: no cover - triton API moved
        pytest.skip(f"triton AOT API unavailable: {e}")
    return triton, GPUTarget, ASTSource
