"""``parallel: ddp`` needs no other plugin: with ``PLAIT_DISABLE_PLUGINS=distzo2`` it validates and runs a 2-step
sft on 2 gloo ranks whose processes cannot import ``plait.plugins.distzo2`` at all (a meta-path hook refuses it),
and the logged losses equal those of the same 2-rank run with distzo2 loaded (and one process's within 1e-6).

Before the process group moved into the core (`plait.distributed.ProcessGroup`), ddp subclassed DistZO2's base
and the blocked import failed the run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plait.cli import main
from plait.config import load_config
from plait.manager import get_host, reset_host
from plait.run import execute
from tests.plugins.parallel._runs import losses
from tests.plugins.parallel.test_ddp_equivalence import _argv

STEPS = ["run.steps=2"]
BLOCKER = '''import sys


class _NoDistZO2:
    """Refuse to import the distzo2 plugin: what a disabled or uninstalled plugin amounts to."""

    def find_spec(self, name, path=None, target=None):
        if name == "plait.plugins.distzo2" or name.startswith("plait.plugins.distzo2."):
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, _NoDistZO2())
'''


def _two_ranks(root: Path, argv: list[str], env: dict[str, str]) -> list[float]:
    out = subprocess.run([sys.executable, "-m", "plait", "run", "--nproc", "2", *argv, *STEPS, "parallel.name=ddp",
                          "parallel.timeout_s=120"], env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = list((root / "runs" / "r").iterdir())
    return losses(run_dir)


def test_ddp_validates_with_distzo2_disabled(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PLAIT_DISABLE_PLUGINS", "distzo2")
    reset_host()
    try:
        parallel = get_host().registries.for_section("parallel")
        assert "zo_ddp" not in parallel and "ddp" in parallel  # distzo2 is really off, ddp is there
        argv = _argv(tmp_path, "sft")
        assert main(["validate", *argv, *STEPS, "parallel.name=ddp"]) == 0, capsys.readouterr().err
    finally:
        reset_host()


@pytest.mark.slow
def test_ddp_runs_without_distzo2_like_with_it(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(p for p in (str(blocker), os.environ.get("PYTHONPATH", "")) if p)
    probe = subprocess.run([sys.executable, "-c", "import plait.plugins.distzo2"], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": path}, timeout=120)
    assert probe.returncode != 0 and "blocked in this test" in probe.stderr  # the hook is active in a child

    off_root = tmp_path / "off"
    off = _two_ranks(off_root, _argv(off_root, "sft"), {"PLAIT_DISABLE_PLUGINS": "distzo2", "PYTHONPATH": path})
    on_root = tmp_path / "on"
    on = _two_ranks(on_root, _argv(on_root, "sft"), {})
    one_argv = _argv(tmp_path / "one", "sft")
    one = losses(execute(load_config(one_argv[0], [*one_argv[1:], *STEPS])).dir)
    assert len(off) == len(on) == len(one) == 2
    assert off == on, (off, on)  # the same code path, the same ranks: bit for bit
    for a, b in zip(one, off):
        assert abs(a - b) <= 1e-6 * abs(a), (one, off)
