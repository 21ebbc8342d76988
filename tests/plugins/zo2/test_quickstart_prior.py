"""The quick start learns (issue 20): ZO2 on bundled:tiny-opt-sentiment lifts label-word accuracy.

The reference for "before" is the zero-shot eval the run itself measures at step 0 (and, independently,
scripts/build_prior_model.py's own evaluation recorded in build.json); nothing here is a copied accuracy.
"""
from __future__ import annotations

from pathlib import Path

from plait.config import load_config
from plait.run import execute

REPO = Path(__file__).resolve().parents[3]


def test_quickstart_shortened_gains_accuracy(tmp_path, fresh_host):
    # The quick start itself: same config and seed, 300 steps instead of 1000 (about 10 s on a quiet machine).
    fresh_host()
    run = execute(load_config(REPO / "configs" / "quickstart.yaml", [
        f"run.out_dir={tmp_path}", "run.progress=false", "run.steps=300", "run.eval_every=300",
        "run.ckpt_every=0"]))
    assert run.cfg.recipe.name == "zo" and run.cfg.offload.name == "zo2"
    assert run.cfg.offload.storage_dtype == "fp16" and run.cfg.model.path == "bundled:tiny-opt-sentiment"
    before, after = run.summary["first_eval"], run.summary["final_eval"]
    assert before["eval/accuracy"] <= 0.75  # the base has not learnt the task ...
    assert after["eval/accuracy"] >= before["eval/accuracy"] + 0.2  # ... ZO2 teaches it
    assert after["eval/loss"] < before["eval/loss"]
