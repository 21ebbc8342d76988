"""Synthetic capsule classification images: 14 Kvasir-Capsule classes (long-tailed) and binary red lesions.

Each image is procedural mucosa (sinusoid texture in a random orientation and illumination gradient) inside
the circular capsule field of view, plus a class-specific drawing (colour, shape, size and count differ per
class; ``difficulty`` shrinks lesions and lowers their contrast). Class frequencies follow Kvasir-Capsule's
labelled-frame counts with a floor, so "normal clean mucosa" is ~73% and majority-class accuracy is high
while balanced accuracy is 1/14. Everything is numpy, vectorised per image, seeded. ``flip_fraction`` replaces
that share of the *training* labels by another class (seeded, `flip_labels`); ``ImageData.flipped`` holds their
indices for scoring mislabel detection (the option's name follows the sam_if tabular datasets).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# Smedsrud et al., Sci. Data 2021: labelled frames per class
KVASIR_CAPSULE_COUNTS = {
    "normal_clean_mucosa": 34338, "ileocecal_valve": 4189, "reduced_mucosal_view": 2906, "pylorus": 1529,
    "angiectasia": 866, "ulcer": 854, "foreign_body": 776, "lymphangiectasia": 592, "erosion": 506,
    "blood_fresh": 446, "erythema": 159, "polyp": 55, "blood_hematin": 12, "ampulla_of_vater": 10,
}
CLASSES = list(KVASIR_CAPSULE_COUNTS)


@dataclass
class ImageSplit:
    x: torch.Tensor  # (N, 3, S, S) in [0, 1]
    y: torch.Tensor  # (N,) int64


@dataclass
class ImageData:
    train: ImageSplit
    test: ImageSplit
    classes: list[str]
    name: str
    flipped: torch.Tensor | None = None  # training indices whose label was flipped (``flip_fraction``), sorted
    clean_y: torch.Tensor | None = None  # the training labels before flipping

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return self.train.x.shape[-1]


def class_counts(total: int, floor: int) -> np.ndarray:
    """Kvasir-Capsule proportions scaled to ``total`` images with at least ``floor`` per class."""
    p = np.array(list(KVASIR_CAPSULE_COUNTS.values()), dtype=np.float64)
    counts = np.maximum(np.floor(p / p.sum() * total), floor).astype(int)
    counts[0] += max(total - counts.sum(), 0)
    return counts


def _blob(xx, yy, cx, cy, r, soft=0.3):
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
    return np.clip((1 - d) / soft, 0, 1)


def _mucosa(rng, s):
    yy, xx = np.mgrid[0:s, 0:s] / s
    a = rng.uniform(0, np.pi)
    u = np.cos(a) * xx + np.sin(a) * yy
    tex = sum(rng.uniform(0.02, 0.06) * np.sin(2 * np.pi * rng.uniform(2, 6) * (u if i % 2 else yy) + rng.uniform(0, 6))
              for i in range(4))
    grad = 0.85 + 0.25 * (np.cos(a) * (xx - 0.5) + np.sin(a) * (yy - 0.5))
    base = np.array([0.82, 0.52, 0.42]) * rng.uniform(0.9, 1.1, 3)
    img = base[:, None, None] * (grad + tex)[None]
    return img, xx, yy


def draw(cls: str, rng: np.random.Generator, s: int, difficulty: float) -> np.ndarray:
    """One (3, s, s) image of class ``cls``."""
    img, xx, yy = _mucosa(rng, s)
    size = 1.0 - 0.5 * difficulty
    con = 1.0 - 0.5 * difficulty
    cx, cy = rng.uniform(0.3, 0.7, 2)

    def paint(mask, colour, strength=1.0):
        nonlocal img
        m = np.clip(mask * strength * con, 0, 1)[None]
        img = img * (1 - m) + np.asarray(colour)[:, None, None] * m

    if cls == "angiectasia":
        for _ in range(rng.integers(1, 4)):
            paint(_blob(xx, yy, *rng.uniform(0.25, 0.75, 2), 0.05 * size), (0.85, 0.05, 0.1))
    elif cls == "blood_fresh":
        paint(_blob(xx, yy, cx, cy, 0.3 * size, 0.8), (0.75, 0.0, 0.05))
    elif cls == "blood_hematin":
        for _ in range(3):
            paint(_blob(xx, yy, *rng.uniform(0.25, 0.75, 2), 0.12 * size, 0.6), (0.25, 0.12, 0.05))
    elif cls == "erosion":
        paint(_blob(xx, yy, cx, cy, 0.12 * size), (0.9, 0.2, 0.2))
        paint(_blob(xx, yy, cx, cy, 0.06 * size), (0.95, 0.9, 0.85))
    elif cls == "ulcer":
        paint(_blob(xx, yy, cx, cy, 0.22 * size), (0.85, 0.25, 0.2))
        paint(_blob(xx, yy, cx, cy, 0.15 * size), (0.95, 0.9, 0.55))
    elif cls == "erythema":
        paint(np.ones_like(xx) * 0.5, (0.95, 0.15, 0.15))
    elif cls == "polyp":
        bump = _blob(xx, yy, cx, cy, 0.2 * size, 1.0)
        img = img * (1 + 0.5 * con * bump)[None]
        paint(_blob(xx, yy, cx - 0.05, cy - 0.05, 0.05 * size), (1.0, 1.0, 1.0))
    elif cls == "lymphangiectasia":
        for _ in range(rng.integers(5, 9)):
            paint(_blob(xx, yy, *rng.uniform(0.2, 0.8, 2), 0.04 * size), (0.98, 0.97, 0.9))
    elif cls == "foreign_body":
        mask = ((np.abs(xx - cx) < 0.25 * size) & (np.abs(yy - cy) < 0.06 * size)).astype(float)
        paint(mask, (0.4, 0.6, 0.3))
    elif cls in ("pylorus", "ileocecal_valve"):
        d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
        rings = 0.5 + 0.5 * np.cos(2 * np.pi * d * (6 if cls == "pylorus" else 12))
        img = img * (1 - 0.35 * con * rings * (d < 0.4))[None]
        paint(_blob(xx, yy, cx, cy, (0.1 if cls == "pylorus" else 0.05) * size + 0.03), (0.1, 0.03, 0.03))
    elif cls == "reduced_mucosal_view":
        turbid = np.clip(0.6 + 0.2 * np.sin(9 * xx + rng.uniform(0, 6)) * np.sin(7 * yy), 0, 1)
        paint(turbid, (0.75, 0.7, 0.35))
    elif cls == "ampulla_of_vater":
        paint(_blob(xx, yy, cx, cy, 0.1 * size, 0.8), (0.95, 0.6, 0.55))
        paint(_blob(xx, yy, cx, cy, 0.03 * size + 0.02), (0.3, 0.05, 0.05))
    elif cls != "normal_clean_mucosa":
        raise ValueError(f"unknown class {cls!r}")
    r = np.sqrt((xx - 0.5) ** 2 + (yy - 0.5) ** 2)
    img = img * (r < 0.5)[None]  # circular field of view
    img = np.rot90(img, rng.integers(4), axes=(1, 2))
    img = img + rng.normal(0, 0.02, img.shape)
    return np.clip(img, 0, 1)


def check_test_fraction(test_fraction: float) -> None:
    """A held-out share outside (0, 1) is an error: ``_split`` would silently round 0 up to one test image per
    class and 1 down to one training image per class."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be strictly between 0 and 1 (the share held out for evaluation), "
                         f"got {test_fraction}")


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, rng: np.random.Generator):
    """Stratified split; each class keeps at least one training and (if it has ≥ 2) one test image."""
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_te = min(max(int(round(len(idx) * test_fraction)), 1 if len(idx) > 1 else 0), len(idx) - 1)
        te += list(idx[:n_te])
        tr += list(idx[n_te:])
    tr, te = np.array(sorted(tr), dtype=np.int64), np.array(sorted(te), dtype=np.int64)  # may be empty
    t = lambda i: ImageSplit(torch.from_numpy(x[i]).float(), torch.from_numpy(y[i]).long())  # noqa: E731
    return t(tr), t(te)


