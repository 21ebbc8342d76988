"""MeZO's arithmetic against references that do not call `MeZO.estimate`/`MeZO.update`/`MeZO.z`.

`test_engines.py` compares the engines with `InPlaceMeZO`, and the distzo2 oracle uses the same `MeZO`; a
mistake in the shared estimator (summing the q samples, dropping weight decay, a wrong divisor) would pass
all of those. Here z is re-drawn from its seed rule, the losses come from plain out-of-place forwards
(`torch.func.functional_call`) with a hand-written cross-entropy, and the update is the formula of the
module docstring. All fp64 on a small smooth model (no HF softmax-in-fp32 noise floor), well under a second.
"""
from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call

from plait.plugins.zo2.mezo import InPlaceMeZO, MeZO
from tests.plugins.zo2._batch import lm_batch

CPU = torch.device("cpu")
NO_DECAY = ["bias", "norm", "ln_", "layernorm"]  # MeZOConfig's default
M64 = (1 << 64) - 1


# --- the seed rule, re-derived -----------------------------------------------------------------------------
def splitmix64(x: int) -> int:
    """Vigna's SplitMix64 output for state x (the state advances by the golden gamma before mixing)."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def seed_of(step_seed: int, index: int, sample: int) -> int:
    """mezo.py's rule: mix the step seed, xor the parameter index, mix, xor sample × odd constant, mix; 63 bits."""
    return splitmix64(splitmix64(splitmix64(step_seed) ^ index) ^ ((sample * 0x632BE59BD9B4E019) & M64)) >> 1


def test_splitmix64_matches_the_published_sequence():
    """Anchors the re-derivation: SplitMix64 seeded with 0 starts e220a8397b1dcdaf, 6e789e6aa1b965f4."""
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    assert splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4


def draw_z(shape, dtype, step_seed: int, index: int, sample: int, distribution: str = "gaussian") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed_of(step_seed, index, sample))
    if distribution == "gaussian":
        return torch.randn(shape, generator=g, dtype=dtype)
    return torch.randint(0, 2, shape, generator=g).to(dtype) * 2 - 1


# --- a tiny smooth causal LM with a frozen, decayed and no-decay parameters ---------------------------------
class Tiny(torch.nn.Module):
    """Embedding → scale ("norm", no decay) → tanh residual MLP (weight decayed, bias not) → head.

    ``frozen`` comes first in ``named_parameters()`` and is not trainable, so a z index that counted it
    would shift every other parameter's stream.
    """

    def __init__(self, vocab: int = 11, d: int = 6):
        super().__init__()
        self.frozen = torch.nn.Parameter(torch.ones(d), requires_grad=False)
        self.embed = torch.nn.Embedding(vocab, d)
        self.norm = torch.nn.Parameter(1.0 + 0.1 * torch.randn(d))
        self.proj = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, attention_mask, use_cache=False):
        h = self.embed(input_ids) * self.norm * self.frozen * attention_mask[..., None]
        h = h + torch.tanh(self.proj(h))
        return SimpleNamespace(logits=self.head(h))


