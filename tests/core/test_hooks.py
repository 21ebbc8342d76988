"""One test per hook spec (tests/core/test_meta.py checks that each hook has its `test_hook_<name>`).

Each ``register_<kind>`` test installs a plugin package implementing only that hook, then checks that the entry
lands in the right registry, attributed to the plugin, and that a config naming it validates against its schema.
"""
from __future__ import annotations

import json

import pytest

from plait.cli import main
from plait.config import load_config, validate
from plait.errors import ConfigError
from plait.registry import KINDS_BY_NAME

REGISTER = """
from dataclasses import dataclass
from plait import hookimpl

@dataclass
class Opts:
    width: int = 3

@hookimpl
def {hook}(register):
    register("probe", lambda **kw: kw, config=Opts, doc="probe entry")
"""


def _check_register_hook(kind_name, plugin_site, fresh_host, tmp_path):
    kind = KINDS_BY_NAME[kind_name]
    plugin_site("probe", REGISTER.format(hook=kind.hook))
    host = fresh_host()
    entry = host.registries.by_kind[kind_name].get("probe")
    assert (entry.plugin, entry.doc, entry.config().width) == ("probe", "probe entry", 3)
    assert entry.factory(width=5) == {"width": 5}
    # a recipe that declares no ``uses`` takes any section (sft would refuse e.g. an offload: section)
    host.registries.recipes.register("any-section", lambda **kw: kw, plugin="test")
    sections = {"recipe": "{name: any-section}", "model": "{name: hf_causal_lm}",
                "data": "{name: synthetic_sentiment}"}
    sections[kind.section] = "[{name: probe, width: 7}]" if kind.many else "{name: probe, width: 7}"
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("".join(f"{k}: {v}\n" for k, v in sections.items()))
    comps = validate(load_config(cfg_path), host.registries)
    comp = comps[kind.section][0] if kind.many else comps[kind.section]
    assert comp.entry.name == "probe" and comp.kwargs() == {"width": 7}
    with pytest.raises(ConfigError, match=rf"{kind.section}(\[0\])?\.width: .*Integer"):
        validate(load_config(cfg_path, [f"{kind.section}.width=wide"] if not kind.many else
                             [f"{kind.section}=[{{name: probe, width: wide}}]"]), host.registries)


def test_hook_register_model_families(plugin_site, fresh_host, tmp_path):
    _check_register_hook("model_families", plugin_site, fresh_host, tmp_path)


def test_hook_register_offload_policies(plugin_site, fresh_host, tmp_path):
    _check_register_hook("offload_policies", plugin_site, fresh_host, tmp_path)


def test_hook_register_perturbations(plugin_site, fresh_host, tmp_path):
    _check_register_hook("perturbations", plugin_site, fresh_host, tmp_path)


def test_hook_register_grad_transforms(plugin_site, fresh_host, tmp_path):
    _check_register_hook("grad_transforms", plugin_site, fresh_host, tmp_path)


def test_hook_register_sampler_schedulers(plugin_site, fresh_host, tmp_path):
    _check_register_hook("sampler_schedulers", plugin_site, fresh_host, tmp_path)


def test_hook_register_influence_estimators(plugin_site, fresh_host, tmp_path):
    _check_register_hook("influence_estimators", plugin_site, fresh_host, tmp_path)


def test_hook_register_recipes(plugin_site, fresh_host, tmp_path):
    _check_register_hook("recipes", plugin_site, fresh_host, tmp_path)


def test_hook_register_datasets(plugin_site, fresh_host, tmp_path):
    _check_register_hook("datasets", plugin_site, fresh_host, tmp_path)


def test_hook_register_parallel_strategies(plugin_site, fresh_host, tmp_path):
    _check_register_hook("parallel_strategies", plugin_site, fresh_host, tmp_path)


def test_hook_register_model_transforms(plugin_site, fresh_host, tmp_path):
    _check_register_hook("model_transforms", plugin_site, fresh_host, tmp_path)


def test_hook_register_commands(plugin_site, fresh_host, capsys):
    plugin_site("verb", """
from plait import hookimpl

@hookimpl
def register_commands(cli):
    p = cli.add_parser("shout", help="repeat a word loudly")
    p.add_argument("word")
    p.set_defaults(func=lambda args: print(args.word.upper()) or 3)
""")
    fresh_host()
    assert main(["shout", "quiet"]) == 3
    assert capsys.readouterr().out.strip() == "QUIET"
    for flag in ("--help", "-h"):  # help lists plugin commands (this one and the builtin attribute) with their help
        with pytest.raises(SystemExit) as exit_:
            main([flag])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "repeat a word loudly" in out and "shout" in out and "attribute" in out


class _Observer:
    from plait import hookimpl

    def __init__(self):
        self.events = []

    @hookimpl
    def on_run_start(self, run):
        self.events.append(("start", run.dir.exists(), run.status))

    @hookimpl
    def on_log(self, run, step, metrics):
        self.events.append(("log", step))
        if "train/loss" in metrics:
            metrics["train/loss_x2"] = 2 * metrics["train/loss"]

    @hookimpl
    def on_run_end(self, run, status):
        self.events.append(("end", status))


@pytest.fixture
def observed_run(tiny_config, fresh_host):
    from plait.run import execute

    host = fresh_host()
    obs = _Observer()
    host.pm.register(obs, name="observer")
    try:
        run = execute(load_config(tiny_config(steps=2)))
    finally:
        host.pm.unregister(name="observer")
    return obs, run


def test_hook_on_run_start(observed_run):
    obs, run = observed_run
    assert obs.events[0] == ("start", True, "running")


def test_hook_on_log(observed_run):
    obs, run = observed_run
    assert [e for e in obs.events if e[0] == "log"] == [("log", 0), ("log", 1), ("log", 2), ("log", 2)]
    rows = [json.loads(l) for l in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["train/loss_x2"] == pytest.approx(2 * r["train/loss"]) for r in rows if "train/loss" in r)


def test_hook_on_run_end(observed_run):
    obs, run = observed_run
    assert obs.events[-1] == ("end", "completed")
