"""ASAM's perturbation and step, and the lr schedules, against closed forms written out here.

Convention checked (Kwon et al. 2021, arXiv 2102.11600, Algorithm 1): T_w = diag(|w| + η) over the *flat vector
of all trainable parameters* (biases included, unlike SamsungLabs/ASAM, which scales only tensors named
``weight``), one global norm ‖T_w g‖ over that vector (not one per tensor), e* = ρ T_w² g / ‖T_w g‖ — the
maximiser of gᵀe over the ellipsoid ‖T_w⁻¹ e‖ ≤ ρ, where the maximum is ρ‖T_w g‖ (Cauchy–Schwarz in T_w⁻¹e).
Elsewhere ASAM is only tested where it reduces to SAM (|w| = 1, η = 0).
"""
from __future__ import annotations

import math

import torch

from plait.plugins.sam_if.functional import perturbation
from plait.plugins.sam_if.sam import load_trajectory, lr_at, sam_step, train_sam

RHO, ETA = 0.05, 0.01


def _wg(p=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    # |w| spread over two decades so that T is far from a multiple of the identity
    w = torch.randn(p, generator=g, dtype=torch.float64) * torch.logspace(-2, 0.5, p, dtype=torch.float64)
    return w, torch.randn(p, generator=g, dtype=torch.float64)


def test_asam_perturbation_equals_closed_form():
    w, g = _wg()
    T = torch.diag(w.abs() + ETA)
    ref = RHO * T @ T @ g / torch.linalg.vector_norm(T @ g)
    got = perturbation(w, g, RHO, adaptive=True, eta=ETA)
    assert torch.allclose(got, ref, rtol=1e-12, atol=0)
    # η defaults to Kwon et al.'s 0.01
    assert torch.equal(perturbation(w, g, RHO, adaptive=True), got)
    # a different η is honoured (η enters T, not only a constant)
    T2 = torch.diag(w.abs() + 0.3)
    ref2 = RHO * T2 @ T2 @ g / torch.linalg.vector_norm(T2 @ g)
    assert torch.allclose(perturbation(w, g, RHO, adaptive=True, eta=0.3), ref2, rtol=1e-12, atol=0)


def test_asam_perturbation_maximises_gradient_on_the_ellipsoid():
    w, g = _wg(seed=1)
    t = w.abs() + ETA
    e_star = perturbation(w, g, RHO, adaptive=True, eta=ETA)
    # e* lies on the ellipsoid ‖T⁻¹e‖ = ρ and attains the Cauchy–Schwarz bound ρ‖Tg‖ (up to the eps = 1e-12
    # added to ‖Tg‖ in the denominator)
    assert abs(float(torch.linalg.vector_norm(e_star / t)) / RHO - 1) < 1e-10
    best = float(g @ e_star)
    assert abs(best / (RHO * float(torch.linalg.vector_norm(t * g))) - 1) < 1e-10
    # random points of the ellipsoid, e = T u with ‖u‖ = ρ, never do better; neither do small moves of e*
    u = torch.randn(4000, w.numel(), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    e = t * (RHO * u / u.norm(dim=1, keepdim=True))
    assert float((e @ g).max()) <= best
    u_star = e_star / t
    for s in (1e-1, 1e-3):
        v = u_star + s * RHO * u[:50] / u[:50].norm(dim=1, keepdim=True)
        e_near = t * (RHO * v / v.norm(dim=1, keepdim=True))
        assert float((e_near @ g).max()) <= best


def _tiny(seed=0):
    torch.manual_seed(seed)
    # two layers with biases: several tensors, so a per-tensor norm or skipping biases would differ
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.linspace(0.2, 3.0, p.numel(), dtype=torch.float64).view_as(p))
    return model


def _hand_asam(model, X, y, lr, steps):
    """w ← w − lr·∇L(w + e*), e* = ρ T² ∇L(w) / ‖T ∇L(w)‖, T = |w| + η over the flat parameter vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()

    def loss(v):
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(v, sizes), shapes)}
        return torch.nn.functional.cross_entropy(torch.func.functional_call(model, params, (X,)), y)

    def grad(v):
        v = v.detach().requires_grad_(True)
        return torch.autograd.grad(loss(v), v)[0]

    for _ in range(steps):
        g = grad(w)
        t = w.abs() + ETA
        e = RHO * t * t * g / torch.sqrt(((t * g) ** 2).sum())
        w = w - lr * grad(w + e)
    return w


def test_sam_step_adaptive_equals_hand_loop():
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(16, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    ref = _hand_asam(_tiny(), X, y, lr=0.2, steps=3)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(3):
        sam_step(model, lambda: torch.nn.functional.cross_entropy(model(X), y), opt, rho=RHO, adaptive=True,
                 eta=ETA)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-14)
    # and the step is not plain SAM's on this model (the test would not notice a missing adaptive branch otherwise)
    sam = _tiny()
    sam_step(sam, lambda: torch.nn.functional.cross_entropy(sam(X), y), torch.optim.SGD(sam.parameters(), lr=0.2),
             rho=RHO, adaptive=False)
    one = _hand_asam(_tiny(), X, y, lr=0.2, steps=1)
    assert float((torch.cat([p.detach().reshape(-1) for p in sam.parameters()]) - one).abs().max()) > 1e-6


def test_lr_schedules_mid_points_against_closed_form():
    lr, r, steps = 2.0, 0.1, 11
    # cosine at frac = k/(steps−1): lr·(r + (1−r)·½(1 + cos πk/(steps−1))); k = 5 is the half-way point (f = ½)
    assert abs(lr_at(5, steps, lr, "cosine", r) - 2.0 * (0.1 + 0.9 * 0.5)) < 1e-15
    # k = 2: cos(π/5) = (1 + √5)/4
    f = 0.5 * (1 + (1 + math.sqrt(5)) / 4)
    assert abs(lr_at(2, steps, lr, "cosine", r) - lr * (r + (1 - r) * f)) < 1e-15
    assert abs(lr_at(8, steps, lr, "cosine", r) - lr * (r + (1 - r) * (1 - f))) < 1e-15  # symmetric about ½
    # linear: lr·(r + (1−r)(1 − k/(steps−1)))
    assert abs(lr_at(2, steps, lr, "linear", r) - 2.0 * (0.1 + 0.9 * 0.8)) < 1e-15
    assert abs(lr_at(5, steps, lr, "linear", r) - 1.1) < 1e-15
    assert lr_at(3, steps, lr, "constant", r) == lr


def test_train_sam_applies_the_schedule(tmp_path):
    # the lr each recorded step actually used is the closed form (the schedule is wired into the trainer)
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    steps, lr, r = 7, 0.3, 0.2
    train_sam(_tiny(), X, y, rho=RHO, lr=lr, steps=steps, schedule="cosine", min_lr_ratio=r, record_dir=tmp_path)
    lrs = load_trajectory(tmp_path)["lrs"]
    ref = [lr * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * k / (steps - 1)))) for k in range(steps)]
    assert torch.allclose(lrs, torch.tensor(ref, dtype=torch.float64), rtol=1e-14, atol=0)
