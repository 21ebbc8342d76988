"""End-to-end: the depth and classify recipes run from configs through plait's runtime (short, tiny sizes)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.config import load_config
from plait.run import execute

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "capsule"
TINY_DEPTH = ["recipe.batch_size=2", "data.height=32", "data.width=48", "model.depth_width=8", "model.pose_width=8",
              "model.decoder_channels=[8,8,16,32]", "run.log_every=1", "run.progress=false"]
TINY_TUBE = ["data.train_sequences=1", "data.test_sequences=1", "data.num_frames=6", "data.blur_subframes=1"]
TINY_CLASSIFY = ["data.num_images=120", "data.min_per_class=3", "recipe.batch_size=8", "run.log_every=1",
                 "run.progress=false", "model.base_dims=[8,8,8]", "model.heads=[1,1,2]"]


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
    assert not any("|" in t for t in acc.Tags()["images"])  # TensorBoard tags: no '|'
    # images at the training step of their evaluation, like the eval scalars (not an eval counter 0, 1, …)
    assert [e.step for e in acc.Images("depth/pred")] == [e.step for e in acc.Scalars("eval/abs_rel")] == [0, 2]


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
    ("recipe.eval_snippet=7", "recipe.eval_snippet: 7 frames is longer than the test sequences of 6 frames; "
                              "allowed: 2 to 6"),
    ("data.train_sequences=0", "data 'capsule_tube': train_sequences must be >= 1"),
    ("data.test_sequences=0", "data 'capsule_tube': test_sequences must be >= 1"),
])
def test_depth_recipe_bad_input_is_one_line_exit_2(tmp_path, fresh_host, capsys, override, match):
    from plait.cli import main

    fresh_host()
    assert main(["run", str(CONFIGS / "depth_v2.yaml"), f"run.out_dir={tmp_path}", *TINY_TUBE, override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and match in err[-1]


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/")} for r in rows if "train/loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("config,overrides", [
    ("classify_pit.yaml", TINY_CLASSIFY + ["recipe.sampler=weighted", "recipe.augment=true"]),
    ("depth_v2.yaml", TINY_DEPTH + TINY_TUBE + ["recipe.lr_step=3"]),  # StepLR decays after step 3
])
def test_resume_from_step_2_repeats_steps_3_and_4(tmp_path, fresh_host, config, overrides):
    """The batches, augmentations, auto-mask noise and LR schedule after a resume are those of the
    uninterrupted run: its logged train metrics at steps 3-4 are the reference, compared exactly."""
    fresh_host()
    common = overrides + [f"run.out_dir={tmp_path}", "run.steps=4", "run.eval_every=0"]
    full = execute(load_config(CONFIGS / config, common + ["run.name=full", "run.ckpt_every=0"]))
    part = execute(load_config(CONFIGS / config, common + ["run.name=part", "run.steps=2", "run.ckpt_every=2"]))
    resumed = execute(load_config(CONFIGS / config, common + ["run.name=part", f"run.resume={part.dir}"]))
    assert resumed.dir == part.dir
    a, b = _train_rows(full.dir), _train_rows(part.dir)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(a[s] == b[s] for s in (3, 4)), {s: (a[s], b[s]) for s in (3, 4)}


def test_heldout_evaluation_does_not_change_training(tmp_path, fresh_host):
    """capsule_video has no ground truth, so evaluation runs the (auto-masked) loss on held-out frames; its
    noise must not come from the training generator, or run.eval_every would change the training losses."""
    from tests.plugins.capsule._files import write_video

    write_video(tmp_path / "video")
    fresh_host()
    data = f"data={{name: capsule_video, root: {tmp_path / 'video'}, height: 32, width: 48}}"
    common = TINY_DEPTH + ["data=null", data, f"run.out_dir={tmp_path}", "run.steps=2", "run.ckpt_every=0"]
    rows = []
    for every in (0, 1):  # 1: an extra evaluation between steps 1 and 2
        run = execute(load_config(CONFIGS / "depth_clean.yaml", common + [f"run.name=e{every}",
                                                                          f"run.eval_every={every}"]))
        rows.append(_train_rows(run.dir))
    assert rows[0] == rows[1] and len(rows[0]) == 2


def test_checkpoint_without_generator_and_scheduler_still_resumes(tmp_path, fresh_host, monkeypatch):
    """Checkpoints written before the generator and StepLR state were saved hold only model and optimizer."""
    from plait.plugins.capsule.depth_recipe import DepthRecipe

    fresh_host()
    common = TINY_DEPTH + TINY_TUBE + ["recipe.lr_step=3", f"run.out_dir={tmp_path}", "run.eval_every=0",
                                       "recipe.log_images=false"]
    new_format = DepthRecipe.state_dict
    monkeypatch.setattr(DepthRecipe, "state_dict",
                        lambda self: {k: v for k, v in new_format(self).items() if k in ("model", "optimizer")})
    part = execute(load_config(CONFIGS / "depth_v2.yaml", common + ["run.steps=2", "run.ckpt_every=2"]))
    monkeypatch.undo()
    resumed = execute(load_config(CONFIGS / "depth_v2.yaml", common + ["run.steps=4", f"run.resume={part.dir}"]))
    assert resumed.status == "completed" and sorted(_train_rows(part.dir)) == [1, 2, 3, 4]
