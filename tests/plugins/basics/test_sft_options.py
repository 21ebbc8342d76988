"""sft's numeric options: a negative value where 0 means "off" or "all" is refused, not silently reinterpreted
(``eval_examples=-1`` as the slice ``[:-1]``, a negative warm-up skewing the cosine schedule, …)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from plait.cli import main
from plait.errors import ConfigError
from plait.plugins.basics.parts import load_text_splits
from plait.plugins.basics.tokenizer import load_tokenizer

SFT = Path(__file__).resolve().parents[3] / "configs" / "basics" / "sft_quickstart.yaml"


@pytest.mark.parametrize("override,line", [
    ("recipe.eval_examples=-1", "error: recipe.eval_examples: must be 0 (the whole eval split) or more, got -1"),
    ("recipe.warmup_steps=-5", "error: recipe.warmup_steps: must be 0 or more, got -5"),
    ("recipe.max_grad_norm=-1", "error: recipe.max_grad_norm: must be 0 or more, got -1.0"),
    ("recipe.weight_decay=-0.1", "error: recipe.weight_decay: must be 0 or more, got -0.1"),
    ("recipe.momentum=-0.5", "error: recipe.momentum: must be 0 or more, got -0.5"),
])
def test_negative_option_is_one_line_exit_2(tmp_path, fresh_host, capsys, override, line):
    fresh_host()
    code = main(["run", str(SFT), f"run.out_dir={tmp_path / 'runs'}", "run.steps=2", "run.progress=false",
                 "data.n_train=8", "data.n_eval=4", override])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == line
    assert not list((tmp_path / "runs").glob("*/*"))  # nothing left behind


class _Rows:
    label_words = None

    def __init__(self, n: int):
        self.rows = [{"prompt": f"p{i}:", "completion": f" c{i}"} for i in range(n)]

    def examples(self, split: str) -> list[dict]:
        return list(self.rows)


@pytest.mark.parametrize("limit,kept", [(0, 5), (3, 3), (9, 5)])
def test_eval_limit_keeps_the_first_n_or_all(limit, kept):
    data = _Rows(5)
    splits = load_text_splits(SimpleNamespace(build=lambda section: data), load_tokenizer(), 16, limit)
    assert splits.eval_examples == data.rows[:kept] and len(splits.eval_items) == kept


def test_negative_eval_limit_is_refused_for_every_recipe_that_loads_text():
    # the zo recipe passes its recipe.eval_examples through the same function
    with pytest.raises(ConfigError, match=r"^recipe\.eval_examples: must be 0 .* got -1$"):
        load_text_splits(SimpleNamespace(build=lambda section: _Rows(5)), load_tokenizer(), 16, -1)
