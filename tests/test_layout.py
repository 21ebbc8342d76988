"""The checkout's top-level folders never shadow an installed module, whatever entry point a process started in
the repository root uses (``python -m``, ``python -c``, ``torchrun -m``: each puts the folder on ``sys.path``)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")

# What a process started in the repository root finds for each name: the origin file of a regular package or
# module, or the portions of a namespace package (``python -c`` puts '' = the current folder first on sys.path).
_PROBE = """
import importlib.util, json, sys
out = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    out[name] = None if spec is None else [spec.origin, list(spec.submodule_search_locations or [])]
print(json.dumps(out))
"""


def _inside_checkout(path: str | None) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(REPO)
    except ValueError:
        return False
    return ".venv" not in Path(path).resolve().relative_to(REPO).parts  # a venv kept in the checkout is installed


def test_no_top_level_folder_shadows_an_installed_distribution():
    provided = importlib.metadata.packages_distributions()
    folders = sorted(d.name for d in REPO.iterdir() if d.is_dir() and d.name.isidentifier())
    clashing = [name for name in folders if name in provided]
    assert "kernels" in clashing  # transformers >= 5 depends on the `kernels` distribution; the check must see it
    proc = subprocess.run([sys.executable, "-c", _PROBE, *clashing], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout)
    shadowed = {name: spec for name, spec in found.items()
                if spec is not None and spec[0] not in (None, "namespace") and _inside_checkout(spec[0])}
    assert not shadowed, f"folders of the checkout shadow installed distributions: {shadowed}"


def test_transformers_and_kernels_import_from_the_repository_root():
    code = "import transformers, kernels; print(kernels.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not _inside_checkout(proc.stdout.strip())


def test_python_m_plait_runs_from_the_repository_root():
    proc = subprocess.run([sys.executable, "-m", "plait", "--version"], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("plait ")


def test_plait_kernels_import_under_the_plait_name():
    proc = subprocess.run([sys.executable, "-c", "import plait.kernels.dp_clip, plait.kernels.wip_minprod"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
