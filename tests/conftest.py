"""Shared fixtures: isolated plugin hosts, fake installed plugin packages, a tiny run config."""
from __future__ import annotations

import importlib
import os
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


def write_plugin_dist(root: Path, name: str, source: str, module: str | None = None, version: str = "0.1") -> Path:
    """Make ``root`` look like a site-packages holding one installed plugin package: a module and a
    ``.dist-info`` with an entry point in the ``plait`` group (what ``pip install`` would leave)."""
    module = module or f"plait_{name.replace('-', '_')}"
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    dist = root / f"{module}-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(f"[plait]\n{name} = {module}\n")
    return root


@pytest.fixture
def plugin_site(tmp_path, monkeypatch):
    """A function ``add(name, source)`` that installs a fake plugin package visible to this process."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    added: list[str] = []

    def add(name: str, source: str, **kw) -> Path:
        write_plugin_dist(site, name, source, **kw)
        added.append(kw.get("module") or f"plait_{name.replace('-', '_')}")
        importlib.invalidate_caches()
        return site

    yield add
    for mod in added:
        sys.modules.pop(mod, None)


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (restored after): tiny matmuls run much faster on one thread than on
    two contended ones on a shared CPU. Use it per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``
    or from an autouse fixture of a folder's conftest."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_host(monkeypatch):
    """A function returning a newly loaded plugin host (after env vars / plugin_site changes)."""
    from plait import manager

    monkeypatch.setattr(manager, "_HOST", None)

    def make():
        manager.reset_host()
        return manager.get_host()

    yield make
    manager.reset_host()


TINY_RUN = """
run: {{name: t, seed: 0, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: {ckpt}, out_dir: {out},
      progress: false}}
recipe: {{name: sft, lr: 3.0e-3, batch_size: 4, eval_batch_size: 32}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 32, n_eval: 8}}
"""


@pytest.fixture
def tiny_config(tmp_path):
    """Write a tiny sft config; returns its path. Keyword args: steps, ckpt."""

    def make(steps: int = 4, ckpt: int = 0, name: str = "tiny.yaml") -> Path:
        path = tmp_path / name
        path.write_text(TINY_RUN.format(steps=steps, ckpt=ckpt, out=tmp_path / "runs"))
        return path

    return make
