"""Bundled sklearn tabular datasets (no download) with optional label flips, as float tensors.

``digits``: 1,797 8×8 images, 64 features, 10 classes; ``breast_cancer``: 569 × 30, 2 classes. Features are
standardised with the training split's statistics. ``flip_fraction`` of the training labels are replaced by a
different class chosen at random (seeded); ``flipped`` holds their indices (the ground truth of mislabel
detection).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass
class Split:
    X: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.X.shape[0]

    def subset(self, idx) -> Split:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.X[idx], self.y[idx])


class TabularData:
    """``train`` / ``test`` `Split`s, ``flipped`` (LongTensor), ``clean_y`` (labels before flipping)."""

    def __init__(self, name: str, train: Split, test: Split, flipped: torch.Tensor, clean_y: torch.Tensor,
                 n_classes: int):
        self.name, self.train, self.test = name, train, test
        self.flipped, self.clean_y, self.n_classes = flipped, clean_y, n_classes

    @property
    def n_features(self) -> int:
        return self.train.X.shape[1]

    @property
    def flip_mask(self) -> torch.Tensor:
        mask = torch.zeros(len(self.train), dtype=torch.bool)
        mask[self.flipped] = True
        return mask

    def examples(self, split: str) -> list[dict]:
        """The `plait.protocols.Dataset` view: ``train`` / ``eval`` rows as dicts."""
        s = self.train if split == "train" else self.test
        flips = self.flip_mask if split == "train" else torch.zeros(len(s), dtype=torch.bool)
        return [{"x": s.X[i].tolist(), "label": int(s.y[i]), "flipped": bool(flips[i])} for i in range(len(s))]


def load_tabular(name: str, n_train: int | None = None, n_test: int | None = None, flip_fraction: float = 0.0,
                 seed: int = 0, standardize: bool = True, dtype: str = "float64") -> TabularData:
    """Load ``digits`` or ``breast_cancer``, shuffle with ``seed``, split, standardise, flip labels."""
    from sklearn import datasets  # lazy: only the sam_if plugin needs scikit-learn

    loaders = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}
    if name not in loaders:
        raise ValueError(f"unknown tabular dataset {name!r}; available: {', '.join(loaders)}")
    if not 0.0 <= flip_fraction < 1.0:
        raise ValueError(f"flip_fraction must be in [0, 1), got {flip_fraction}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    bunch = loaders[name]()
    X = torch.as_tensor(bunch.data, dtype=torch.float64)
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    n_classes = int(y.max()) + 1
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=g)
    X, y = X[perm], y[perm]
    n_train = n_train or int(0.7 * X.shape[0])
    n_test = n_test or X.shape[0] - n_train
    if n_train + n_test > X.shape[0]:
        raise ValueError(f"{name} has {X.shape[0]} rows; n_train + n_test = {n_train + n_test}")
    Xtr, ytr = X[:n_train], y[:n_train].clone()
    Xte, yte = X[n_train:n_train + n_test], y[n_train:n_train + n_test]
    if standardize:
        mu, sd = Xtr.mean(0), Xtr.std(0)
        sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
        Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    clean = ytr.clone()
    k = int(round(flip_fraction * n_train))
    flipped = torch.randperm(n_train, generator=g)[:k].sort().values
    if k:
        shift = torch.randint(1, n_classes, (k,), generator=g)
        ytr[flipped] = (ytr[flipped] + shift) % n_classes  # always a different class
    dt = _DTYPES[dtype]
    return TabularData(name, Split(Xtr.to(dt), ytr), Split(Xte.to(dt), yte), flipped, clean, n_classes)


def build_digits(**kw) -> TabularData:
    return load_tabular("digits", **kw)


def build_breast_cancer(**kw) -> TabularData:
    return load_tabular("breast_cancer", **kw)


class TabularMLP(torch.nn.Sequential):
    """Logistic regression (``hidden=[]``) or a tanh MLP over tabular features, returning logits."""

    def __init__(self, n_features: int, n_classes: int, hidden: list[int] | tuple[int, ...] = (),
                 dtype: str = "float64", seed: int = 0):
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        d = n_features
        for h in hidden:
            layers += [torch.nn.Linear(d, h), torch.nn.Tanh()]
            d = h
        layers.append(torch.nn.Linear(d, n_classes))
        super().__init__(*layers)
        self.to(_DTYPES[dtype])


def build_tabular_mlp(num_features: int = 64, num_classes: int = 10, hidden: list[int] | None = None,
                      dtype: str = "float64", seed: int = 0, **_runtime) -> TabularMLP:
    return TabularMLP(num_features, num_classes, tuple(hidden or ()), dtype, seed)
