"""The shared first-order step (`plait.step`): one LR schedule, the step against a hand-written loop, and
``grad_transform:`` chains (validation, DP-SAT)."""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from plait.config import load_config, validate
from plait.errors import ConfigError
from plait.step import BatchOrder, FirstOrderStep, TransformChain, lr_factor


def _run(steps: int, seed: int = 0):
    return SimpleNamespace(cfg=OmegaConf.create({"run": {"steps": steps, "seed": seed}}))


# --- one schedule ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_factor_closed_forms(schedule):
    T, W = 20, 4
    for s in range(1, T + 1):
        if s <= W:
            expected = s / W
        else:
            p = (s - W) / (T - W)
            expected = {"constant": 1.0, "linear": 1 - p, "cosine": (1 + math.cos(math.pi * p)) / 2}[schedule]
        assert lr_factor(s, T, schedule, W) == pytest.approx(expected, abs=1e-15)
    if schedule != "constant":  # decays to min_ratio at the last step
        assert lr_factor(T, T, schedule, W, 0.1) == pytest.approx(0.1)
        assert lr_factor(W + 1, T, schedule, W, 0.1) == pytest.approx(0.1 + 0.9 * lr_factor(W + 1, T, schedule, W))
    with pytest.raises(ValueError, match="allowed: constant, linear, cosine, step"):
        lr_factor(W + 1, T, "exponential", W)


def test_step_schedule_equals_torch_steplr_stepped_once_per_step():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    for s in range(1, 11):  # train_step(s) uses the LR, then the scheduler steps
        assert 2.0 * lr_factor(s, 10, "step", decay_every=3, gamma=0.5) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()