def check_flip_fraction(flip_fraction: float) -> None:
    if not 0 <= flip_fraction < 1:
        raise ValueError(f"flip_fraction must be in [0, 1) (the share of training labels replaced by another "
                         f"class), got {flip_fraction}")


def flip_labels(data: ImageData, flip_fraction: float, seed: int) -> ImageData:
    """Replace round(``flip_fraction`` · n_train) training labels by a different class drawn uniformly (seeded by
    ``seed`` with its own generator, so the images and the split are those of the unflipped set); records the
    flipped indices (``data.flipped``, the ground truth of mislabel detection) and the clean labels. The test
    split keeps its true labels."""
    y = data.train.y
    data.clean_y, n, k = y.clone(), len(y), int(round(flip_fraction * len(y)))
    g = torch.Generator().manual_seed(int(seed) * 7919 + 104729)  # independent of the image generator
    data.flipped = torch.randperm(n, generator=g)[:k].sort().values
    if k:
        shift = torch.randint(1, data.num_classes, (k,), generator=g)
        y[data.flipped] = (y[data.flipped] + shift) % data.num_classes  # always a different class
    return data


def make_lesions(*, num_images: int = 1400, image_size: int = 32, min_per_class: int = 10, test_fraction: float = 0.3,
                 difficulty: float = 0.5, flip_fraction: float = 0.0, seed: int = 0) -> ImageData:
    check_test_fraction(test_fraction)
    check_flip_fraction(flip_fraction)
    counts = class_counts(num_images, min_per_class)
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(CLASSES)), counts)
    x = np.stack([draw(CLASSES[c], rng, image_size, difficulty) for c in y])
    train, test = _split(x, y, test_fraction, rng)
    return flip_labels(ImageData(train, test, list(CLASSES), "capsule_lesions"), flip_fraction, seed)


def make_red_lesions(*, num_images: int = 600, image_size: int = 32, test_fraction: float = 0.3,
                     difficulty: float = 0.5, flip_fraction: float = 0.0, seed: int = 0) -> ImageData:
    """Binary: 0 normal, 1 red lesion (angiectasia-like spots or fresh blood), lesion:normal ≈ 1:2."""
    check_test_fraction(test_fraction)
    check_flip_fraction(flip_fraction)
    rng = np.random.default_rng(seed)
    y = (np.arange(num_images) % 3 == 0).astype(int)
    x = np.stack([draw("normal_clean_mucosa" if c == 0 else ("angiectasia" if rng.random() < 0.6 else "blood_fresh"),
                       rng, image_size, difficulty) for c in y])
    train, test = _split(x, y, test_fraction, rng)
    return flip_labels(ImageData(train, test, ["normal", "red_lesion"], "capsule_red_lesions"), flip_fraction, seed)
