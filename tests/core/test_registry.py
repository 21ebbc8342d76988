"""Registry names: one convention (snake_case) for every entry, and former names answered with a hint."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest

from plait.config import renamed_key
from plait.errors import ConfigError, PluginError
from plait.registry import KINDS_BY_NAME, Registry

SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def test_the_pattern_itself():
    for good in ("sft", "hf_causal_lm", "zo_2d", "v2_sfmlearner", "zo2_shards", "if"):
        assert SNAKE.match(good), good
    for bad in ("hf-causal-lm", "2d", "Sft", "a__b", "a_", "_a", "dp flat", ""):
        assert not SNAKE.match(bad), bad


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
