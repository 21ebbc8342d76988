"""The independent reference the flashdp model tests compare against: per-sample gradients of single samples from
``torch.func`` (``vmap(grad(...))``, or a loop of ``grad`` where a layer has no vmap rule), clipped per group
(per-layer) or by the total norm (flat), and summed. Not a test module: imported by test_flashdp_*.py."""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from plait.plugins.flashdp.transform import FlashDP


def make_dp(C: float = 0.05, mode: str = "per_layer", **kw) -> FlashDP:
    """σ = 0 (clipping only), fixed-size batches: the exact clipped sum is observable."""
    args = dict(thresholds={}, noise_multiplier=0.0, target_epsilon=None, delta=1e-5, skip=[], unsupported="error",
                allow_no_privacy=True, poisson=False, conversion="opacus")
    args.update(kw)
    return FlashDP(mode, C, **args)


def dp_step(model, t: FlashDP, loss_fn, batch) -> None:
    """prepare, one backward of the per-sample-sum loss, the transform; leaves the raw clipped sums in .grad."""
    t.prepare(model, dataset_size=1000, batch_size=batch[0].shape[0], steps=10, seed=0)
    t.before_backward(1)
    loss_fn(model, *batch).sum().backward()
    t.expected_batch = 1.0  # compare the sums, not the ÷ E[B] means
    t(model, 1)


def per_sample_grads(ref, names: list[str], loss_fn, batch, use_vmap: bool = True) -> dict[str, torch.Tensor]:
    """{name: (B, *shape)} for every clip-group name. Tied tensors (GPT-2/OPT lm_head = embedding) get one entry
    per name: ``functional_call(..., tie_weights=False)`` gives each use its own leaf."""
    params = {n: ref.get_parameter(n).detach().clone() for n in names}

    def one(p, *sample):
        def call(*args, **kwargs):
            return functional_call(ref, p, args, kwargs, tie_weights=False, strict=False)
        return loss_fn(call, *[s[None] for s in sample])[0]

    if use_vmap:
        return vmap(grad(one), in_dims=(None,) + (0,) * len(batch))(params, *batch)
    rows = [grad(one)(params, *[x[i] for x in batch]) for i in range(batch[0].shape[0])]
    return {n: torch.stack([r[n] for r in rows]) for n in names}


def check_against_reference(model, ref, t: FlashDP, loss_fn, batch, *, atol: float = 1e-13,
                            use_vmap: bool = True) -> float:
    """Run the DP step on ``model``, compare every trained tensor's clipped sum (and, per-layer, every group's
    per-sample norms) with the reference on ``ref`` (an untouched copy). Returns the fraction of clipped
    (group, sample) pairs (per-layer) or samples (flat)."""
    dp_step(model, t, loss_fn, batch)
    names = [g.name for g in t.groups]
    per = per_sample_grads(ref, names, loss_fn, batch, use_vmap)
    norms = {n: per[n].flatten(1).norm(dim=1) for n in names}
    want: dict[int, torch.Tensor] = {}
    clipped = []
    if t.mode == "flat":
        total = torch.stack([norms[n] ** 2 for n in names]).sum(0).sqrt()
        flat_f = (t.max_grad_norm / (total + 1e-6)).clamp(max=1.0)
        clipped.append(total > t.max_grad_norm)
    for g in t.groups:
        if t.mode == "flat":
            f = flat_f
        else:
            f = (g.threshold / (norms[g.name] + 1e-6)).clamp(max=1.0)
            clipped.append(norms[g.name] > g.threshold)
            assert torch.allclose(t.ctx.last_norms[g.index].double(), norms[g.name], atol=atol * 10), g.name
        x = per[g.name]
        want[id(g.param)] = want.get(id(g.param), 0) + (x * f.view(-1, *[1] * (x.dim() - 1))).sum(0)
    for g in t.groups:
        got = g.param.grad
        assert got is not None, g.name
        diff = (got - want[id(g.param)]).abs().max()
        assert torch.allclose(got, want[id(g.param)], atol=atol, rtol=0), (g.name, diff)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert trained == {id(g.param) for g in t.groups}  # nothing trainable escapes the DP groups
    return float(torch.cat(clipped).double().mean())
