"""Tests of the GRPO advantages and loss against hand values and an explicit per-token loop."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from plait.plugins.infinite_sampling.grpo_loss import group_advantages, grpo_loss, kl_k3

EPS = 1e-4


# --------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------

REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.5, 1.5, 2.5, 3.5]]


def test_advantages_group_by_hand():
    # group 0: mean 0.5, deviations ±0.5, Bessel var = (4 * 0.25) / 3 = 1/3
    # group 1: mean 2.0, deviations -1.5 -0.5 0.5 1.5, Bessel var = 5 / 3
    s0, s1 = math.sqrt(1 / 3), math.sqrt(5 / 3)
    expected = [
        [0.5 / (s0 + EPS), -0.5 / (s0 + EPS), -0.5 / (s0 + EPS), 0.5 / (s0 + EPS)],
        [-1.5 / (s1 + EPS), -0.5 / (s1 + EPS), 0.5 / (s1 + EPS), 1.5 / (s1 + EPS)],
    ]
    got = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), scale="group")
    assert got.shape == (2, 4)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_advantages_batch_by_hand():
    flat = [r for row in REWARDS for r in row]
    # the batch std over all 8 rewards: mean 1.25, sum of squared deviations 10.5
    s = math.sqrt(10.5 / 7)
    assert s == pytest.approx(statistics.stdev(flat))
    expected = [[(r - 0.5) / (s + EPS) for r in REWARDS[0]], [(r - 2.0) / (s + EPS) for r in REWARDS[1]]]
    got = group_advantages(torch.tensor(REWARDS, dtype=torch.float64), scale="batch")
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_advantages_none_by_hand():
    expected = [[0.5, -0.5, -0.5, 0.5], [-1.5, -0.5, 0.5, 1.5]]
    got = group_advantages(torch.tensor(REWARDS), scale="none")
    assert torch.allclose(got, torch.tensor(expected), atol=1e-7)


def test_advantages_binary_pair_and_constant_group():
    # verl's oracle: rewards [0, 1] -> ±1/sqrt(2) (Bessel std = 1/sqrt(2)); a constant group -> 0.
    got = group_advantages(torch.tensor([[0.0, 1.0], [3.0, 3.0]], dtype=torch.float64))
    s = 1 / math.sqrt(2)
    assert got[0].tolist() == pytest.approx([-0.5 / (s + EPS), 0.5 / (s + EPS)])
    assert got[1].tolist() == [0.0, 0.0]
    # custom eps
    got = group_advantages(torch.tensor([[0.0, 1.0]], dtype=torch.float64), eps=0.0)
    assert got[0].tolist() == pytest.approx([-s, s])


def test_advantages_errors():
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(2, 4), scale="global")
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.zeros(3, 1))
    with pytest.raises(ValueError, match=r"num_prompts, G"):
        group_advantages(torch.zeros(8))
    with pytest.raises(ValueError, match=r"finite.*prompt 1, sample 2"):
        group_advantages(torch.tensor([[0.0, 1.0, 2.0], [0.0, 1.0, float("nan")]]))


# --------------------------------------------------------------------------
# Loss: explicit per-token reference loop
# --------------------------------------------------------------------------

def reference_loss(logp, old, ref, adv, mask, lo, hi, beta, aggregation, max_len=None, num_items=None):
    """TRL's definitions written as plain Python loops over tokens (floats only)."""
    per_seq_sums, per_seq_counts = [], []
    for i in range(len(logp)):
        total, count = 0.0, 0
        for t in range(len(logp[i])):
            if not mask[i][t]:
                continue
            ratio = math.exp(logp[i][t] - old[i][t])
            clipped = min(max(ratio, 1 - lo), 1 + hi)
            term = -min(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i][t] - logp[i][t]
                term += beta * (math.exp(d) - d - 1)
            total += term
            count += 1
        per_seq_sums.append(total)
        per_seq_counts.append(count)
    all_sum, all_count = sum(per_seq_sums), sum(per_seq_counts)
    if aggregation == "grpo":
        return sum(s / max(c, 1) for s, c in zip(per_seq_sums, per_seq_counts)) / len(logp)
    if aggregation == "bnpo":
        return all_sum / max(all_count, 1)
    if aggregation == "dapo":
        return all_sum / (num_items if num_items is not None else max(all_count, 1))
    if aggregation == "dr_grpo":
        return all_sum / (len(logp) * max_len)
    raise AssertionError(aggregation)


