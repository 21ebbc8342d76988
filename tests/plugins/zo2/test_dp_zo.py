"""DP-ZO (grad transform ``dp_zo`` under the ``zo`` recipe) against independent references: plain ZO when nothing
is clipped or noised, a hand loop of single-example forwards for the clipped mean, the noise's standard deviation,
the accountant's ε for the same Gaussian mechanism, exact resume, and pertp on two ranks."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plait.config import load_config
from plait.plugins.flashdp.accountant import RDPAccountant
from plait.plugins.flashdp.dp_zo import DPZO, DPZOConfig, PrivateMeZO
from plait.plugins.zo2.mezo import InPlaceMeZO, MeZO
from plait.run import execute
from tests.plugins.zo2._batch import lm_batch

REPO = Path(__file__).resolve().parents[3]
CPU = torch.device("cpu")

CFG = """
run: {{name: z, seed: 1, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: {ckpt}, out_dir: {out},
      progress: false, keep_checkpoints: 0}}
recipe: {{name: zo, batch_size: 4, eval_batch_size: 32}}
model: {{name: hf_causal_lm, arch: opt, size: tiny, dtype: {dtype}}}
data: {{name: synthetic_sentiment, n_train: 16, n_eval: 8}}
perturbation: {{name: mezo, eps: 1.0e-3, lr: 1.0e-3, weight_decay: 0.01}}
offload: {{name: none}}
"""
NO_PRIVACY = "grad_transform={name: dp_zo, noise_multiplier: 0, max_grad_norm: .inf, allow_no_privacy: true, " \
             "poisson: false}"


def _cfg(tmp_path, steps=4, ckpt=0, dtype="float32", name="c.yaml"):
    p = tmp_path / name
    p.write_text(CFG.format(steps=steps, ckpt=ckpt, out=tmp_path / "runs", dtype=dtype))
    return p


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"))


def _model(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in t.items() if k.startswith("task/model/")}


@pytest.mark.parametrize("engine", [["offload.name=none"], ["offload.name=zo2", "offload.storage_dtype=model"],
                                    ["offload.name=zo2", "offload.storage_dtype=model", "offload.disk_dir=run"]],
                         ids=["in_place", "zo2_host", "zo2_disk"])
def test_without_clipping_or_noise_dp_zo_follows_plain_zo(tmp_path, fresh_host, engine):
    """σ = 0, C = ∞, fixed batches: ĝ = Σ_i g_i / B, the same estimate as plain ZO's (f⁺ − f⁻)/2ε on the batch
    mean loss (every example of this task has the same number of completion tokens); equal up to the order of
    the fp64 sums (Σ_i (ℓ⁺_i − ℓ⁻_i) vs Σ_i ℓ⁺_i − Σ_i ℓ⁻_i), not bit for bit."""
    fresh_host()
    plain = execute(load_config(_cfg(tmp_path, dtype="float64"), ["run.name=plain", *engine]))
    private = execute(load_config(_cfg(tmp_path, dtype="float64"), ["run.name=dp", NO_PRIVACY, *engine]))
    a, b = _model(_final(plain.dir)), _model(_final(private.dir))
    assert a.keys() == b.keys()
    start = _model(_final(execute(load_config(_cfg(tmp_path, steps=1, dtype="float64"),
                                              ["run.name=one", *engine])).dir))
    moved = max(float((a[k] - start[k]).abs().max()) for k in a)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert moved > 1e-6 and diff < 1e-12, (moved, diff)
    assert math.isinf(private.summary["privacy/epsilon"])


def _tiny_engine(C, sigma, seed=0, dtype=torch.float64):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16, dropout=0.0)
    model = OPTForCausalLM(cfg).to(dtype).eval()
    return model, lm_batch(seed + 7, 4, 40, (5, 9), pad=(1, 3), prompt=4)


def _dp(**kw) -> DPZO:
    cfg = dataclasses.asdict(DPZOConfig(**kw))
    return DPZO(**cfg)


def test_clipped_update_equals_a_hand_loop_of_single_example_forwards():
    """σ = 0, C small: θ' = θ − lr (ĝ z + wd θ) with ĝ = Σ_i clip(g_i) / B, each g_i from two forwards of example
    i alone at θ ± εz (z re-drawn by the perturbation's own rule, the losses by a written-out masked NLL)."""
    model, batch = _tiny_engine(C=0.05, sigma=0.0)
    ref = copy.deepcopy(model)
    mezo = MeZO(eps=1e-3, lr=1e-2, weight_decay=0.0, distribution="gaussian", q=1, one_sided=False, no_decay=[],
                schedule="constant", warmup_steps=0)
    dp = _dp(noise_multiplier=0.0, max_grad_norm=0.05, allow_no_privacy=True, poisson=False)
    dp.prepare_zo(dataset_size=5, batch_size=5, steps=1, seed=0, perturbations=1)
    engine = InPlaceMeZO(model, CPU, PrivateMeZO(mezo, dp))
    seed, lr, eps = 1234, 1e-2, 1e-3
    _, grads = engine.step(batch, seed, lr)

    params = [p for p in ref.parameters() if p.requires_grad]
    zs = [mezo.z(p.detach(), i, seed, 0) for i, p in enumerate(params)]

    def loss_i(i, alpha):
        with torch.no_grad():
            for p, z in zip(params, zs):
                p.add_(z, alpha=alpha)
            logits = ref(input_ids=batch["input_ids"][i:i + 1], attention_mask=batch["attention_mask"][i:i + 1]).logits
            for p, z in zip(params, zs):
                p.sub_(z, alpha=alpha)
        logp = torch.log_softmax(logits[0, :-1].double(), -1)
        y = batch["labels"][i, 1:]
        keep = y != -100
        return float(-logp[keep].gather(-1, y[keep][:, None]).mean())

    g = [(loss_i(i, eps) - loss_i(i, -eps)) / (2 * eps) for i in range(5)]
    assert max(abs(v) for v in g) > 0.05  # clipping is active
    g_hat = sum(max(-0.05, min(0.05, v)) for v in g) / 5
    assert grads[0] == pytest.approx(g_hat, rel=1e-7, abs=1e-12)
    for p, p0, z in zip([p for p in model.parameters() if p.requires_grad], params, zs):
        torch.testing.assert_close(p.detach(), p0.detach() - lr * g_hat * z, rtol=0, atol=1e-12)


def test_noise_has_std_sigma_c_over_expected_batch():
    dp = _dp(noise_multiplier=1.5, max_grad_norm=0.4)
    dp.prepare_zo(dataset_size=200, batch_size=10, steps=4000, seed=0, perturbations=1)
    draws = torch.tensor([dp.privatize(s, None)[0] for s in range(1, 4001)])
    expected = 1.5 * 0.4 / 10  # σC / E[B], E[B] = q N = 10
    assert abs(float(draws.std()) / expected - 1) < 0.05 and abs(float(draws.mean())) < 4 * expected / 4000 ** .5


def test_epsilon_is_the_gaussian_mechanism_of_the_same_sigma_rate_and_steps():
    """q_z = 1: the accountant of DP-SGD (flashdp's) for (σ, q, T); q_z = 2: the same with σ/√2 (one 2-d
    mechanism of L2 sensitivity C√2)."""
    from plait.plugins.flashdp.transform import FlashDP

    for q_z in (1, 2):
        dp = _dp(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
        dp.prepare_zo(dataset_size=1000, batch_size=40, steps=50, seed=0, perturbations=q_z)
        for s in range(1, 51):
            dp.privatize(s, torch.randn(40, q_z))
        ref = RDPAccountant()
        for _ in range(50):
            ref.step(1.1 / math.sqrt(q_z), 0.04)
        assert dp.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    sgd = FlashDP(mode="flat", max_grad_norm=1.0, thresholds={}, noise_multiplier=1.1, target_epsilon=None,
                  delta=1e-5, skip=[], unsupported="freeze", allow_no_privacy=False, poisson=True, conversion="opacus")
    for _ in range(50):
        sgd.accountant.step(1.1, 0.04)
    single = _dp(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    single.prepare_zo(dataset_size=1000, batch_size=40, steps=50, seed=0, perturbations=1)
    for s in range(1, 51):
        single.privatize(s, None)
    assert single.epsilon() == pytest.approx(float(sgd.accountant.get_epsilon(1e-5)), rel=1e-12)


def test_target_epsilon_is_met_and_reported(tmp_path, fresh_host):
    fresh_host()
    run = execute(load_config(_cfg(tmp_path, steps=6), ["grad_transform={name: dp_zo, target_epsilon: 3.0, "
                                                         "max_grad_norm: 2.0, delta: 1.0e-3}"]))
    eps = run.summary["privacy/epsilon"]
    assert 2.9 < eps <= 3.0 + 1e-9


def test_resume_is_exact_with_the_secret_seed_and_poisson_batches(tmp_path, fresh_host, monkeypatch):
    """The secret seed (noise and Poisson batches) is checkpointed: the resumed process draws a new one (333)
    but must continue with the saved one (222); the reference is an uninterrupted run whose seed is 222."""
    import plait.plugins.flashdp.dp_zo as dp_zo

    drawn = [222, 333, 222]
    monkeypatch.setattr(dp_zo.secrets, "randbits", lambda bits: drawn.pop(0))
    dp = "grad_transform={name: dp_zo, noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-3}"
    fresh_host()
    part = execute(load_config(_cfg(tmp_path, steps=3), ["run.name=part", dp]))
    execute(load_config(_cfg(tmp_path, steps=6), ["run.name=part", f"run.resume={part.dir}", dp]))
    full = execute(load_config(_cfg(tmp_path, steps=6), ["run.name=full", dp]))
    assert not drawn
    a, b = _model(_final(full.dir)), _model(_final(part.dir))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json_summary(part.dir)["privacy/epsilon"] == pytest.approx(full.summary["privacy/epsilon"], rel=1e-12)
    assert full.summary["privacy/steps"] == 6


def json_summary(run_dir):
    import json
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("override,match", [
    ("grad_transform={name: dp_zo, noise_multiplier: 0}", "noise_multiplier 0 gives no privacy"),
    ("grad_transform={name: dp_zo, noise_multiplier: 1.0, max_grad_norm: 0}", "max_grad_norm must be > 0"),
    ("grad_transform={name: dp_zo, noise_multiplier: 1.0, delta: 0.1}", r"delta"),
    ("grad_transform={name: flashdp, noise_multiplier: 1.0}", "use 'dp_zo'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, fresh_host, capsys, override, match):
    from plait.cli import main

    fresh_host()
    assert main(["run", str(_cfg(tmp_path)), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(match, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("summary.json"))


def test_dp_zo_under_sft_names_the_first_order_transforms(fresh_host, capsys):
    from plait.cli import main

    fresh_host()
    assert main(["validate", "basics/sft_quickstart", "grad_transform={name: dp_zo, noise_multiplier: 1.0}"]) == 2
    assert "use 'dp_flat' or 'flashdp'" in capsys.readouterr().err


@pytest.mark.slow
def test_pertp_on_two_ranks_equals_one_process(tmp_path, fresh_host):
    """The pair gathers each other's per-example losses and draws the same noise from the shared seed: the run
    equals the single-process DP-ZO run bit for bit (reproducible noise, so both use the same seed)."""
    dp = ("grad_transform={name: dp_zo, noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-3, "
          "reproducible_noise: true}")
    cfg = _cfg(tmp_path, steps=3)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "plait", "run", "--nproc", "2", str(cfg), "run.name=dist", dp,
                           "parallel={name: pertp, backend: gloo, timeout_s: 120}"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dist_dir = next((tmp_path / "runs" / "dist").iterdir())
    fresh_host()
    single = execute(load_config(cfg, ["run.name=single", dp]))
    a, b = _model(_final(dist_dir)), _model(_final(single.dir))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json_summary(dist_dir)["privacy/epsilon"] == pytest.approx(single.summary["privacy/epsilon"], rel=1e-12)
