"""Loss micro-batching (gradient accumulation over the B*G rollouts) and the LR schedule of recipe ``grpo``.

Oracle: the gradient of the one-batch `grpo_loss` (one forward over every row, fp64); micro-batched
accumulation must match it for every aggregation, with the clip active (old != current policy) and a KL term.
SDPA attention: HF's eager attention takes its softmax in fp32, so fp64 logits would change by ~1e-8 with the
padding width of a micro-batch; SDPA stays in fp64."""
from __future__ import annotations

import copy

import pytest
import torch

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.infinite_sampling.grpo_loss import (
    AGGREGATIONS,
    accumulate_grpo_gradients,
    grpo_loss,
    grpo_loss_part,
)
from plait.plugins.infinite_sampling.logprobs import batched_logp, completion_logp, micro_batches
from plait.plugins.infinite_sampling.samplers import Rollouts, RolloutStats
from plait.step import lr_factor


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model, tok = build_causal_lm(arch="qwen3", size="tiny", dtype="float64", attn_implementation="sdpa")
    model.eval()
    ref, old = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():  # old / ref policies close to the current one, so ratios straddle the clip range
        for m in (ref, old):
            for p, q in zip(m.parameters(), model.parameters()):
                p.copy_(q + 0.2 * torch.randn_like(q))
    g = torch.Generator().manual_seed(1)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    lengths = [[3, 1, 6], [2, 5, 1], [4, 4, 2]]  # ragged completions: rows of different widths
    comps = [[[int(t) for t in torch.randint(20, 200, (n,), generator=g)] for n in row] for row in lengths]
    r = Rollouts(prompts, comps, lengths, [[False] * 3 for _ in range(3)], RolloutStats())
    seqs = r.sequences(tok.pad_token_id)
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.8, 0.0, 0.4, -0.9, 1.5], dtype=torch.float64)
    return model, ref, old, seqs, adv


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("size", [1, 4])  # 9 rows: one per micro-batch, or 4 + 4 + 1
def test_accumulated_gradients_equal_the_one_batch_loss(setup, aggregation, size):
    model, ref, old, seqs, adv = setup
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, beta=0.05, aggregation=aggregation, max_completion_length=6)
    with torch.no_grad():
        old_logp = completion_logp(old, seqs)[0]
        ref_logp = completion_logp(ref, seqs)[0]
    model.zero_grad(set_to_none=True)
    logp, mask = completion_logp(model, seqs)  # the oracle: one forward, one grpo_loss
    loss, stats = grpo_loss(logp, old_logp, ref_logp, adv, mask, **kw)
    loss.backward()
    expected = _grads(model)
    assert 0 < stats["clip_frac"] < 1  # the clip is active on some tokens, not all
    model.zero_grad(set_to_none=True)
    value, mstats = accumulate_grpo_gradients(model, seqs, adv, batched_logp(old, seqs, size),
                                              batched_logp(ref, seqs, size), micro_batch_size=size, **kw)
    for a, b in zip(_grads(model), expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    assert value == pytest.approx(float(loss.detach()), rel=1e-10, abs=1e-12)
    for k in ("kl", "clip_frac", "ratio_mean"):
        assert mstats[k] == pytest.approx(stats[k], rel=1e-10, abs=1e-12)
    model.zero_grad(set_to_none=True)


def test_accumulation_with_the_current_policy_as_old(setup):
    model, _, _, seqs, adv = setup  # num_iterations = 1: old_logp None means logp.detach() per micro-batch
    model.zero_grad(set_to_none=True)
    logp, mask = completion_logp(model, seqs)
    grpo_loss(logp, logp.detach(), None, adv, mask, aggregation="grpo")[0].backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    accumulate_grpo_gradients(model, seqs, adv, None, None, micro_batch_size=2, aggregation="grpo")
    for a, b in zip(_grads(model), expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    model.zero_grad(set_to_none=True)


def test_loss_parts_sum_to_the_full_loss_by_hand():
    torch.manual_seed(3)
    logp = torch.randn(5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    adv = torch.randn(5, dtype=torch.float64)
    for agg in AGGREGATIONS:
        full = grpo_loss(logp, logp - 0.1, None, adv, mask, aggregation=agg, max_completion_length=4)[0]
        parts = sum(grpo_loss_part(logp[s], logp[s] - 0.1, None, adv[s], mask[s], total_rows=5,
                                   total_tokens=float(mask.sum()), aggregation=agg, max_completion_length=4)[0]
                    for s in micro_batches(5, 2))
        assert float(parts) == pytest.approx(float(full), rel=1e-12), agg
    assert micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)] and micro_batches(5, 0) == [slice(0, 5)]


def test_lr_schedules_by_hand():
    assert [lr_factor(s, 10, "constant", 2) for s in (1, 2, 3, 10)] == [0.5, 1.0, 1.0, 1.0]
    assert [lr_factor(s, 10, "linear", 0) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert lr_factor(5, 10, "cosine", 0) == pytest.approx(0.5) and lr_factor(10, 10, "cosine", 0) == pytest.approx(0)
