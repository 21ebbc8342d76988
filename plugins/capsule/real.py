"""Loaders for real capsule data in plain file layouts (no download; see docs/capsule.md for the layouts).

* ``load_image_folder(root)``: ``root/<class>/<image>`` (Kvasir-Capsule's labelled-image layout); classes are
  the sorted sub-directory names; images are resized (bilinear) to ``image_size``. An unreadable image or an
  empty class directory is an error that names it.
* ``load_video_imu(root)``: ``root/frames/*.png`` (sorted by name), ``root/frames.csv`` (header ``t``: one
  timestamp per frame, seconds), ``root/imu.csv`` (header ``t,ax,ay,az,gx,gy,gz``), ``root/intrinsics.json``
  (normalised ``fx, fy, cx, cy``). The IMU rate must match ``imu_rate`` and every frame interval must hold
  ``imu_rate/fps`` samples. No ground truth: depth/pose metrics are skipped; the loss is still evaluated.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from .lesions import ImageData, _split, check_test_fraction
from .tube import TubeData, TubeSplit

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp"}


def _read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"image '{path}' is unreadable ({type(exc).__name__}); "
                         f"allowed: {', '.join(sorted(IMAGE_SUFFIXES))}") from None


def load_image_folder(*, root: str, image_size: int = 64, test_fraction: float = 0.3, seed: int = 0) -> ImageData:
    check_test_fraction(test_fraction)
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder '{base}' does not exist (expected root/<class>/<image>)")
    classes = sorted(p.name for p in base.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise ValueError(f"image folder '{base}' has {len(classes)} class directories; need at least 2")
    xs, ys = [], []
    for c, name in enumerate(classes):
        files = sorted(p for p in (base / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"class directory '{base / name}' holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if len(files) < 2:  # one image goes to training, leaving none for the test split
            raise ValueError(f"class directory '{base / name}' holds 1 image; need at least 2 (one for training, "
                             f"one for the test split)")
        for f in files:
            xs.append(_read_image(f, (image_size, image_size)))
            ys.append(c)
    train, test = _split(np.stack(xs), np.array(ys), test_fraction, np.random.default_rng(seed))
    return ImageData(train, test, classes, "capsule_image_folder")


def _read_csv(path: Path, columns: list[str]) -> np.ndarray:
    """The named columns as float64 (rows, columns). The first column, ``t``, must hold at least 2 finite,
    strictly increasing timestamps: the rates are 1 / median time step (a repeat would divide by zero)."""
    if not path.is_file():
        raise FileNotFoundError(f"'{path}' is missing (columns: {','.join(columns)})")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"'{path}' lacks column(s) {', '.join(missing)}; header must include {','.join(columns)}")
        try:
            table = np.array([[float(row[c]) for c in columns] for row in reader], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"'{path}' has a non-numeric value at line {reader.line_num}") from None
    if len(table) < 2:
        raise ValueError(f"'{path}' has {len(table)} data row(s); need at least 2 (one per sample, under the header)")
    t = table[:, 0]
    bad = ~np.isfinite(t) | np.r_[False, ~(np.diff(t) > 0)]
    if bad.any():
        row = int(bad.argmax())
        raise ValueError(f"'{path}' column t is {t[row]:g} at line {row + 2}; timestamps must be finite seconds, "
                         f"each later than the one before")
    return table


def _read_intrinsics(path: Path) -> dict[str, float]:
    """``fx, fy, cx, cy`` (normalised) and the optional ``min_depth``, ``max_depth``, checked to be numbers."""
    layout = '{"fx": …, "fy": …, "cx": …, "cy": …} normalised by image width/height'
    if not path.is_file():
        raise FileNotFoundError(f"camera intrinsics '{path}' are missing: write {layout}")
    try:
        k = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"'{path}' is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
                         f"write {layout}") from None
    if not isinstance(k, dict) or not all(key in k for key in ("fx", "fy", "cx", "cy")):
        got = f"keys {sorted(k)}" if isinstance(k, dict) else f"a JSON {type(k).__name__}"
        raise ValueError(f"'{path}' must hold fx, fy, cx, cy (normalised); got {got}")
    k = {"min_depth": 0.05, "max_depth": 8.0, **k}
    for key in ("fx", "fy", "cx", "cy", "min_depth", "max_depth"):
        v = k[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ValueError(f"'{path}' key {key} must be a finite number, got {v!r}")
    return {key: float(k[key]) for key in ("fx", "fy", "cx", "cy", "min_depth", "max_depth")}


def load_video_imu(*, root: str, height: int = 64, width: int = 80, imu_rate: float = 100.0,
                   test_fraction: float = 0.25) -> TubeData:
    check_test_fraction(test_fraction)
    base = Path(root)
    k = _read_intrinsics(base / "intrinsics.json")
    frames_dir = base / "frames"
    files = sorted(p for p in frames_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if frames_dir.is_dir() else []
    if len(files) < 5:
        raise ValueError(f"'{frames_dir}' must hold at least 5 frames, found {len(files)}")
    t_frames = _read_csv(base / "frames.csv", ["t"])[:, 0]
    if len(t_frames) != len(files):
        raise ValueError(f"'{base / 'frames.csv'}' has {len(t_frames)} timestamps for {len(files)} frames")
    imu = _read_csv(base / "imu.csv", ["t", "ax", "ay", "az", "gx", "gy", "gz"])
    dt = float(np.median(np.diff(imu[:, 0])))
    if abs(dt * imu_rate - 1) > 0.05:
        raise ValueError(f"'{base / 'imu.csv'}' is sampled at {1 / dt:.4g} Hz but imu_rate is {imu_rate:g} Hz")
    fps = 1 / float(np.median(np.diff(t_frames)))
    window = imu_rate / fps
    if abs(window - round(window)) > 0.05:
        raise ValueError(f"imu_rate ({imu_rate:g} Hz) is not a whole multiple of the frame rate ({fps:.4g} fps)")
    window = int(round(window))
    windows = []
    for i in range(len(files) - 1):
        sel = imu[(imu[:, 0] >= t_frames[i] - 1e-9) & (imu[:, 0] < t_frames[i + 1] - 1e-9), 1:]
        if len(sel) != window:
            raise ValueError(f"IMU window of frames {i}-{i + 1} ({t_frames[i]:g}-{t_frames[i + 1]:g} s) has "
                             f"{len(sel)} samples, expected {window} (imu_rate/fps)")
        windows.append(sel.T)
    frames = np.stack([_read_image(f, (height, width)) for f in files])
    n_test = max(int(round(len(files) * test_fraction)), 5)
    if len(files) - n_test < 3:
        raise ValueError(f"{len(files)} frames are too few for a train/test split with test_fraction {test_fraction}")
    cut = len(files) - n_test

    def split(lo: int, hi: int) -> TubeSplit:
        n = hi - lo
        return TubeSplit(frames=torch.from_numpy(frames[lo:hi])[None].float(), depth=None, valid=None,
                         c2w=None, imu=torch.from_numpy(np.stack(windows[lo:hi - 1]))[None].float(),
                         intensity=torch.zeros(1, n))

    k_norm = torch.tensor([[k["fx"], 0, k["cx"]], [0, k["fy"], k["cy"]], [0, 0, 1]], dtype=torch.float32)
    return TubeData(train=split(0, cut), test=split(cut, len(files)), k_norm=k_norm, fps=fps, imu_rate=imu_rate,
                    min_depth=k["min_depth"], max_depth=k["max_depth"],
                    name="capsule_video")
