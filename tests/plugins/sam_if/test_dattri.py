"""Plain IF and TracIn against dattri 0.3.0 (an independent implementation) on the same model and data.

dattri writes its scores into float32 buffers, hence the 1e-6 tolerances. Skipped when dattri is not installed.
"""
from __future__ import annotations

import pytest
import torch

dattri = pytest.importorskip("dattri")

from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from plait.plugins.sam_if.data import TabularMLP, load_tabular  # noqa: E402
from plait.plugins.sam_if.influence import IFEstimator, TrajectoryEstimator  # noqa: E402
from plait.plugins.sam_if.sam import load_trajectory, train_sam  # noqa: E402


@pytest.fixture(scope="module")
def small():
    d = load_tabular("breast_cancer", n_train=40, n_test=10, seed=1)
    d.train.X, d.test.X = d.train.X[:, :10].contiguous(), d.test.X[:, :10].contiguous()
    return d


def _task(model, checkpoints):
    from dattri.task import AttributionTask

    def loss_func(params, data):  # mean cross-entropy of a batch; L2 enters dattri's IF as `regularization`
        x, y = data
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, x), y)

    return AttributionTask(loss_func=loss_func, model=model, checkpoints=checkpoints)


def _loader(split, batch_size):
    return DataLoader(TensorDataset(split.X, split.y), batch_size=batch_size)


def _rel(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.slow
def test_plain_if_matches_dattri_explicit(small):
    from dattri.algorithm.influence_function import IFAttributorExplicit

    l2 = 0.05
    model = TabularMLP(10, 2, hidden=[4], seed=1)  # 54 parameters, non-convex
    train_sam(model, small.train.X, small.train.y, rho=0.05, l2=l2, lr=0.5, steps=100)
    att = IFAttributorExplicit(_task(model, model.state_dict()), regularization=l2)  # H_CE + l2·I = our H
    att.cache(_loader(small.train, len(small.train)))  # one batch: dattri sums H_b⁻¹v over cached batches
    got = att.attribute(_loader(small.train, 20), _loader(small.test, 10))  # one Hessian per batch pair
    ours = IFEstimator(l2=l2).scores(model, small.train, small.test)
    print(f"\nIF vs dattri IFAttributorExplicit: rel err {_rel(ours, got):.2e}")
    assert _rel(ours, got) < 1e-6  # same sign convention: score > 0 = proponent


def test_tracin_matches_dattri(small, tmp_path):
    from dattri.algorithm.tracin import TracInAttributor

    model = TabularMLP(10, 2, seed=2)
    train_sam(model, small.train.X, small.train.y, rho=0.05, l2=0.01, lr=0.3, steps=8, batch_size=16,
              schedule="linear", min_lr_ratio=0.1, seed=4, record_dir=tmp_path / "traj")
    tr = load_trajectory(tmp_path / "traj")
    fm_names = [n for n, _ in model.named_parameters()]
    ckpts = []
    for w in tr["weights"]:
        chunks = torch.split(w, [p.numel() for p in model.parameters()])
        ckpts.append({n: c.view_as(p) for n, c, p in zip(fm_names, chunks, model.parameters())})
    att = TracInAttributor(_task(model, ckpts), weight_list=tr["lrs"].float(), normalized_grad=False)
    att.projector_kwargs = None  # dattri projects to 512 random dims by default; compare exact gradients
    got = att.attribute(_loader(small.train, 8), _loader(small.test, 5))
    # dattri takes train and test gradients at the same checkpoint: our ``perturbed=False`` variant
    ours = TrajectoryEstimator(trajectory=str(tmp_path / "traj"), perturbed=False).scores(model, small.train,
                                                                                         small.test)
    print(f"\nTracIn vs dattri TracInAttributor: rel err {_rel(ours, got):.2e}")
    assert _rel(ours, got) < 1e-6
    self_got = att.self_attribute(_loader(small.train, 8))
    self_ours = TrajectoryEstimator(trajectory=str(tmp_path / "traj"), perturbed=False).self_influence(
        model, small.train)
    assert _rel(self_ours, self_got) < 1e-6
