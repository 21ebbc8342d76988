"""Each WiP similarity operator against its definition written out independently (loops, struct, math)."""
from __future__ import annotations

import math
import struct

import pytest
import torch

from plait.plugins.wip.operators import MIXERS, OPERATORS, get_operator, mitchell_product, mix, pot_quantize


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def loop_sim(q, k, pair):
    """[Tq, D] x [Tk, D] -> [Tq, Tk] with a Python loop over every pair and dimension."""
    out = torch.zeros(q.shape[0], k.shape[0], dtype=torch.float64)
    for i in range(q.shape[0]):
        for j in range(k.shape[0]):
            out[i, j] = sum(pair(float(a), float(b)) for a, b in zip(q[i], k[j]))
    return out


def pot_scalar(x: float) -> float:
    return 0.0 if x == 0 else math.copysign(2.0 ** round(math.log2(abs(x))), x)


def mitchell_scalar(x: float, y: float) -> float:
    """Mitchell's product from the IEEE-754 single bit patterns, via struct."""
    if x == 0 or y == 0:
        return 0.0
    bx = struct.unpack("<i", struct.pack("<f", abs(x)))[0]
    by = struct.unpack("<i", struct.pack("<f", abs(y)))[0]
    mag = struct.unpack("<f", struct.pack("<i", bx + by - 0x3F800000))[0]
    return -mag if (x < 0) != (y < 0) else mag


DEFINITIONS = {
    "exact": lambda a, b: a * b,
    "l1": lambda a, b: -abs(a - b),
    "minprod": lambda a, b: math.copysign(1.0, a * b) * min(abs(a), abs(b)) if a * b != 0 else 0.0,
    "pot": lambda a, b: pot_scalar(a) * b,
    "mitchell": mitchell_scalar,
}


def test_every_operator_has_a_definition_test():
    assert set(DEFINITIONS) == set(OPERATORS)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_equals_its_definition(name):
    q, k = rand(5, 7, seed=1), rand(6, 7, seed=2)
    if name == "mitchell":  # defined on float32 bit patterns
        q, k = q.float(), k.float()
    got = get_operator(name).sim(q, k).double()
    want = loop_sim(q, k, DEFINITIONS[name])
    tol = 1e-5 if name == "mitchell" else 1e-10
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_broadcasts_over_batch_and_heads(name):
    q, k = rand(2, 3, 4, 8, seed=3).float(), rand(2, 3, 5, 8, seed=4).float()
    op = get_operator(name)
    got = op.sim(q, k)
    assert got.shape == (2, 3, 4, 5)
    for b in range(2):
        for h in range(3):
            torch.testing.assert_close(got[b, h], op.sim(q[b, h], k[b, h]), rtol=1e-5, atol=1e-5)


def test_min_product_identity_on_random_tensors():
    q, k = rand(64, 16, seed=5), rand(64, 16, seed=6)
    half_l1 = 0.5 * ((q + k).abs() - (q - k).abs()).sum(-1)
    sign_min = (torch.sign(q * k) * torch.minimum(q.abs(), k.abs())).sum(-1)
    torch.testing.assert_close(half_l1, sign_min, rtol=1e-12, atol=1e-12)
    # and the operator (computed through the identity with cdist) matches the sign·min form row by row
    torch.testing.assert_close(get_operator("minprod").sim(q, k).diagonal(), sign_min, rtol=1e-10, atol=1e-10)


def test_min_product_identity_exhaustively_on_small_integers():
    vals = torch.arange(-4, 5, dtype=torch.float64)
    a, b = torch.meshgrid(vals, vals, indexing="ij")
    assert torch.equal(0.5 * ((a + b).abs() - (a - b).abs()), torch.sign(a * b) * torch.minimum(a.abs(), b.abs()))


def test_l1_differs_from_half_minprod_by_the_norms():
    """−‖q−k‖₁ = 2·Σ [q_d k_d > 0]·min(|q_d|,|k_d|) − ‖q‖₁ − ‖k‖₁ (why AdderNet needs a key-norm bias)."""
    q, k = rand(9, 12, seed=7), rand(11, 12, seed=8)
    same = ((q[:, None] * k[None]) > 0).double()
    pos = (same * torch.minimum(q[:, None].abs(), k[None].abs())).sum(-1)
    want = 2 * pos - q.abs().sum(-1)[:, None] - k.abs().sum(-1)[None]
    torch.testing.assert_close(get_operator("l1").sim(q, k), want, rtol=1e-10, atol=1e-10)