def test_the_recipes_schedules_are_the_one_schedule():
    """sam_train counts steps from 0 and reaches its minimum at the last step; zo and classify count from 1."""
    from plait.plugins.sam_if.sam import lr_at
    from plait.plugins.zo2.mezo import MeZO

    T = 10
    for s in range(T):  # sam: frac = s / (T - 1)
        f = s / (T - 1)
        assert lr_at(s, T, 2.0, "linear", 0.25) == pytest.approx(2.0 * (0.25 + 0.75 * (1 - f)))
    mezo = MeZO(eps=1e-3, lr=0.5, weight_decay=0.0, distribution="gaussian", q=1, one_sided=False, no_decay=[],
                schedule="cosine", warmup_steps=2)
    assert [mezo.lr_at(s, T) for s in (1, 2, 6, 10)] == pytest.approx(
        [0.25, 0.5, 0.5 * (1 + math.cos(math.pi * 0.5)) / 2, 0.0], abs=1e-15)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = BatchOrder(10, 4, seed=3)
    first_epoch = order(0) + order(1) + order(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert BatchOrder(10, 4, seed=3)(5) == order(5)  # a function of (seed, k) alone: resumes draw the same


# --- the step against a hand-written loop ---------------------------------------------------------------------
class _LinearObjective:
    def __init__(self, model, X, y, batch=3, accum=2):
        self.model, self.X, self.y, self.batch, self.accum = model, X, y, batch, accum

    def batch_indices(self, step, micro):
        k = (step - 1) * self.accum + micro
        return [(k * self.batch + i) % len(self.y) for i in range(self.batch)]

    def sample_losses(self, idx):
        return (self.model(self.X[idx]).squeeze(-1) - self.y[idx]) ** 2


def test_first_order_step_equals_a_hand_written_sgd_loop():
    """SGD with momentum and weight decay, cosine schedule with warm-up, accumulation of 2 micro-batches and
    global-norm clipping: the step's parameters after 6 steps equal a loop written from the formulas."""
    torch.manual_seed(0)
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    model = torch.nn.Linear(3, 1).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    T, lr, mom, wd, C, W = 6, 0.3, 0.9, 0.01, 0.5, 2
    obj = _LinearObjective(model, X, y)
    step = FirstOrderStep(_run(T), model, obj, optimizer="sgd", lr=lr, momentum=mom, weight_decay=wd,
                          schedule="cosine", warmup_steps=W, max_grad_norm=C, grad_accum=2, batch_size=3,
                          dataset_size=8)
    logged = [step(s) for s in range(1, T + 1)]

    w, b = w0.clone(), b0.clone()
    buf = None
    for s in range(1, T + 1):
        lr_s = lr * (s / W if s <= W else 0.5 * (1 + math.cos(math.pi * (s - W) / (T - W))))
        gw, gb = torch.zeros_like(w), torch.zeros_like(b)
        for j in range(2):
            idx = obj.batch_indices(s, j)
            r = X[idx] @ w.T + b - y[idx][:, None]  # residuals [3, 1]
            gw += (2 * r * X[idx]).mean(0, keepdim=True) / 2
            gb += (2 * r).mean(0) / 2
        norm = torch.sqrt((gw ** 2).sum() + (gb ** 2).sum())
        scale = min(1.0, C / (float(norm) + 1e-6))
        gw, gb = gw * scale + wd * w, gb * scale + wd * b
        g = torch.cat([gw.reshape(-1), gb])
        buf = g if buf is None else mom * buf + g
        w, b = w - lr_s * buf[:3].reshape(1, 3), b - lr_s * buf[3:]
        assert logged[s - 1]["train/lr"] == pytest.approx(lr_s, abs=1e-15)
    torch.testing.assert_close(model.weight.detach(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), b, rtol=1e-12, atol=1e-12)


def test_first_order_step_refuses_a_model_with_nothing_to_train():
    model = torch.nn.Linear(2, 1)
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing left to train"):
        FirstOrderStep(_run(2), model, _LinearObjective(model, None, None), lr=0.1, batch_size=1, dataset_size=1)


# --- chains at validate -----------------------------------------------------------------------------------------
SFT = ["recipe=sft", "model.arch=opt", "model.size=tiny", "data.name=synthetic_sentiment"]


def _validate(fresh_host, tmp_path, overrides):
    host = fresh_host()
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("run: {steps: 2}\nrecipe: {name: sft}\nmodel: {name: hf_causal_lm, arch: opt, size: tiny}\n"
                        "data: {name: synthetic_sentiment}\n")
    return validate(load_config(cfg_path, overrides), host.registries)


def test_a_chain_validates_and_each_member_is_checked_by_its_place(fresh_host, tmp_path):
    comps = _validate(fresh_host, tmp_path, ["grad_transform=[{name: sam, rho: 0.1}, {name: flashdp, "
                                             "noise_multiplier: 1.0}]"])
    assert [c.entry.name for c in comps["grad_transform"]] == ["sam", "flashdp"]
    with pytest.raises(ConfigError, match=r"grad_transform\[1\]\.noise_multiplie: unknown key"):
        _validate(fresh_host, tmp_path, ["grad_transform=[{name: sam}, {name: flashdp, noise_multiplie: 1.0}]"])
    with pytest.raises(ConfigError, match=r"grad_transform\[0\]\.name: unknown grad_transform 'sma'"):
        _validate(fresh_host, tmp_path, ["grad_transform=[{name: sma}]"])


@pytest.mark.parametrize("chain,match", [
    ("[{name: flashdp, noise_multiplier: 1.0}, {name: sam}]",
     r"grad_transform\[1\]: 'sam' after the private 'flashdp' would recompute the gradient from the raw batch"),
    ("[{name: flashdp, noise_multiplier: 1.0}, {name: dp_flat, noise_multiplier: 1.0}]",
     r"grad_transform\[1\]: a second private transform"),
    ("[{name: sam}, {name: sam}]", r"grad_transform\[1\]: 'sam' appears twice"),
    ("[]", r"grad_transform: an empty list"),
    ("[1, 2]", r"grad_transform\[0\]: must be a mapping"),
    ("7", r"grad_transform: must be a mapping with a 'name' key, or a list of them"),
])
def test_chains_without_a_sound_meaning_are_refused_at_validate(fresh_host, tmp_path, chain, match):
    with pytest.raises(ConfigError, match=match):
        _validate(fresh_host, tmp_path, [f"grad_transform={chain}"])


# --- DP-SAT: SAM before a private transform ---------------------------------------------------------------------
def _dp_sat_run(rho, steps=4, sigma=0.0, C=1e6, record=None):
    """dp_flat (q = 1: every example every step) after sam, on a tiny fp64 regression; returns the model."""
    from plait.plugins.flashdp import build_dp_flat
    from plait.plugins.flashdp.config import FlashDPConfig
    from plait.plugins.sam_if import build_sam
    from plait.plugins.sam_if.config import SAMConfig

    torch.manual_seed(1)
    X, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    dp = FlashDPConfig(noise_multiplier=sigma, max_grad_norm=C, allow_no_privacy=True, reproducible_noise=True,
                       delta=1e-2)
    members = [build_dp_flat(**dataclasses.asdict(dp))]
    names = ["dp_flat"]
    if rho is not None:
        sam = build_sam(**dataclasses.asdict(SAMConfig(rho=rho)))
        sam.compose_before_private()
        members, names = [sam, *members], ["sam", *names]
    step = FirstOrderStep(_run(steps), model, _LinearObjective(model, X, y, batch=6, accum=1), optimizer="sgd",
                          lr=0.1, batch_size=6, dataset_size=6, transform=TransformChain(members, names))
    for s in range(1, steps + 1):
        step(s)
        if record is not None:
            record.append([p.detach().clone() for p in model.parameters()])
    return model, step, X, y


def test_dp_sat_with_rho_zero_is_dp_sgd_exactly():
    a, *_ = _dp_sat_run(rho=0.0, sigma=0.7, C=0.3)
    b, *_ = _dp_sat_run(rho=None, sigma=0.7, C=0.3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_dp_sat_takes_the_gradient_at_the_ascent_from_the_previous_private_gradient():
    """σ = 0, no clipping, q = 1: the private gradient is the batch mean gradient, so DP-SAT is
    w_{t+1} = w_t − η ∇L(w_t + ρ ĝ_{t−1}/‖ĝ_{t−1}‖) with ĝ_{t−1} = ∇L(w_{t−1} + e_{t−1}), e_0 = 0."""
    rho, steps = 0.2, 4
    record: list = []
    model, step, X, y = _dp_sat_run(rho=rho, steps=steps, record=record)
    torch.manual_seed(1)
    torch.randn(6, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ref = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    params = list(ref.parameters())

    def grad_at(shift):
        with torch.no_grad():
            for p, e in zip(params, shift):
                p.add_(e)
        loss = ((ref(X).squeeze(-1) - y) ** 2).mean()
        g = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, e in zip(params, shift):
                p.sub_(e)
        return g

    prev = None
    for t in range(steps):
        if prev is None:
            shift = [torch.zeros_like(p) for p in params]
        else:
            norm = torch.sqrt(sum((g ** 2).sum() for g in prev))
            shift = [rho * g / (norm + 1e-12) for g in prev]
        g = grad_at(shift)
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.sub_(0.1 * gi)
        prev = g
        for got, want in zip(record[t], params):
            torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)
    assert step.summary()["sam/ascent_steps"] == steps - 1 and step.summary()["sam/mode"] == "dp-sat"


def test_dp_sat_spends_exactly_the_privacy_of_dp_sgd():
    _, sat, *_ = _dp_sat_run(rho=0.3, sigma=0.9, C=0.5, steps=5)
    _, sgd, *_ = _dp_sat_run(rho=None, sigma=0.9, C=0.5, steps=5)
    eps_sat, eps_sgd = sat.log_metrics(5)["privacy/epsilon"], sgd.log_metrics(5)["privacy/epsilon"]
    assert math.isfinite(eps_sat) and eps_sat == eps_sgd
