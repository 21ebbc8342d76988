"""Registry names: one convention (snake_case) for every entry, and former names answered with a hint."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from plait.config import find_renamed, renamed_key, validate_section
from plait.errors import ConfigError, PluginError
from plait.registry import KINDS, KINDS_BY_NAME, Registry

REPO = Path(__file__).resolve().parents[2]
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")

# The renames of issue 22 (item 2), written out here rather than read from the plugins: every one must be
# declared by its entry, or an old config would get "unknown" instead of the hint.
RENAMED = {
    "model": {"hf-causal-lm": "hf_causal_lm", "tabular-mlp": "tabular_mlp", "wip-lm": "wip_lm",
              "zo2-shards": "zo2_shards"},
    "data": {"breast-cancer": "breast_cancer", "synthetic-sentiment": "synthetic_sentiment",
             "wip-heldout": "wip_heldout"},
    "grad_transform": {"dp-flat": "dp_flat", "dp-zo": "dp_zo"},
    "parallel": {"2d": "zo_2d"},
}


@pytest.fixture
def hello_host(plugin_site, fresh_host):
    """The builtins plus the third-party fixture plugin (tests/fixtures/plait-hello), loaded by entry point."""
    source = (REPO / "tests" / "fixtures" / "plait-hello" / "plait_hello.py").read_text()
    plugin_site("hello", source, module="plait_hello")
    host = fresh_host()
    assert not host.failures and "hello" in host.plugins
    return host


def test_every_registered_name_is_snake_case(hello_host):
    names = [(k.section, e.name) for k in KINDS for e in hello_host.registries.by_kind[k.name].entries()]
    assert len(names) > 40 and ("data", "hello_data") in names
    bad = [(s, n) for s, n in names if not SNAKE.match(n)]
    assert not bad, f"entry names that are not snake_case: {bad}"


def test_the_pattern_itself():
    for good in ("sft", "hf_causal_lm", "zo_2d", "v2_sfmlearner", "zo2_shards", "if"):
        assert SNAKE.match(good), good
    for bad in ("hf-causal-lm", "2d", "Sft", "a__b", "a_", "_a", "dp flat", ""):
        assert not SNAKE.match(bad), bad


def test_every_rename_of_the_issue_is_declared(hello_host):
    for section, renames in RENAMED.items():
        registry = hello_host.registries.for_section(section)
        for old, new in renames.items():
            assert old not in registry and new in registry
            assert old in registry.get(new).renamed_from
            assert registry.renamed(old) == new
    assert hello_host.registries.datasets.renamed("hello-data") == "hello_data"


def test_each_former_name_gives_the_hint(hello_host):
    """Every declared former name, at every kind, validates to one line naming the new name."""
    seen = 0
    for kind in KINDS:
        registry = hello_host.registries.by_kind[kind.name]
        for entry in registry.entries():
            for old in entry.renamed_from:
                where = f"{kind.section}[0]" if kind.many else kind.section
                with pytest.raises(ConfigError) as info:
                    validate_section(kind.section, OmegaConf.create({"name": old}), hello_host.registries, where)
                msg = str(info.value)
                assert msg == f"{where}.name: {old!r} was renamed to {entry.name!r}; write {entry.name} instead"
                seen += 1
    assert seen >= sum(len(r) for r in RENAMED.values()) + 1


def test_unknown_names_still_list_what_is_available(hello_host):
    with pytest.raises(ConfigError, match=r"^model\.name: unknown model 'hf_causal'; available: .*hf_causal_lm"):
        validate_section("model", OmegaConf.create({"name": "hf_causal"}), hello_host.registries, "model")


@dataclass
class _Cfg:
    schedule: str = field(default="constant", metadata={"renamed_from": ("lr_schedule",)})
    lr: float = 1.0


def test_registry_keeps_former_names_for_the_hint_only():
    reg = Registry(KINDS_BY_NAME["datasets"])
    reg.register("new_data", dict, config=_Cfg, plugin="p", renamed_from=("old-data", "older"))
    assert reg.get("new_data").renamed_from == ("old-data", "older") and "renamed_from" not in reg.get("new_data").extra
    assert "old-data" not in reg and len(reg) == 1 and reg.renamed("older") == "new_data"
    with pytest.raises(ConfigError, match=r"^data\.name: 'old-data' was renamed to 'new_data'; write new_data"):
        reg.get("old-data")
    reg.register("old-data", dict, plugin="q")  # a former name taken again: the current entry wins
    assert reg.get("old-data").plugin == "q" and reg.renamed("old-data") is None
    with pytest.raises(PluginError, match="invalid renamed_from"):
        reg.register("x", dict, plugin="p", renamed_from=("x",))
    with pytest.raises(PluginError, match="invalid renamed_from"):
        reg.register("y", dict, plugin="p", renamed_from=(3,))


def test_renamed_option_keys():
    assert renamed_key(_Cfg, "lr_schedule") == "schedule"
    assert renamed_key(_Cfg, "schedule") is None and renamed_key(_Cfg, "nope") is None


def test_find_renamed_walks_sections_and_lists(hello_host):
    regs = hello_host.registries
    assert find_renamed({"model": {"name": "hf_causal_lm"}, "run": {"name": "hf-causal-lm"}}, regs) is None
    assert find_renamed({"grad_transform": [{"name": "sam"}, {"name": "dp-flat"}]}, regs) == \
        "grad_transform[1].name: 'dp-flat' was renamed to 'dp_flat'"
    assert find_renamed({"recipe": {"name": "grpo", "lr_warmup_steps": 3}}, regs) == \
        "recipe.lr_warmup_steps: 'lr_warmup_steps' was renamed to 'warmup_steps'"
    assert find_renamed({"model": {"name": "tabular_mlp", "n_classes": 2}}, regs) == \
        "model.n_classes: 'n_classes' was renamed to 'num_classes'"