# B = 3 completions of lengths 4, 2, 3 (T = 4); ratios spread around the clip range.
LOGP = [[-1.0, -0.5, -2.0, -0.1], [-0.3, -1.2, 0.0, 0.0], [-0.7, -0.2, -1.5, 0.0]]
OLD = [[-1.1, -0.9, -1.6, -0.1], [-0.5, -0.8, 0.0, 0.0], [-0.4, -0.9, -1.4, 0.0]]
REF = [[-1.3, -0.4, -2.2, -0.6], [-0.2, -1.0, 0.0, 0.0], [-0.9, -0.3, -1.0, 0.0]]
ADV = [1.3, -0.7, 0.4]
MASK = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]


def _tensors(dtype=torch.float64):
    return (torch.tensor(LOGP, dtype=dtype), torch.tensor(OLD, dtype=dtype), torch.tensor(REF, dtype=dtype),
            torch.tensor(ADV, dtype=dtype), torch.tensor(MASK, dtype=dtype))


@pytest.mark.parametrize("aggregation", ["grpo", "bnpo", "dapo", "dr_grpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_matches_token_loop(aggregation, beta):
    logp, old, ref, adv, mask = _tensors()
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, beta=beta, aggregation=aggregation, max_completion_length=6)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, **kw)
    expected = reference_loss(LOGP, OLD, REF, ADV, MASK, 0.2, 0.28, beta, aggregation, max_len=6)
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_loss_dapo_with_global_token_count():
    logp, old, ref, adv, mask = _tensors()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, aggregation="dapo", num_items_in_batch=20)
    expected = reference_loss(LOGP, OLD, REF, ADV, MASK, 0.2, 0.2, 0.0, "dapo", num_items=20)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_loss_literal_values_on_policy():
    # ratio = 1 (old = logp), beta = 0: every token's loss is -A_i.
    # A = [1, -1], lengths [1, 3], max_completion_length 4.
    logp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 0]])
    adv = torch.tensor([1.0, -1.0])
    expected = {
        "grpo": (-1 + 1) / 2,                 # per-sequence means -1 and +1
        "bnpo": -(1 * 1 - 1 * 3) / 4,          # 0.5
        "dapo": -(1 * 1 - 1 * 3) / 4,          # local token count: same as bnpo
        "dr_grpo": -(1 * 1 - 1 * 3) / (2 * 4),  # 0.25
    }
    for agg, value in expected.items():
        loss, stats = grpo_loss(logp, logp, None, adv, mask, aggregation=agg, max_completion_length=4)
        assert loss.item() == pytest.approx(value), agg
        assert stats["clip_frac"] == 0.0 and stats["ratio_mean"] == 1.0 and stats["kl"] == 0.0
        assert stats["num_tokens"] == 4.0


def test_dapo_over_micro_batches_is_the_token_mean_of_the_step():
    # Two gradient-accumulation micro-batches normalised by the step's global token
    # count sum to the bnpo loss of the whole step (what TRL's num_items_in_batch is for).
    logp, old, ref, adv, mask = _tensors()
    total = float(mask.sum())
    parts = [
        grpo_loss(logp[s], old[s], None, adv[s], mask[s], aggregation="dapo", num_items_in_batch=total)[0]
        for s in (slice(0, 1), slice(1, 3))
    ]
    whole, _ = grpo_loss(logp, old, None, adv, mask, aggregation="bnpo")
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), rel=1e-12)


def test_grpo_aggregation_ignores_padding_values_and_empty_rows():
    logp, old, ref, adv, mask = _tensors()
    loss, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.1, aggregation="grpo")
    garbage = (1 - mask) * 123.0
    loss2, _ = grpo_loss(logp + garbage, old - garbage, ref + garbage, adv, mask, beta=0.1, aggregation="grpo")
    assert loss.item() == pytest.approx(loss2.item(), rel=1e-12)
    # A row with no active tokens contributes 0 (clamp(min=1) like TRL), not nan.
    mask0 = mask.clone()
    mask0[1] = 0
    loss3, _ = grpo_loss(logp, old, ref, adv, mask0, aggregation="grpo")
    mask_list = [[int(v) for v in row] for row in mask0.tolist()]
    assert loss3.item() == pytest.approx(reference_loss(LOGP, OLD, REF, ADV, mask_list, 0.2, 0.2, 0.0, "grpo"))


# --------------------------------------------------------------------------
# KL
# --------------------------------------------------------------------------

def test_kl_nonnegative_and_zero_when_equal():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 16, generator=g) * 5
    ref = -torch.rand(64, 16, generator=g) * 5
    kl = kl_k3(logp, ref)
    assert (kl >= 0).all()
    assert (kl > 0).all()  # strictly positive where they differ
    assert torch.equal(kl_k3(logp, logp.clone()), torch.zeros_like(logp))

    mask = torch.ones_like(logp)
    adv = torch.randn(64, generator=g)
    with_kl, stats = grpo_loss(logp, logp.detach(), logp.clone(), adv, mask, beta=0.5)
    without, _ = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)
    assert stats["kl"] == 0.0
    assert with_kl.item() == without.item()

    _, stats = grpo_loss(logp, logp.detach(), ref, adv, mask, beta=0.5)
    by_hand = sum(math.exp(r - p) - (r - p) - 1 for r, p in zip(ref.flatten().tolist(), logp.flatten().tolist()))
    assert stats["kl"] == pytest.approx(by_hand / logp.numel(), rel=1e-5)


