"""The ``sam`` gradient transform (closure and forward replay, as the sft recipe drives it) vs sam_step;
registry entries of the sam_if plugin; datasets."""
from __future__ import annotations

import copy

import torch

from plait.plugins.sam_if.data import TabularMLP, load_tabular
from plait.plugins.sam_if.sam import SAMTransform, lr_at, sam_step


class WithLoss(torch.nn.Module):
    """A model whose forward returns an object with ``.loss`` (like an HF model given labels)."""

    def __init__(self):
        super().__init__()
        self.net = TabularMLP(10, 3, hidden=[6], seed=0)

    def forward(self, x, labels):
        logits = self.net(x)
        return type("Out", (), {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits})()


def _batch(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 10, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _reference(model, batches, adaptive):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches:
        sam_step(model, lambda: model(x, labels=y).loss, opt, rho=0.1, adaptive=adaptive)
    return [p.detach().clone() for p in model.parameters()]


def _sft_like(model, gt, batches, grad_accum=1, use_closure=False):
    """What plait's sft recipe does: prepare, before_backward, forward/backward, gt(model, step), step."""
    model = gt.prepare(model, dataset_size=100, batch_size=12, steps=len(batches), seed=0, grad_accum=grad_accum)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(batches, 1):
        gt.before_backward(step)
        parts = list(zip(x.chunk(grad_accum), y.chunk(grad_accum)))
        if use_closure:
            gt.set_loss_closure(lambda: sum(model(a, labels=b).loss / grad_accum for a, b in parts))
        for a, b in parts:
            (model(a, labels=b).loss / grad_accum).backward()
        metrics = gt(model, step)
        assert metrics["sam/perturbation_norm"] > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in model.parameters()]


def test_transform_with_closure_and_with_forward_replay_equals_sam_step():
    batches = [_batch(s) for s in range(3)]
    for adaptive in (False, True):
        ref = _reference(WithLoss(), batches, adaptive)
        for use_closure in (False, True):
            got = _sft_like(WithLoss(), SAMTransform(rho=0.1, adaptive=adaptive), batches, use_closure=use_closure)
            for a, b in zip(got, ref):
                assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_forward_replay_with_gradient_accumulation():
    # grad_accum=2 over equal halves: the mean of the two half losses is the full-batch loss
    batches = [_batch(s) for s in range(2)]
    ref = _reference(WithLoss(), batches, False)
    got = _sft_like(WithLoss(), SAMTransform(rho=0.1), batches, grad_accum=2)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_transform_without_closure_or_forward_raises():
    import pytest

    model = WithLoss()
    gt = SAMTransform(rho=0.1, replay_forward=False)
    gt.prepare(model)
    x, y = _batch()
    model(x, labels=y).loss.backward()
    with pytest.raises(RuntimeError, match="loss closure"):
        gt(model, 1)
    # the weights were restored
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_lr_schedule():
    assert lr_at(0, 10, 1.0, "cosine") == 1.0 and abs(lr_at(9, 10, 1.0, "cosine", 0.1) - 0.1) < 1e-12
    assert lr_at(5, 10, 2.0) == 2.0


def test_datasets_flip_labels_with_seed():
    a = load_tabular("digits", n_train=200, n_test=50, flip_fraction=0.1, seed=3)
    b = load_tabular("digits", n_train=200, n_test=50, flip_fraction=0.1, seed=3)
    assert len(a.flipped) == 20 and torch.equal(a.flipped, b.flipped) and torch.equal(a.train.X, b.train.X)
    assert (a.train.y[a.flipped] != a.clean_y[a.flipped]).all()
    keep = ~a.flip_mask
    assert torch.equal(a.train.y[keep], a.clean_y[keep])
    c = load_tabular("breast_cancer", flip_fraction=0.0)
    assert c.n_features == 30 and c.n_classes == 2 and len(c.train) + len(c.test) == 569
    assert c.train.X.dtype == torch.float64 and abs(float(c.train.X.mean())) < 1e-10
    rows = a.examples("train")
    assert len(rows) == 200 and sum(r["flipped"] for r in rows) == 20


def test_registry_entries_build(fresh_host):
    host = fresh_host()
    host.check_healthy()
    reg = host.registries
    gt = reg.grad_transforms.get("sam")
    assert isinstance(gt.factory(**vars(gt.config())), SAMTransform)
    for name in ("if", "sam_hessian", "tracin", "sam_trajectory"):
        entry = reg.influence_estimators.get(name)
        est = entry.factory(**vars(entry.config()))
        assert hasattr(est, "scores") and hasattr(est, "self_influence"), name
    assert reg.influence_estimators.get("sam_trajectory").factory().coupling
    data = reg.datasets.get("breast_cancer").factory(**vars(reg.datasets.get("breast_cancer").config()))
    fam = reg.model_families.get("tabular_mlp")
    model = fam.factory(**{**vars(fam.config()), "num_features": 30, "num_classes": 2})
    assert model(data.train.X).shape == (len(data.train), 2)
    assert copy.deepcopy(model) is not None
