"""Recipe wip_recover through `plait run` on the bundled LM (model wip_lm, data wip_heldout)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.config import load_config
from plait.run import execute

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "wip" / "recover.yaml"
SMALL = ["recipe.calib_blocks=2", "recipe.eval_blocks=2", "recipe.finetune_steps=0", "run.progress=false"]


def test_recover_config_runs_and_the_exact_operator_keeps_perplexity(tmp_path, fresh_host):
    fresh_host()
    run = execute(load_config(CONFIG, [f"run.out_dir={tmp_path}", "recipe.operators=[exact,minprod]", *SMALL]))
    result = json.loads((run.dir / "wip_results.json").read_text())
    base = result["original"]["ppl"]
    # independent reference: the original model's perplexity; the exact operator is the same computation
    assert result["operators"]["exact"]["ppl_swap"] == pytest.approx(base, rel=1e-6)
    assert result["operators"]["minprod"]["ppl_swap"] > base * 1.01  # a real swap changes the model
    assert result["operators"]["minprod"]["qk_multiplications"] == 0
    assert run.summary["final_eval"]["eval/ppl_original"] == pytest.approx(base)


@pytest.mark.parametrize("override,match", [
    ("recipe.operators=[nope]", "recipe.operators"),
    ("recipe.calib_blocks=100000", "recipe.calib_blocks"),
    ("recipe.precision=int8", "recipe.precision"),  # checked before any work is done, not after the fine-tune
    ("recipe.lr=-1", "recipe.lr"),
])
def test_recover_bad_input_is_one_line_exit_2(tmp_path, fresh_host, capsys, override, match):
    fresh_host()
    assert main(["run", str(CONFIG), f"run.out_dir={tmp_path}", *SMALL, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # transformers may draw a loading bar before it
    assert err[-1].startswith("error: ") and match in err[-1]


def test_recover_reports_its_silent_phases_unless_progress_is_off(tmp_path, fresh_host, capfd):
    """Calibration and perplexity passes have no bar: each phase is announced on stderr, in run order; with
    run.progress=false nothing of it is printed."""
    fresh_host()
    small = [f"run.out_dir={tmp_path}", "recipe.operators=[minprod]", *SMALL[:3]]
    capfd.readouterr()
    execute(load_config(CONFIG, [*small, "run.progress=true"]))
    lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("plait: wip_recover [")]
    phases = [l.split("] ", 1)[1].rstrip(" …") for l in lines]
    assert phases == ["original: perplexity on 2 eval blocks", "minprod: perplexity after the swap",
                      "minprod: closed-form calibration on 2 blocks", "minprod: perplexity after calibration",
                      "minprod: perplexity after fine-tuning"]
    execute(load_config(CONFIG, [*small, "run.progress=false"]))
    assert "plait: wip_recover [" not in capfd.readouterr().err
