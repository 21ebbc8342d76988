"""Attention similarity operators (the QKᵀ of self-attention) behind one interface, and the A·V mixers.

The WiP paper (EdgeFM 2024) only says it proposes "a new neural operator" for self-attention that keeps the
original accuracy with no or few fine-tuning steps, citing AdderNet; its definition is not public. So the
operator is a documented design choice, compared here against the known alternatives (docs/wip.md):

===========  =====================================================  =================================
name         s(q, k) for one query/key pair (head dim D)            per pair cost (no multiplication?)
===========  =====================================================  =================================
exact        Σ_d q_d·k_d                                            1 fp mul + 1 fp add
l1           −Σ_d |q_d − k_d|             (AdderNet, CVPR 2020)      2 fp add                   (yes)
pot          Σ_d pot(q_d)·k_d, pot(x) = sign(x)·2^round(log2|x|)    1 int add (exponent shift) + 1 fp add (yes)
             (DeepShift-Q style: a product with ±2^e is a shift)
minprod      Σ_d sign(q_d·k_d)·min(|q_d|, |k_d|)                    1 compare + 1 fp add       (yes)
             = ½ Σ_d (|q_d + k_d| − |q_d − k_d|)
mitchell     Σ_d q_d ⊙ k_d, x ⊙ y = float(bits|x| + bits|y| − bits 1.0)·sign  1 int add + 1 fp add (yes)
             (Mitchell 1962 logarithmic product on IEEE bit patterns, as in Mogami 2020 / Kosson & Jaggi 2023)
===========  =====================================================  =================================

Why ``minprod`` is the design pick: for scalars, sign(qk)·min(|q|,|k|) has the sign of qk and is monotone in
each magnitude, so Σ_d of it correlates strongly with q·k (a per-head scale α absorbs the rest), while it
needs only adds, compares and sign bits; AdderNet's −‖q−k‖₁ instead equals 2·Σ_d [q_d k_d > 0]·min(|q_d|,
|k_d|) − ‖q‖₁ − ‖k‖₁: the per-query ‖q‖₁ cancels in softmax, but the key-norm term ‖k‖₁ and the dropped
negative half make it a different kernel, which is why AdderNet attention needs retraining. ``mitchell``
approximates each product within −11.1 %…0 % relative error, so it is closer still, at the price of
integer arithmetic on bit patterns. ``pot`` keeps ≈ 1 significant bit of q.

Paths: ``l1`` and ``minprod`` use ``torch.cdist(p=1)`` (``minprod`` through the identity above), so
memory stays O(Tq·Tk); ``pot`` multiplies by a power of two, which is exact in floating point, so a matmul
gives the shift-and-add result; ``mitchell`` forms the bit-pattern sums in query chunks. ``pot`` and
``mitchell`` pass the gradient of the exact product (straight-through estimator), the others are
differentiable as written.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

_ONE_BITS = 0x3F800000  # IEEE-754 float32 bit pattern of 1.0
_CHUNK_ELEMS = 1 << 24  # elements of the [chunk, Tk, D] temporary in mitchell (64 MB of int32)


def pot_quantize(x: torch.Tensor) -> torch.Tensor:
    """sign(x)·2^round(log2|x|), 0 for 0: the nearest power of two in log domain (values only, no gradient)."""
    mag = x.abs()
    exp = torch.round(torch.log2(mag.clamp_min(torch.finfo(x.dtype).tiny)))
    return torch.where(mag > 0, torch.sign(x) * torch.exp2(exp), torch.zeros_like(x))


def mitchell_product(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise x·y by adding float32 bit patterns (Mitchell's logarithmic multiplication), broadcast.

    |x|·|y| ≈ float(bits(|x|) + bits(|y|) − bits(1.0)); sign by the sign bits; 0 if either is 0. The relative
    error lies in [−1/9, 0] (at mantissas m_x + m_y = 1, both ½). Computed in float32.
    """
    xf, yf = x.float(), y.float()
    bits = (xf.abs().view(torch.int32) + yf.abs().view(torch.int32) - _ONE_BITS).clamp_min(0)
    mag = bits.view(torch.float32)
    sign = torch.where((xf < 0) ^ (yf < 0), -1.0, 1.0)
    return torch.where((xf == 0) | (yf == 0), torch.zeros_like(mag), sign * mag)


def _straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """``value`` forward, ``surrogate``'s gradient backward."""
    return surrogate + (value - surrogate).detach()


