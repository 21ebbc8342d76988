"""Private DDP's deferred noise, in one process: a FlashDP transform told it runs under a placement
(``set_parallel``) leaves the clipped sum in the backward and adds the noise after (here a world of one, the
all-reduce an identity), which must equal the same transform run plainly, where each DP layer adds its noise
inside its backward (the reference). Covers a GPT-2 ``Conv1D`` (its layer draws the noise in the transposed
shape), a Linear, a LayerNorm, per-layer and flat clipping; and the rank's share of a Poisson draw."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from plait.plugins.flashdp import build_dp_flat, build_flashdp
from plait.plugins.parallel.ddp import DDP

KW = dict(thresholds={}, noise_multiplier=1.3, target_epsilon=None, delta=1e-5, skip=[], unsupported="error",
          allow_no_privacy=False, poisson=True, conversion="opacus", reproducible_noise=True)


class _OneRank:
    """A placement of one rank: what set_parallel may read (no broadcast_object: the seed is the run's)."""

    name, rank, world_size = "ddp", 0, 1


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(Conv1D(6, 5), torch.nn.Tanh(), torch.nn.LayerNorm(6), torch.nn.Linear(6, 3))


def _grads(build, deferred: bool, **over) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(_model())
    t = build(max_grad_norm=0.3, **{**KW, **over})
    model = t.prepare(model, dataset_size=10, batch_size=4, steps=3, seed=7)
    if deferred:
        t.set_parallel(_OneRank())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)
    t.before_backward(2)
    torch.nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
    if deferred:
        t.before_reduce(model, 2)
    t(model, 2)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("build", [build_flashdp, build_dp_flat], ids=["per_layer", "flat"])
def test_noise_after_the_reduce_equals_noise_in_the_backward(build):
    ref, got = _grads(build, False), _grads(build, True)
    assert ref.keys() == got.keys() == {"0.weight", "0.bias", "2.weight", "2.bias", "3.weight", "3.bias"}
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6, msg=k)
    # the noise is really there: without it every tensor's gradient differs by more than the tolerance
    bare = _grads(build, True, noise_multiplier=0.0, allow_no_privacy=True)
    for k in ref:
        assert (got[k] - bare[k]).abs().max() > 1e-2, k


def test_ranks_share_of_a_poisson_draw():
    """Every drawn example lands on exactly one rank: the one whose contiguous dataset slice holds it."""
    drawn = [0, 3, 4, 6, 9]
    shares = []
    for r in range(3):
        d = DDP.__new__(DDP)
        d.rank, d.world_size = r, 3
        shares.append(d.share_sampled(drawn, 10))
    assert shares == [[0], [3, 4], [6, 9]]  # slices [0, 3), [3, 6), [6, 10)
    assert sorted(sum(shares, [])) == drawn
