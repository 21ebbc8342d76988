"""Plugin manager: builtins, entry points, allow-list, disable, tracing, failures, duplicates, listing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from plait.cli import main
from plait.manager import DEFAULT_PLUGINS

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "plait-hello"

GOOD = """
from dataclasses import dataclass
from plait import hookimpl

@dataclass
class Cfg:
    k: int = 1

@hookimpl
def register_datasets(register):
    register("{name}_data", dict, config=Cfg, doc="a test dataset")
"""


def test_builtins_all_load_and_register(fresh_host):
    host = fresh_host()
    assert not host.failures
    assert {p.rsplit(".", 1)[-1] for p in DEFAULT_PLUGINS} <= set(host.plugins)
    assert "sft" in host.registries.recipes and "hf_causal_lm" in host.registries.model_families


def test_entry_point_plugin_is_discovered(plugin_site, fresh_host):
    plugin_site("ext", GOOD.format(name="ext"))
    host = fresh_host()
    assert host.plugins["ext"].version == "0.1" and not host.plugins["ext"].builtin
    assert host.registries.datasets.get("ext_data").plugin == "ext"
    assert host.plugins["ext"].hooks == ["register_datasets"]


def test_allow_list_and_disable(plugin_site, fresh_host, monkeypatch):
    plugin_site("ext", GOOD.format(name="ext"))
    plugin_site("other", GOOD.format(name="other"))
    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "other")
    host = fresh_host()
    assert "other" in host.plugins and "ext" not in host.plugins and "basics" in host.plugins
    monkeypatch.setenv("PLAIT_LOAD_PLUGINS", "")
    host = fresh_host()
    assert "other" not in host.plugins and "ext" not in host.plugins
    monkeypatch.delenv("PLAIT_LOAD_PLUGINS")
    monkeypatch.setenv("PLAIT_DISABLE_PLUGINS", "ext,basics")
    host = fresh_host()
    assert "ext" not in host.plugins and "basics" not in host.plugins and "other" in host.plugins
    assert "sft" not in host.registries.recipes


def test_plugin_failing_at_import_is_reported_and_others_load(plugin_site, fresh_host, capsys):
    plugin_site("broken", "raise RuntimeError('kaput at import')\n")
    plugin_site("ext", GOOD.format(name="ext"))
    host = fresh_host()
    assert "ext" in host.plugins and "basics" in host.plugins
    assert "broken" in host.failures and "kaput at import" in host.failures["broken"]
    # listing still works and shows the error; building refuses with one line, exit 2
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert "kaput at import" in rows["broken"]["error"]
    assert main(["validate", "quickstart"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: plugin 'broken'") and "PLAIT_DISABLE_PLUGINS=broken" in err


def test_plugin_failing_at_registration(plugin_site, fresh_host, capsys):
    plugin_site("badreg", """
from plait import hookimpl

@hookimpl
def register_datasets(register):
    register("half_data", dict)
    raise ValueError("cannot register today")
""")
    host = fresh_host()
    assert "register_datasets" in host.failures["badreg"] and "cannot register today" in host.failures["badreg"]
    assert "half_data" not in host.registries.datasets  # nothing half-registered
    assert main(["run", "quickstart", "run.steps=1"]) == 2


def test_two_plugins_registering_one_name(plugin_site, fresh_host, capsys):
    plugin_site("dup", GOOD.replace("{name}_data", "synthetic_sentiment"), module="plait_dup")
    host = fresh_host()
    msg = host.failures["dup"]
    assert "registered twice" in msg and "'basics'" in msg and "'dup'" in msg
    assert main(["validate", "quickstart"]) == 2
    assert "registered twice" in capsys.readouterr().err


def test_non_dataclass_config_is_a_plugin_error(plugin_site, fresh_host):
    plugin_site("nodc", """
from plait import hookimpl

@hookimpl
def register_datasets(register):
    register("x", dict, config=dict)
