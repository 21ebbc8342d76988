"""Tiny on-disk capsule datasets shared by the capsule tests (not a test module: no ``test_`` prefix)."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image


def write_png(path, colour, size=(12, 10)):
    """A one-colour RGB PNG of ``size`` (width, height)."""
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(path)


def write_video(root, n=8, fps=10, rate=100, drop=None, intrinsics=True):
    """A ``capsule_video`` folder: ``n`` 20×16 frames at ``fps``, an IMU log at ``rate`` Hz (sample ``drop``
    left out, for a gap) and, with ``intrinsics``, the camera intrinsics."""
    (root / "frames").mkdir(parents=True)
    for i in range(n):
        write_png(root / "frames" / f"{i:04d}.png", (10 * i, 100, 100), size=(20, 16))
    (root / "frames.csv").write_text("t\n" + "".join(f"{i / fps}\n" for i in range(n)))
    rows = [f"{j / rate},{j},0,0,0,0,{j % 3}\n" for j in range(int((n - 1) * rate / fps) + 1) if j != drop]
    (root / "imu.csv").write_text("t,ax,ay,az,gx,gy,gz\n" + "".join(rows))
    if intrinsics:
        (root / "intrinsics.json").write_text(json.dumps({"fx": 0.8, "fy": 1.0, "cx": 0.5, "cy": 0.5}))
