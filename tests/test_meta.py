"""Meta-tests: every hook documented and tested, every config valid, every schema instantiable, packaging
complete, README/Makefile contract present."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import tomllib

from plait.cli import hook_specs
from plait.config import load_config, validate
from plait.registry import KINDS

REPO = Path(__file__).resolve().parent.parent
HOOKS = [name for name, _, _ in hook_specs()]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_hook_list_is_complete():
    assert {k.hook for k in KINDS} | {"register_commands", "on_run_start", "on_log", "on_run_end"} == set(HOOKS)


@pytest.mark.parametrize("name,signature", [(n, s) for n, s, _ in hook_specs()])
def test_every_hook_is_documented_with_its_signature(name, signature):
    docs = (REPO / "docs" / "plugins.md").read_text()
    assert f"### {signature}" in docs, f"docs/plugins.md lacks a '### {signature}' heading"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_has_a_test(name):
    sources = "\n".join(p.read_text() for p in (REPO / "tests").rglob("test_*.py"))
    assert re.search(rf"def test_hook_{name}\b", sources), f"no test_hook_{name} in tests/"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS])
def test_every_config_validates(path, fresh_host):
    host = fresh_host()
    host.check_healthy()
    validate(load_config(path), host.registries)


def test_every_registry_schema_instantiates_from_defaults(fresh_host):
    host = fresh_host()
    entries = [e for k in KINDS for e in host.registries.by_kind[k.name].entries()]
    assert entries
    for entry in entries:
        assert dataclasses.is_dataclass(entry.config(), ), entry.name
        assert entry.doc, f"{entry.name} has no doc line"


def test_every_package_is_listed_in_pyproject():
    """A folder under a package root is a package when it holds an ``__init__.py``, Python files (a PEP 420
    portion such as ``kernels/``) or data shipped with the package (``assets/``)."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(meta["packages"])
    found = set()
    for prefix, folder in meta["package-dir"].items():
        root = REPO / folder
        for sub in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
            rel = sub.relative_to(root)
            if not all(part.isidentifier() for part in rel.parts) or "fixtures" in rel.parts:
                continue  # data folders such as assets/tiny-opt-base ship inside their package
            if any(sub.glob("*.py")) or sub.name == "assets":
                found.add(".".join((prefix,) + rel.parts))
    assert found == listed


def test_readme_and_ci_contract():
    readme = (REPO / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (REPO / ".ci" / "run").read_text()
    make = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", make, re.M) and re.search(r"^test:", make, re.M)
    assert "torch==" in make  # the CPU wheel is pinned in the Makefile