""")
    assert "must be a dataclass" in fresh_host().failures["nodc"]


def test_trace_env_var_prints_hook_calls(plugin_site, fresh_host, monkeypatch, capfd):
    monkeypatch.setenv("PLAIT_TRACE_PLUGINS", "1")
    host = fresh_host()
    host.pm.hook.on_run_end(run=None, status="completed")
    assert "on_run_end" in capfd.readouterr().err


class _Loud:
    def __repr__(self):
        return "LOUD-OBJECT-REPR"


def test_trace_prints_names_and_timings_not_objects(fresh_host, monkeypatch, capfd):
    monkeypatch.setenv("PLAIT_TRACE_PLUGINS", "1")
    host = fresh_host()
    capfd.readouterr()
    host.pm.hook.on_run_end(run=_Loud(), status="completed")
    err = capfd.readouterr().err
    assert "LOUD-OBJECT-REPR" not in err  # pluggy's tracing printed every argument's repr
    lines = [ln for ln in err.splitlines() if "on_run_end" in ln]
    assert len(lines) == 1 and lines[0].startswith("plait trace: on_run_end [") and lines[0].endswith(" ms")


def test_plugins_text_names_a_plugin_that_failed_to_load(plugin_site, fresh_host, capsys):
    plugin_site("arith", "raise ImportError('no module named sympy')\n")
    fresh_host()
    assert main(["plugins"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("arith"))
    assert "(?)" not in line and "FAILED" in line and "no module named sympy" in line


def test_plugins_json_into_a_closed_pipe_ends_quietly():
    """`plait plugins --json | head -1`: no BrokenPipeError traceback on stderr."""
    code = ("import sys; from plait.cli import main; sys.exit(main(['plugins', '--json']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader has left before plait writes (as `head` does after its lines)
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_ls_lists_entries_with_plugins(capsys, fresh_host):
    fresh_host()
    assert main(["ls", "data", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in rows}
    assert by_name["jsonl"]["plugin"] == by_name["synthetic_sentiment"]["plugin"] == "basics"
    assert all(r["section"] == "data" and r["kind"] == "datasets" for r in rows)
    assert [r["name"] for r in rows] == sorted(by_name)
    assert main(["ls", "nonsense"]) == 2
    assert "unknown kind 'nonsense'" in capsys.readouterr().err


@pytest.mark.slow
def test_fixture_package_installs_and_is_discovered(tmp_path):
    """The real thing: pip installs tests/fixtures/plait-hello into a target dir; a fresh `plait` process
    finds its entry point, lists it, honours the allow-list and disable switches, and runs its verb."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(FIXTURE)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def plait(*args, **env):
        e = dict(os.environ, PYTHONPATH=str(target), **env)
        e.pop("PLAIT_LOAD_PLUGINS", None) if "PLAIT_LOAD_PLUGINS" not in env else None
        return subprocess.run([sys.executable, "-m", "plait.cli", *args], env=e, capture_output=True, text=True)

    rows = {r["name"]: r for r in json.loads(plait("plugins", "--json").stdout)}
    assert rows["hello"]["version"] == "0.3.0" and rows["hello"]["builtin"] is False
    assert set(rows["hello"]["hooks"]) == {"register_commands", "register_datasets"}
    ls = json.loads(plait("ls", "datasets", "--json").stdout)
    assert {"name": "hello_data", "plugin": "hello"}.items() <= next(r for r in ls if r["name"] == "hello_data").items()
    assert plait("hello", "--name", "plait").stdout.strip() == "hello, plait"
    assert "hello" not in {r["name"] for r in json.loads(plait("plugins", "--json", PLAIT_LOAD_PLUGINS="").stdout)}
    assert "hello" not in {r["name"] for r in json.loads(plait("plugins", "--json", PLAIT_DISABLE_PLUGINS="hello").stdout)}
    assert "hello" in {r["name"] for r in json.loads(plait("plugins", "--json", PLAIT_LOAD_PLUGINS="hello").stdout)}
