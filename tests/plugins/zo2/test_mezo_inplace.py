"""The in-place MeZO step after its hot-spot work (issue 23): the restore folded into the update, z drawn in
worker threads and into reused buffers. The reference is MeZO's loop as the paper writes it — four passes over
the parameters (+εz, −2εz, +εz, update), each drawing z afresh with ``torch.randn`` from the seed rule, one
parameter after another on the calling thread — and the in-place engine must equal it bit for bit in fp32.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.zo2.mezo import SCRATCH_MAX, InPlaceMeZO, MeZO, lm_loss, param_seed, step_seed

CPU = torch.device("cpu")
NO_DECAY = ["bias", "norm", "ln_", "layernorm"]


def mezo(**kw) -> MeZO:
    args = dict(eps=1e-3, lr=1e-2, weight_decay=0.1, distribution="gaussian", q=1, one_sided=False,
                no_decay=NO_DECAY, schedule="constant", warmup_steps=0)
    args.update(kw)
    return MeZO(**args)


def tiny(seed=0):
    torch.manual_seed(seed)
    model, _ = build_causal_lm(arch="opt", size="tiny", config={"num_hidden_layers": 2}, dtype="float32")
    return model.eval()


def batch(seed=0, b=4, t=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 1000, (b, t), generator=g)
    labels = ids.clone()
    labels[:, : t // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def paper_step(model, b, seed, lr, eps=1e-3, wd=0.1, q=1):
    """MeZO (Malladi et al. 2023, Algorithm 1) with q samples: per sample +εz, f⁺, −2εz, f⁻, +εz; then
    θ -= lr·(Σ_j g_j/q · z_j + wd·θ) with z re-drawn — every pass a fresh randn, one parameter at a time."""
    params = [(i, n, p) for i, (n, p) in enumerate((n, p) for n, p in model.named_parameters() if p.requires_grad)]

    def z(i, p, j):
        return torch.randn(p.shape, generator=torch.Generator().manual_seed(param_seed(seed, i, j)), dtype=p.dtype)

    def f():
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return float(lm_loss(out, b["labels"]))

    grads = []
    with torch.no_grad():
        for j in range(q):
            for i, _, p in params:
                p.data.add_(z(i, p, j), alpha=eps)
            fp = f()
            for i, _, p in params:
                p.data.add_(z(i, p, j), alpha=-2 * eps)
            fm = f()
            for i, _, p in params:
                p.data.add_(z(i, p, j), alpha=eps)
            grads.append((fp - fm) / (2 * eps))
        if not all(math.isfinite(g) for g in grads):
            return grads
        for i, n, p in params:
            acc = None
            for j, g in enumerate(grads):
                term = z(i, p, j) * (g / q)
                acc = term if acc is None else acc + term
            decay = not any(s in n.lower() for s in NO_DECAY)
            p.data.sub_(lr * (acc + wd * p.data) if decay and wd else lr * acc)
    return grads


def assert_same_params(a, b):
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb), na


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_folded_threaded_step_equals_the_paper_loop_bit_for_bit(q, threads):
    ref, model = tiny(), tiny()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        eng = InPlaceMeZO(model, CPU, mezo(q=q))
    finally:
        torch.set_num_threads(old)
    assert len(eng.groups) == min(threads, len(eng.params))  # the parameters really are split across threads
    assert sorted(p.index for g in eng.groups for p in g) == [p.index for p in eng.params]
    for t in range(3):
        b = batch(seed=t)
        want = paper_step(ref, b, step_seed(0, t), 1e-2, q=q)
        _, got = eng.step(b, step_seed(0, t), 1e-2)
        assert got == want, t
        assert_same_params(ref, model)
    eng.close()


def test_fold_on_and_off_agree_and_one_draw_is_saved():
    """The fold changes the number of draws (3 per parameter and step instead of 4), not one bit of the result."""
    a, b = tiny(), tiny()
    ma, mb = mezo(), mezo()
    ea, eb = InPlaceMeZO(a, CPU, ma, fold_restore=True), InPlaceMeZO(b, CPU, mb, fold_restore=False)
    unique = sum(p.numel() for p in a.parameters() if p.requires_grad)
    for t in range(3):
        ma.draws = mb.draws = 0
        x = batch(seed=t)
        assert ea.step(x, step_seed(0, t), 1e-2) == eb.step(x, step_seed(0, t), 1e-2)
        assert ma.draws == 3 * unique and mb.draws == 4 * unique
    assert_same_params(a, b)
    ea.close()
    eb.close()


def test_non_finite_gradient_still_restores_the_parameters():
    """A skipped update must still undo the last shift (the fold must not skip the restore with it)."""
    model = tiny()
    before = copy.deepcopy(model)
    eng = InPlaceMeZO(model, CPU, mezo())
    x = batch()
    x["labels"][:] = -100  # no labelled token: the loss is nan, so g is nan and the update is skipped
    _, grads = eng.step(x, step_seed(0, 0), 1e-2)
    assert not math.isfinite(grads[0])
    ref = copy.deepcopy(before)
    paper_step(ref, x, step_seed(0, 0), 1e-2)  # +εz, −2εz, +εz and no update: MeZO's restore drift only
    assert_same_params(ref, model)
    drift = max(float((p - q).detach().abs().max()) for p, q in zip(model.parameters(), before.parameters()))
    assert drift < 1e-6  # and that drift is rounding-sized
    eng.close()


def test_scratch_buffer_draws_equal_fresh_draws():
    m = mezo()
    t = torch.empty(300, 7)
    fresh = m.z(t, 5, 123, 0)
    reused = m.z(t, 5, 123, 0, slot=0)
    assert torch.equal(fresh, reused)
    again = m.z(torch.empty(50), 6, 123, 0, slot=0)  # the same slot, another parameter: a view of the buffer
    assert torch.equal(again, torch.randn(50, generator=torch.Generator().manual_seed(param_seed(123, 6, 0))))
    big = torch.empty(2, SCRATCH_MAX)  # above the cap: a fresh tensor each time, still the rule's numbers
    z1 = m.z(big, 7, 1, 0, slot=0)
    assert torch.equal(z1, torch.randn(big.shape, generator=torch.Generator().manual_seed(param_seed(1, 7, 0))))
    assert m.z(big, 7, 1, 0, slot=0).data_ptr() != z1.data_ptr()