def test_mitchell_relative_error_is_within_its_bound():
    x, y = rand(20000, seed=9).float(), rand(20000, seed=10).float()
    rel = (mitchell_product(x, y).double() - x.double() * y.double()) / (x.double() * y.double())
    assert rel.max() <= 1e-6 and rel.min() >= -1 / 9 - 1e-6
    assert rel.min() < -0.10  # the bound is attained, not vacuous
    assert torch.equal(mitchell_product(torch.tensor([0.0, 2.0, -4.0]), torch.tensor([3.0, 0.5, 0.25])),
                       torch.tensor([0.0, 1.0, -1.0]))  # exact for powers of two


def test_pot_quantize_returns_powers_of_two_nearest_in_log_domain():
    x = rand(1000, seed=11)
    got = pot_quantize(x)
    assert torch.equal(got, torch.tensor([pot_scalar(float(v)) for v in x], dtype=x.dtype))
    assert torch.equal(pot_quantize(torch.zeros(3)), torch.zeros(3))


@pytest.mark.parametrize("name", ["pot", "mitchell"])
def test_quantised_operators_use_straight_through_gradients(name):
    """Rounded operands pass the gradient straight through: mitchell gets q·k's gradient for both inputs;
    pot (linear in k) gets it for q and the true gradient pot(q)ᵀ·g for k."""
    q, k = rand(4, 6, seed=12).requires_grad_(), rand(5, 6, seed=13).requires_grad_()
    g = rand(4, 5, seed=14)
    gq, gk = torch.autograd.grad((get_operator(name).sim(q, k) * g).sum(), (q, k))
    torch.testing.assert_close(gq, g @ k.detach())
    q_used = pot_quantize(q.detach()) if name == "pot" else q.detach()
    torch.testing.assert_close(gk, g.T @ q_used)


@pytest.mark.parametrize("name", ["l1", "minprod"])
def test_distance_operators_have_the_gradient_of_their_definition(name):
    q, k = rand(3, 5, seed=15).requires_grad_(), rand(4, 5, seed=16).requires_grad_()
    if name == "l1":
        ref = -(q[:, None] - k[None]).abs().sum(-1)
    else:
        ref = (torch.sign(q[:, None] * k[None]) * torch.minimum(q[:, None].abs(), k[None].abs())).sum(-1)
    g = rand(3, 4, seed=17)
    got = torch.autograd.grad((get_operator(name).sim(q, k) * g).sum(), (q, k))
    want = torch.autograd.grad((ref * g).sum(), (q, k))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_multiplication_free_flags():
    assert not get_operator("exact").multiplication_free
    assert all(get_operator(n).multiplication_free for n in ("l1", "pot", "minprod", "mitchell"))


def test_pot_mixer_renormalises_power_of_two_probabilities():
    p = torch.softmax(rand(3, 6, seed=18), -1)
    v = rand(6, 4, seed=19)
    assert set(MIXERS) == {"exact", "pot"}
    torch.testing.assert_close(mix(p, v, "exact"), p @ v)
    p_hat = torch.tensor([[pot_scalar(float(x)) for x in row] for row in p], dtype=p.dtype)
    torch.testing.assert_close(mix(p, v, "pot"), (p_hat @ v) / p_hat.sum(-1, keepdim=True))


def test_unknown_operator_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown attention operator 'dot'; allowed: exact, l1, pot, minprod"):
        get_operator("dot")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["l1", "minprod"])
def test_distance_operators_take_half_precision_models(name, dtype):
    # torch.cdist has no half kernel: a bf16 model crashed at its first evaluation (CPU) or fine-tune (CUDA)
    q, k = rand(5, 7, seed=1).to(dtype), rand(6, 7, seed=2).to(dtype)
    got = get_operator(name).sim(q, k)
    assert got.dtype == dtype
    want = loop_sim(q.double(), k.double(), DEFINITIONS[name])  # the definition on the half inputs' values
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)
