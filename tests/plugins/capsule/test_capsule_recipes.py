"""End-to-end: the depth and classify recipes run from configs through plait's runtime (short, tiny sizes)."""
from __future__ import annotations

import json

import pytest

from plait.config import load_config
from plait.run import execute

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "capsule"


@pytest.mark.slow
def test_depth_recipe_runs_and_logs_metrics_and_images(tmp_path, fresh_host):
    cfg = load_config(CONFIGS / "depth_v2.yaml", [
        f"run.out_dir={tmp_path}", "run.steps=2", "run.progress=false", "recipe.batch_size=2",
        "data.height=32", "data.width=48", "data.train_sequences=1", "data.test_sequences=1", "data.num_frames=6",
        "data.blur_subframes=1", "model.depth_width=8", "model.pose_width=8", "model.decoder_channels=[8,8,16,32]"])
    run = execute(cfg, fresh_host())
    assert run.status == "completed"
    final = json.loads((run.dir / "summary.json").read_text())["final_eval"]
    for key in ("eval/abs_rel", "eval/ate", "eval/ate_imu_shuffled", "eval/ate_zero_motion",
                "eval/ate_constant_velocity", "eval/abs_rel_best_constant", "eval/a1"):
        assert key in final
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.dir), size_guidance={"images": 0})
    acc.Reload()
    assert {"depth/pred", "depth/gt"} <= set(acc.Tags()["images"])


@pytest.mark.slow
def test_classify_recipe_runs_and_logs_confusion_matrix(tmp_path, fresh_host):
    cfg = load_config(CONFIGS / "classify_pit.yaml", [
        f"run.out_dir={tmp_path}", "run.steps=3", "run.progress=false", "data.num_images=200",
        "data.min_per_class=3", "recipe.batch_size=16"])
    run = execute(cfg, fresh_host())
    final = json.loads((run.dir / "summary.json").read_text())["final_eval"]
    assert {"eval/accuracy", "eval/balanced_accuracy", "eval/macro_f1", "eval/mcc",
            "eval/majority_accuracy"} <= set(final)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.dir), size_guidance={"images": 0})
    acc.Reload()
    assert "eval/confusion_matrix" in acc.Tags()["images"]


@pytest.mark.parametrize("override,match", [
    ("recipe.gyro_weight=-1.0", "recipe.gyro_weight: must be a loss weight >= 0, got -1.0"),
    ("recipe.smoothness=-0.1", "recipe.smoothness: must be a loss weight >= 0, got -0.1"),
    ("recipe.batch_size=0", "recipe: batch_size must be >= 1"),
])
def test_depth_recipe_bad_input_is_one_line_exit_2(tmp_path, fresh_host, capsys, override, match):
    from plait.cli import main

    fresh_host()
    assert main(["run", str(CONFIGS / "depth_v2.yaml"), f"run.out_dir={tmp_path}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and match in err[-1]
