"""Every fenced ``python`` and ``yaml`` example in README.md and docs/*.md runs.

* python: executed as a module in a fresh namespace; when it defines hook implementations it is then loaded as a
  plugin into a new host, which must load without a failure (a taken registry name disables a plugin), and an
  offload policy it registers drives one quick-start step (``plait run quickstart offload.name=<it>``).
* yaml: parsed; a block that is a run config (it has ``recipe:``) is resolved and validated against the
  registries, as ``plait validate`` does.

A block that is not meant to run (a fragment, a shell transcript in a python fence, a test body needing
fixtures) is marked by the line ``<!-- docs-test: skip (why) -->`` right before its fence. Use it sparingly.
"""
from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\s*\(([^)]+)\)\s*-->\s*$")


def blocks(lang: str) -> list:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) != lang:
                continue
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            line = text.count("\n", 0, m.start()) + 1
            skip = SKIP.search(before)
            marks = [pytest.mark.skip(reason=f"marked in the docs: {skip.group(1)}")] if skip else []
            out.append(pytest.param(m.group(2), id=f"{page.relative_to(ROOT)}:{line}", marks=marks))
    return out


def test_the_extractor_finds_examples():
    assert len(blocks("python")) >= 5 and len(blocks("yaml")) >= 3


@pytest.mark.parametrize("source", blocks("python"))
def test_python_example_runs(source, tmp_path, fresh_host, monkeypatch):
    monkeypatch.chdir(ROOT)
    module = types.ModuleType("plait_docs_example")
    monkeypatch.setitem(sys.modules, module.__name__, module)  # dataclasses look their module up
    exec(compile(source, "<docs example>", "exec"), module.__dict__)
    hooks = [n for n, v in vars(module).items() if callable(v) and hasattr(v, "plait_impl")]
    if not hooks:
        return
    host = fresh_host()
    before = {k: {e.name for e in r.entries()} for k, r in host.registries.by_kind.items()}
    from plait import manager

    # load the example as a plugin the way the host loads any other: registration must not fail
    host.pm.register(module, name="docs_example")
    failures: dict[str, str] = {}
    regs = manager._collect_registries(host.pm, failures)
    assert not failures, failures
    added = {k: {e.name for e in r.entries()} - before[k] for k, r in regs.by_kind.items()}
    if any(h.startswith("register_") and h != "register_commands" for h in hooks):
        assert any(added.values()), f"the example's hooks {hooks} registered nothing"
    for name in added.get("offload_policies", ()):
        from plait.config import load_config
        from plait.run import execute

        monkeypatch.setattr(manager, "_HOST", manager.PluginHost(host.pm, regs, host.plugins, {}))
        run = execute(load_config(ROOT / "configs" / "quickstart.yaml", [f"run.out_dir={tmp_path}", "run.steps=1", "run.progress=false",
                                                  "run.eval_every=0", f"offload.name={name}"]))
        assert run.status == "completed"


@pytest.mark.parametrize("source", blocks("yaml"))
def test_yaml_example_parses_and_validates(source, tmp_path, fresh_host):
    data = yaml.safe_load(source)
    if not (isinstance(data, dict) and "recipe" in data):
        return
    from plait.config import load_config, validate

    path = tmp_path / "example.yaml"
    path.write_text(source)
    host = fresh_host()
    validate(load_config(path), host.registries)