def make(seed: int = 0) -> tuple[Tiny, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = Tiny().double().eval()
    return model, lm_batch(seed + 1, 0, 11, (3, 7), pad=(0, 2), prompt=2)


def ref_loss(model, params: dict[str, torch.Tensor], b) -> torch.Tensor:
    """Mean next-token NLL over labels ≠ -100, written out (not `lm_loss`)."""
    logits = functional_call(model, params, (), dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"]))
    logp = torch.log_softmax(logits.logits[:, :-1], dim=-1)
    target = b["labels"][:, 1:]
    keep = target != -100
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    return nll[keep].sum() / keep.sum()


def trainable(model) -> list[tuple[int, str, torch.Tensor]]:
    """(z index, name, tensor): the index counts trainable parameters only, in named_parameters() order."""
    names = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [(i, n, p.detach().clone()) for i, (n, p) in enumerate(names)]


def mezo(**kw) -> MeZO:
    args = dict(eps=1e-3, lr=1e-2, weight_decay=0.1, distribution="gaussian", q=1, one_sided=False,
                no_decay=NO_DECAY, schedule="constant", warmup_steps=0)
    args.update(kw)
    return MeZO(**args)


# --- 1. one ZO step by hand ---------------------------------------------------------------------------------
def hand_step(model, b, seed: int, q: int, eps: float, lr: float, wd: float, one_sided: bool, distribution: str):
    """θ' = θ − lr (Σ_j g_j z_j / q + wd θ [decayed]); g_j = (f(θ+εz_j) − f(θ−εz_j)) / 2ε or (f(θ+εz_j) − f(θ)) / ε."""
    table = trainable(model)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    zs = [{n: draw_z(t.shape, t.dtype, seed, i, j, distribution) for i, n, t in table} for j in range(q)]

    def f(shift: dict[str, torch.Tensor], alpha: float) -> float:
        params = {n: (t + alpha * shift[n] if n in shift else t) for n, t in base.items()}
        with torch.no_grad():
            return float(ref_loss(model, params, b))

    f0 = f({}, 0.0)
    grads = [(f(z, eps) - f0) / eps if one_sided else (f(z, eps) - f(z, -eps)) / (2 * eps) for z in zs]
    out = {}
    for _, n, t in table:
        decayed = not any(s in n.lower() for s in NO_DECAY)
        est = sum(g * z[n] for g, z in zip(grads, zs)) / q
        out[n] = t - lr * (est + (wd * t if decayed else 0.0))
    return grads, out


@pytest.mark.parametrize("one_sided", [False, True], ids=["two_sided", "one_sided"])
@pytest.mark.parametrize("distribution", ["gaussian", "rademacher"])
def test_one_step_equals_the_hand_computation(one_sided, distribution):
    """q = 3 samples averaged, weight decay on `proj.weight`/`embed.weight`/`head.weight` only, 1/ε one-sided.

    The tolerances (1e-9 on g, 1e-11 on θ') sit far below each mistake this catches: summing the samples
    (×3 on the step), skipping weight decay (lr·wd·θ ≈ 1e-3), a one-sided 1/2ε (g halved).
    """
    model, b = make()
    q, eps, lr, wd, seed = 3, 1e-3, 1e-2, 0.1, 12345
    grads, want = hand_step(model, b, seed, q, eps, lr, wd, one_sided, distribution)
    assert all(abs(g) > 1e-3 for g in grads)  # non-degenerate: every sample moves the parameters

    eng = InPlaceMeZO(copy.deepcopy(model), CPU, mezo(eps=eps, lr=lr, weight_decay=wd, q=q, one_sided=one_sided,
                                                     distribution=distribution))
    decay = {p.name: p.decay for p in eng.params}
    assert decay == {"embed.weight": True, "norm": False, "proj.weight": True, "proj.bias": False,
                     "head.weight": True}
    _, got_g = eng.step(b, seed, lr)
    assert len(got_g) == q
    for g, h in zip(got_g, grads):
        assert abs(g - h) <= 1e-9 * abs(h), (got_g, grads)
    after = dict(eng.model.named_parameters())
    for n, w in want.items():
        torch.testing.assert_close(after[n].detach(), w, rtol=0, atol=1e-11, msg=n)
    assert torch.equal(after["frozen"], model.frozen)


# --- 2. one-sided error is O(ε), two-sided O(ε²) --------------------------------------------------------------
def test_one_sided_projected_gradient_converges_at_first_order():
    """|g(ε) − z·∇L| halves when ε halves one-sided (O(ε)), quarters two-sided (O(ε²)).

    z·∇L comes from autograd on the hand-written loss, z from the re-derived seed rule.
    """
    model, b = make(seed=3)
    seed = 99
    table = trainable(model)
    params = {n: p.detach().clone().requires_grad_(p.requires_grad) for n, p in model.named_parameters()}
    ref_loss(model, params, b).backward()
    dd = sum(float((draw_z(t.shape, t.dtype, seed, i, 0) * params[n].grad).sum()) for i, n, t in table)
    assert abs(dd) > 1e-2

    def err(eps: float, one_sided: bool) -> float:
        eng = InPlaceMeZO(copy.deepcopy(model), CPU, mezo(eps=eps, lr=1e-30, weight_decay=0.0, one_sided=one_sided))
        _, (g,) = eng.step(b, seed, 1e-30)
        return abs(g - dd)

    one = [err(e, True) for e in (4e-3, 2e-3, 1e-3)]
    two = [err(e, False) for e in (4e-3, 2e-3, 1e-3)]
    for a, c in zip(one, one[1:]):
        assert 1.7 < a / c < 2.3, one
    for a, c in zip(two, two[1:]):
        assert 3.4 < a / c < 4.6, two
    assert one[-1] < 0.05 * abs(dd)  # it converges to z·∇L (a 1/2ε divisor would sit at |dd|/2)
    assert two[0] < one[-1]  # the central difference at 4ε beats the one-sided at ε


# --- 3. learning-rate schedule ------------------------------------------------------------------------------
# Convention (core/run.py calls train_step(step) for step = 1 … T; the zo recipe passes it to lr_at(step, T)):
# warmup for 1 ≤ s ≤ W gives lr·s/W (so step 1 trains at lr/W and step W at lr); after it the decay progress is
# p = (s − W)/(T − W), so step W+1 has p = 1/(T − W) and the last step T has p = 1, i.e. lr 0 for linear and cosine.
T, W, LR = 20, 4, 0.3


def closed_form(schedule: str, s: int, warmup: int) -> float:
    if warmup and s <= warmup:
        return LR * s / warmup
    if schedule == "constant":
        return LR
    p = (s - warmup) / (T - warmup)
    return LR * (1 - p) if schedule == "linear" else LR * 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, W])
def test_lr_schedule_closed_forms(schedule, warmup):
    m = mezo(lr=LR, schedule=schedule, warmup_steps=warmup)
    mid = warmup + (T - warmup) // 2
    for s in (1, 2, warmup, warmup + 1, mid, T - 1, T):
        if s < 1:
            continue
        assert m.lr_at(s, T) == pytest.approx(closed_form(schedule, s, warmup), rel=1e-12, abs=1e-15), (schedule, s)


def test_lr_schedule_landmarks():
    """Values that need no formula: the warmup ramp, the cosine midpoint, the end of the decay."""
    lin = mezo(lr=LR, schedule="linear", warmup_steps=W)
    cos = mezo(lr=LR, schedule="cosine", warmup_steps=W)
    assert [lin.lr_at(s, T) for s in range(1, W + 1)] == pytest.approx([LR / 4, LR / 2, 3 * LR / 4, LR])
    assert cos.lr_at(W + (T - W) // 2, T) == pytest.approx(LR / 2)  # p = ½: cos(π/2) = 0
    assert lin.lr_at(W + (T - W) // 2, T) == pytest.approx(LR / 2)
    assert lin.lr_at(T, T) == pytest.approx(0.0, abs=1e-15) and cos.lr_at(T, T) == pytest.approx(0.0, abs=1e-15)
    assert cos.lr_at(W + 1, T) < LR and cos.lr_at(W + 1, T) > lin.lr_at(W + 1, T)  # cosine decays slower at first
    assert mezo(lr=LR, schedule="constant", warmup_steps=W).lr_at(W + 1, T) == LR
