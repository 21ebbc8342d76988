"""Short-training acceptance checks of the capsule plugin (issue 8), run from the shipped configs.

Each check trains a tiny seeded model through ``plait.run.execute`` and compares it with an independent trivial
reference computed from the ground truth (best per-image constant depth, zero motion, constant velocity,
majority class) or with the ablation trained side by side. Sizes (32×48 frames, width-16 nets, 300 steps, 150
for the V2-vs-vision pair; a ~90k-parameter PiT) are chosen so the module fits about three and a half minutes
on an idle 2-core machine.
Measured figures are in docs/capsule.md.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from plait.config import load_config
from plait.plugins.capsule.metrics import classification_metrics
from plait.run import execute

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "capsule"
VIBRATION_STEPS = 150  # V2 vs vision-only on the high-vibration tube; the benchmark's 300-step figures are in the docs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _train(out: Path, config: str, overrides: list[str]) -> tuple[dict, dict]:
    cfg = load_config(CONFIGS / config, [f"run.out_dir={out}", "run.progress=false", "run.eval_every=0",
                                         "run.log_every=100", *overrides])
    run = execute(cfg)
    assert run.status == "completed"
    return run.summary["first_eval"], run.summary["final_eval"]


@pytest.fixture(scope="module")
def depth_run(tmp_path_factory):
    """configs/capsule/depth_clean.yaml as shipped: vision-only, vibration-free tube, 32×48, 300 steps."""
    return _train(tmp_path_factory.mktemp("depth"), "depth_clean.yaml", ["recipe.log_images=false"])


@pytest.mark.slow
def test_depth_abs_rel_beats_best_constant_by_20_percent(depth_run):
    first, final = depth_run
    best_constant = final["eval/abs_rel_best_constant"]
    # the untrained net is no better than a constant (median scaling of a flat map), so the gain is learnt
    assert first["eval/abs_rel"] > 0.9 * best_constant
    assert final["eval/abs_rel"] <= 0.8 * best_constant, (final["eval/abs_rel"], best_constant)


@pytest.mark.slow
def test_ate_beats_zero_motion_and_constant_velocity(depth_run):
    first, final = depth_run
    assert final["eval/ate"] < final["eval/ate_constant_velocity"] < final["eval/ate_zero_motion"]
    assert final["eval/ate"] < first["eval/ate"]


@pytest.fixture(scope="module")
def vibration_runs(tmp_path_factory):
    """configs/capsule/depth_v2.yaml (V2, gyro loss on) and its vision-only ablation, 150 steps: same seed, data,
    steps and initial vision weights, so the difference is the IMU alone."""
    out = tmp_path_factory.mktemp("vibration")
    common = ["recipe.log_images=false", f"run.steps={VIBRATION_STEPS}"]
    return {name: _train(out / name, "depth_v2.yaml", common + extra)[1]
            for name, extra in [("v2", []), ("vision", ["model.vibration=false"])]}


@pytest.mark.slow
def test_imu_fixes_rotation_on_the_high_vibration_split_and_shuffling_removes_it(vibration_runs):
    v2, vision = vibration_runs["v2"], vibration_runs["vision"]
    zero = v2["eval/rpe_rot_deg_zero_motion"]
    # the IMU path earns its keep at test time: V2's frame-to-frame rotation error is well below both the
    # vision-only model's and zero motion's ...
    assert v2["eval/rpe_rot_deg"] < 0.6 * min(vision["eval/rpe_rot_deg"], zero), (v2, vision)
    # ... and a shuffled IMU (another pair's gyro) makes it worse than assuming no rotation at all
    assert v2["eval/rpe_rot_deg_imu_shuffled"] > zero
    # the ATE check is NOT asserted: ATE is translation-only and barely sees rotation (docs/capsule.md)


@pytest.fixture(scope="module")
def classify_runs(tmp_path_factory):
    """configs/capsule/classify_pit.yaml as shipped (class-weighted CE) and with plain CE: same seed, data, steps."""
    out = tmp_path_factory.mktemp("classify")
    return {loss: _train(out / loss, "classify_pit.yaml", [f"recipe.loss={loss}"])[1]
            for loss in ("weighted_ce", "ce")}


@pytest.mark.slow
def test_pit_balanced_accuracy_beats_majority_class_widely(classify_runs):
    from plait.plugins.capsule.lesions import make_lesions

    cfg = load_config(CONFIGS / "classify_pit.yaml").data
    data = make_lesions(num_images=cfg.num_images, image_size=cfg.image_size, min_per_class=cfg.min_per_class,
                        difficulty=cfg.difficulty, seed=cfg.seed)
    y = data.test.y.numpy()
    majority = int(np.bincount(data.train.y.numpy()).argmax())
    reference = classification_metrics(y, np.full_like(y, majority), data.num_classes)["balanced_accuracy"]
    assert reference == pytest.approx(1 / data.num_classes)
    # "wide margin": at least twice the majority predictor's balanced accuracy (research note 2.5)
    assert classify_runs["weighted_ce"]["eval/balanced_accuracy"] >= 2 * reference


@pytest.mark.slow
def test_class_weighting_raises_balanced_accuracy_over_plain_ce(classify_runs):
    weighted, plain = classify_runs["weighted_ce"], classify_runs["ce"]
    # plain CE learns too (standardised inputs), mostly the frequent classes; weighting buys the rare ones
    assert weighted["eval/balanced_accuracy"] >= plain["eval/balanced_accuracy"] + 0.05
