"""Dataset checks: synthetic tube (determinism, IMU consistent with the pose), lesion proportions, metrics
against scikit-learn, and the real-data loaders on small files written in their layouts (incl. bad input)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score, f1_score, matthews_corrcoef

from plait.plugins.capsule.lesions import KVASIR_CAPSULE_COUNTS, _split, class_counts, make_lesions, make_red_lesions
from plait.plugins.capsule.metrics import ate, best_constant_abs_rel, classification_metrics, rotation_error_deg
from plait.plugins.capsule.real import load_image_folder, load_video_imu
from plait.plugins.capsule.tube import _log_rot, _rot, generate_split
from tests.plugins.capsule._files import write_png, write_video

SMALL = dict(num_sequences=1, num_frames=6, height=16, width=20, blur_subframes=1)


def test_tube_is_seeded_and_vibration_levels_differ():
    a = generate_split(vibration="high", seed=1, **SMALL)
    b = generate_split(vibration="high", seed=1, **SMALL)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.imu, b.imu)
    low = generate_split(vibration="low", seed=1, **{**SMALL, "num_frames": 30})
    high = generate_split(vibration="high", seed=1, **{**SMALL, "num_frames": 30})
    assert high.intensity.mean() > low.intensity.mean()
    assert a.imu.shape == (1, 5, 6, 10)
    with pytest.raises(ValueError, match="whole multiple"):
        generate_split(vibration="low", seed=0, imu_rate=95.0, **SMALL)


def test_imu_gyro_integrates_to_the_ground_truth_rotation():
    # smooth motion only: 100 Hz rectangle-rule integration cannot follow 8-30 Hz collision ringing
    s = generate_split(vibration="none", seed=2, **{**SMALL, "num_frames": 8})
    c2w = s.c2w.numpy()[0]
    errs, mags = [], []
    for i in range(7):
        rel = np.linalg.inv(c2w[i])[:3, :3] @ c2w[i + 1][:3, :3]  # R_i^T R_{i+1}
        gyro = s.imu[0, i, 3:].numpy().astype(np.float64)  # (3, T) rad/s, 100 Hz
        integrated = gyro.sum(1) / 100.0
        errs.append(np.linalg.norm(integrated - _log_rot(rel)))
        mags.append(np.linalg.norm(_log_rot(rel)))
    # bias + noise (σ 0.02 rad/s) and first-order integration leave a small residual
    assert np.mean(errs) < 0.2 * np.mean(mags)
    # a sign or frame error (world-frame rates, or R_{i+1} R_iᵀ) would not integrate to the body rotation


def test_lesion_counts_follow_kvasir_capsule_with_floor():
    counts = class_counts(1400, 10)
    assert counts.sum() >= 1400 and counts.min() == 10 and len(counts) == 14
    p = np.array(list(KVASIR_CAPSULE_COUNTS.values()), dtype=float)
    assert abs(counts[0] / counts.sum() - p[0] / p.sum()) < 0.02  # normal ≈ 72.7 %
    red = make_red_lesions(num_images=60, image_size=16, seed=0)
    y = torch.cat([red.train.y, red.test.y])
    assert abs(float(y.float().mean()) - 1 / 3) < 0.02


def test_classification_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))
    m = classification_metrics(y, pred, 5)
    assert m["accuracy"] == pytest.approx((y == pred).mean())
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(y, pred))


def test_ate_and_best_constant_against_brute_force():
    g = np.cumsum(np.random.default_rng(1).normal(size=(5, 3)), 0)
    assert ate(g, 2.5 * g) == pytest.approx(0.0, abs=1e-12)  # scale is aligned away
    p = g + np.random.default_rng(2).normal(size=(5, 3))
    scales = np.linspace(0, 3, 30001)
    gg, pp = g - g[0], p - p[0]
    brute = min(np.sqrt(((s * pp - gg) ** 2).sum()) / 5 for s in scales)
    assert ate(g, p) == pytest.approx(brute, rel=1e-4)
    gt = torch.rand(2, 6, 7) * 5 + 0.5
    valid = torch.ones_like(gt, dtype=torch.bool)
    brute_c = np.mean([min(float(((g_ - c).abs() / g_).mean()) for c in torch.linspace(0.5, 5.5, 5001))
                       for g_ in gt.flatten(1)])
    assert best_constant_abs_rel(gt, valid) == pytest.approx(brute_c, abs=1e-3)


def test_rotation_error_is_the_geodesic_angle():
    rng = np.random.default_rng(3)
    gt = np.tile(np.eye(4), (2, 5, 1, 1))
    gt[..., :3, :3] = _rot(rng.normal(0, 0.3, (2, 5, 3)))
    gt[..., :3, 3] = rng.normal(size=(2, 5, 3))
    angles = rng.uniform(0.01, 0.5, (2, 5))
    axes = rng.normal(size=(2, 5, 3))
    axes /= np.linalg.norm(axes, axis=-1, keepdims=True)
    pred = gt.copy()
    pred[..., :3, :3] = gt[..., :3, :3] @ _rot(axes * angles[..., None])  # perturb by a known angle
    pred[..., :3, 3] += 1.0  # translation does not enter
    assert rotation_error_deg(gt, pred) == pytest.approx(np.degrees(angles).mean(), rel=1e-6)
    assert rotation_error_deg(gt, gt) == pytest.approx(0.0, abs=1e-5)


def test_image_folder_loader_and_errors(tmp_path):
    for name, colour in [("angiectasia", (200, 10, 10)), ("normal", (180, 120, 100))]:
        (tmp_path / name).mkdir()
        for i in range(4):
            write_png(tmp_path / name / f"{i}.png", colour)
    data = load_image_folder(root=str(tmp_path), image_size=8, test_fraction=0.25)
    assert data.classes == ["angiectasia", "normal"] and data.train.x.shape[1:] == (3, 8, 8)
    assert len(data.train.y) + len(data.test.y) == 8 and set(data.test.y.tolist()) == {0, 1}
    assert torch.allclose(data.train.x[data.train.y == 0][0, :, 0, 0], torch.tensor([200, 10, 10]) / 255.0)
    (tmp_path / "normal" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png' is unreadable"):
        load_image_folder(root=str(tmp_path))
    (tmp_path / "normal" / "bad.png").unlink()
    (tmp_path / "polyp").mkdir()
    with pytest.raises(ValueError, match=r"class directory '.*polyp' holds no images"):
        load_image_folder(root=str(tmp_path))


def test_video_imu_loader_and_errors(tmp_path):
    write_video(tmp_path / "ok")
    d = load_video_imu(root=str(tmp_path / "ok"), height=16, width=20, imu_rate=100)
    assert d.imu_window == 10 and d.train.imu.shape[1:] == (2, 6, 10) and d.test.frames.shape[1] == 5
    assert torch.equal(d.train.imu[0, 1, 0], torch.arange(10, 20).float())  # acc x column of frames 1→2
    with pytest.raises(ValueError, match="sampled at 100 Hz but imu_rate is 200 Hz"):
        load_video_imu(root=str(tmp_path / "ok"), imu_rate=200)
    write_video(tmp_path / "gap", drop=35)
    with pytest.raises(ValueError, match="IMU window of frames 3-4 .* has 9 samples, expected 10"):
        load_video_imu(root=str(tmp_path / "gap"))
    write_video(tmp_path / "nok", intrinsics=False)
    with pytest.raises(FileNotFoundError, match="intrinsics"):
        load_video_imu(root=str(tmp_path / "nok"))


def test_split_with_single_image_classes_gives_empty_int64_test_split():
    x, y = np.zeros((3, 3, 2, 2), np.float32), np.array([0, 1, 2])
    train, test = _split(x, y, 0.5, np.random.default_rng(0))
    assert train.y.tolist() == [0, 1, 2] and test.x.shape == (0, 3, 2, 2) and test.y.dtype == torch.int64


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -1.0])
def test_test_fraction_outside_0_1_is_rejected_by_every_loader(tmp_path, fraction):
    match = f"test_fraction must be strictly between 0 and 1 .*got {fraction}"
    for load in (make_lesions, make_red_lesions):
        with pytest.raises(ValueError, match=match):
            load(num_images=30, image_size=8, test_fraction=fraction)
    with pytest.raises(ValueError, match=match):
        load_image_folder(root=str(tmp_path), test_fraction=fraction)
    with pytest.raises(ValueError, match=match):
        load_video_imu(root=str(tmp_path), test_fraction=fraction)


def test_image_folder_class_with_one_image_is_an_error(tmp_path):
    for name, n in [("a", 1), ("b", 3)]:
        (tmp_path / name).mkdir()
        for i in range(n):
            write_png(tmp_path / name / f"{i}.png", (10, 20, 30))
    with pytest.raises(ValueError, match=r"class directory '.*a' holds 1 image; need at least 2 \(one for training, "
                                         r"one for the test split\)"):
        load_image_folder(root=str(tmp_path), image_size=8)


@pytest.mark.parametrize("file,text,match", [
    ("imu.csv", "t,ax,ay,az,gx,gy,gz\n", r"imu\.csv' has 0 data row\(s\); need at least 2"),
    ("frames.csv", "t\n" + "0\n" * 8, r"frames\.csv' column t is 0 at line 3; timestamps must be finite seconds, "
                                      r"each later than the one before"),
    ("imu.csv", "t,ax,ay,az,gx,gy,gz\n" + "0.5,0,0,0,0,0,0\n" * 3, r"imu\.csv' column t is 0\.5 at line 3"),
    ("frames.csv", "t\n0\nnan\n" + "".join(f"{i / 10}\n" for i in range(2, 8)),
     r"frames\.csv' column t is nan at line 3"),
    ("intrinsics.json", '{"fx": "abc", "fy": 1, "cx": 0.5, "cy": 0.5}',
     r"intrinsics\.json' key fx must be a finite number, got 'abc'"),
    ("intrinsics.json", '{"fx": 1, "fy": 1, "cx": 0.5, "cy": 0.5, "max_depth": null}',
     r"intrinsics\.json' key max_depth must be a finite number, got None"),
    ("intrinsics.json", "{fx: 1", r"intrinsics\.json' is not valid JSON \(Expecting property name enclosed in double "
                                  r"quotes at line 1 column 2\); write \{\"fx\""),
    ("intrinsics.json", "[1, 2]", r"intrinsics\.json' must hold fx, fy, cx, cy \(normalised\); got a JSON list"),
])
def test_video_loader_bad_files_name_the_file_and_key(tmp_path, file, text, match):
    write_video(tmp_path)
    (tmp_path / file).write_text(text)
    with pytest.raises(ValueError, match=match):
        load_video_imu(root=str(tmp_path), height=16, width=20)
