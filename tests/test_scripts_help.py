"""Helper scripts answer ``--help`` with their usage instead of treating it as an argument (or running)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in (ROOT / "scripts").glob("*.py") if not p.name.startswith("_"))
# benchmarks/run_all.py and benchmarks/<method>/*.py, CPU and GPU scripts alike (the GPU ones parse their flags
# before they look for a GPU); the ids stay the file names, unique across the folders
BENCHMARKS = sorted(p for p in [*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "benchmarks").glob("*/*.py")]
                    if not p.name.startswith("_"))


def _help(path: Path) -> None:
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and path.name in proc.stdout.splitlines()[0], proc.stdout[:400]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_answers_help(path):
    _help(path)


@pytest.mark.slow
@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_answers_help(path):
    _help(path)