def _exact(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.matmul(q, k.transpose(-1, -2))


def _cdist1(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """L1 distance matrix; torch.cdist has no fp16/bf16 kernel, so half inputs are measured in fp32."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return torch.cdist(q.float(), k.float(), p=1).to(q.dtype)
    return torch.cdist(q, k, p=1)


def _l1(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return -_cdist1(q, k)


def _minprod(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    from plait.kernels import wip_minprod

    if q.shape[:-2] == k.shape[:-2] and wip_minprod.use_triton(q, k):  # inference on CUDA: one fused pass
        return wip_minprod.minprod_triton(q, k).to(q.dtype)
    # ½ Σ (|q + k| − |q − k|) = Σ sign(qk)·min(|q|, |k|): two L1 distance matrices, no [Tq, Tk, D] temporary
    if q.dtype in (torch.float16, torch.bfloat16):  # difference taken in fp32, then rounded once
        qf, kf = q.float(), k.float()
        return (0.5 * (torch.cdist(qf, -kf, p=1) - torch.cdist(qf, kf, p=1))).to(q.dtype)
    return 0.5 * (torch.cdist(q, -k, p=1) - torch.cdist(q, k, p=1))


def _pot(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    q_hat = _straight_through(pot_quantize(q.detach()), q)
    return torch.matmul(q_hat, k.transpose(-1, -2))


def _mitchell(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    exact = _exact(q, k)
    with torch.no_grad():
        tq, tk, d = q.shape[-2], k.shape[-2], q.shape[-1]
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        step = max(1, _CHUNK_ELEMS // (math.prod(lead) * tk * d))
        kk = k.unsqueeze(-3)  # [..., 1, Tk, D]
        parts = [mitchell_product(q[..., i:i + step, :].unsqueeze(-2), kk).sum(-1) for i in range(0, tq, step)]
        value = torch.cat(parts, dim=-2).to(exact.dtype)
    return _straight_through(value, exact)


@dataclass(frozen=True)
class SimOperator:
    """One similarity operator: ``sim(q [..., Tq, D], k [..., Tk, D]) -> [..., Tq, Tk]`` (not yet scaled).

    ``pair_ops`` counts the scalar operations per (q_d, k_d) pair, ``prep_ops`` those per element of q done
    once before the pairs (quantisation, bias subtraction); the op counter multiplies them by the shapes.
    Kinds: ``fp_mul``, ``fp_add`` (add, subtract, accumulate), ``int_add`` (integer add on exponents or bit
    patterns: a shift), ``cmp`` (magnitude compare); sign and abs are sign-bit operations and cost nothing.
    A pair's accumulate is counted as one ``fp_add`` (the first of a row's D is really a move; the counter
    subtracts it).
    """

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    pair_ops: dict[str, int]
    prep_ops: dict[str, int]
    doc: str

    @property
    def multiplication_free(self) -> bool:
        return self.pair_ops.get("fp_mul", 0) == 0

    def sim(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if q.shape[-1] != k.shape[-1]:
            raise ValueError(f"query head dim {q.shape[-1]} != key head dim {k.shape[-1]}")
        return self.fn(q, k)


OPERATORS: dict[str, SimOperator] = {op.name: op for op in (
    SimOperator("exact", _exact, {"fp_mul": 1, "fp_add": 1}, {}, "q·k (reference)"),
    SimOperator("l1", _l1, {"fp_add": 2}, {}, "AdderNet: −‖q−k‖₁"),
    SimOperator("pot", _pot, {"int_add": 1, "fp_add": 1}, {"cmp": 1},
                "q rounded to ±2^e (log domain), then shift-and-add with k"),
    SimOperator("minprod", _minprod, {"cmp": 1, "fp_add": 1}, {},
                "Σ sign(q·k)·min(|q|,|k|) = ½Σ(|q+k|−|q−k|)"),
    SimOperator("mitchell", _mitchell, {"int_add": 1, "fp_add": 1}, {"int_add": 1},
                "products as integer adds of float bit patterns (Mitchell 1962)"),
)}

MIXERS = ("exact", "pot")  # A·V: exact, or probabilities rounded to powers of two (shifts) and renormalised


def get_operator(name: str) -> SimOperator:
    """The operator called ``name``; ValueError naming the allowed ones otherwise."""
    if name not in OPERATORS:
        raise ValueError(f"unknown attention operator {name!r}; allowed: {', '.join(OPERATORS)}")
    return OPERATORS[name]


def check_mixer(name: str) -> str:
    if name not in MIXERS:
        raise ValueError(f"unknown attention mixer {name!r}; allowed: {', '.join(MIXERS)}")
    return name


def mix(probs: torch.Tensor, value: torch.Tensor, mixer: str) -> torch.Tensor:
    """probs [..., Tq, Tk] @ value [..., Tk, D] with ``mixer`` (``exact`` or ``pot``)."""
    if mixer == "exact":
        return torch.matmul(probs, value)
    q = _straight_through(pot_quantize(probs.detach()), probs)
    return torch.matmul(q, value) / q.sum(-1, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)