def test_kl_gradient_pulls_towards_reference():
    # d/dlogp of k3 = 1 - exp(ref - logp): pushes logp up when ref > logp.
    logp = torch.tensor([[-2.0, -1.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -2.0]])
    loss, _ = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), beta=1.0, aggregation="bnpo")
    loss.backward()
    expected = [(1 - math.exp(1.0)) / 2, (1 - math.exp(-1.0)) / 2]
    assert logp.grad[0].tolist() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------

def test_clipping_zeroes_the_gradient_only_in_the_clipped_region():
    lo, hi = 0.2, 0.28
    # token ratios: 1.5 (above 1+hi), 0.5 (below 1-lo), 1.1 (inside)
    ratios = [1.5, 0.5, 1.1]
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.log(torch.tensor([ratios, ratios], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([2.0, -3.0], dtype=torch.float64)  # row 0 positive, row 1 negative
    mask = torch.ones(2, 3)
    loss, stats = grpo_loss(logp, old, None, adv, mask, clip_eps_low=lo, clip_eps_high=hi, aggregation="bnpo")
    loss.backward()
    grad = logp.grad
    n = 6
    # A > 0: clipped (zero grad) above 1+hi only; below 1-lo the unclipped term is the min.
    assert grad[0, 0].item() == 0.0
    assert grad[0, 1].item() == pytest.approx(-2.0 * 0.5 / n)
    assert grad[0, 2].item() == pytest.approx(-2.0 * 1.1 / n)
    # A < 0: clipped (zero grad) below 1-lo only.
    assert grad[1, 0].item() == pytest.approx(3.0 * 1.5 / n)
    assert grad[1, 1].item() == 0.0
    assert grad[1, 2].item() == pytest.approx(3.0 * 1.1 / n)
    # Stats: one low-clipped and one high-clipped token out of six.
    assert stats["clip_frac_high"] == pytest.approx(1 / 6)
    assert stats["clip_frac_low"] == pytest.approx(1 / 6)
    assert stats["clip_frac"] == pytest.approx(2 / 6)
    assert stats["ratio_mean"] == pytest.approx(sum(ratios) / 3)
    assert stats["ratio_min"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(1.5)
    # Loss value: clipped tokens use the clipped ratio.
    expected = -(2 * 1.28 + 2 * 0.5 + 2 * 1.1 - 3 * 1.5 - 3 * 0.8 - 3 * 1.1) / 6
    assert loss.item() == pytest.approx(expected)


def test_on_policy_gradient_is_policy_gradient():
    # ratio = 1: d loss / d logp_{i,t} = -A_i / |o_i| / B for "grpo".
    logp = torch.tensor(LOGP, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor(MASK, dtype=torch.float64)
    loss, _ = grpo_loss(logp, logp.detach(), None, torch.tensor(ADV, dtype=torch.float64), mask)
    loss.backward()
    lengths = [sum(row) for row in MASK]
    for i in range(3):
        for t in range(4):
            expected = -ADV[i] / lengths[i] / 3 if MASK[i][t] else 0.0
            assert logp.grad[i, t].item() == pytest.approx(expected, abs=1e-15)


def test_no_gradient_through_old_ref_or_advantages():
    logp, old, ref, adv, mask = _tensors()
    old.requires_grad_(True)
    ref.requires_grad_(True)
    adv.requires_grad_(True)
    logp.requires_grad_(True)
    loss, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.1)
    loss.backward()
    assert old.grad is None and ref.grad is None and adv.grad is None
    assert logp.grad is not None


def test_low_precision_inputs_give_float32_loss():
    logp, old, ref, adv, mask = _tensors(torch.bfloat16)
    loss, _ = grpo_loss(logp, old, ref, adv, mask.bool(), beta=0.1)
    assert loss.dtype == torch.float32 and math.isfinite(loss.item())


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------

def test_loss_argument_errors():
    logp, old, ref, adv, mask = _tensors()
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="mean")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="dr_grpo")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(logp, old[:, :3], ref, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, ref, adv[:2], mask)
    with pytest.raises(ValueError, match="num_items_in_batch"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="dapo", num_items_in_batch=0)
    # (B, 1) advantages are accepted
    a, _ = grpo_loss(logp, old, ref, adv[:, None], mask)
    b, _ = grpo_loss(logp, old, ref, adv, mask)
    assert a.item() == b.item()
