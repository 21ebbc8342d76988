"""Recipe ``sam_train`` on the shared first-order step: ``grad_transform:`` (DP-SAT before flashdp, DP-SGD at
rho = 0, refusals) and ``transforms:`` (freeze), on a small digits subset with a tiny tabular_mlp."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from plait.cli import main

REPO = Path(__file__).resolve().parents[3]
STEPS, N_TRAIN, BATCH, LR, L2 = 6, 120, 24, 0.5, 1.0e-2
CONFIG = f"""
run: {{name: s, seed: 3, steps: {STEPS}, log_every: 3, out_dir: OUT, progress: false, device: cpu}}
recipe: {{name: sam_train, rho: 0.1, lr: {LR}, l2: {L2}, batch_size: {BATCH}}}
model: {{name: tabular_mlp, num_features: 64, num_classes: 10, hidden: [8]}}
data: {{name: digits, n_train: {N_TRAIN}, n_test: 30, seed: 0}}
"""
DP = "grad_transform={name: flashdp, noise_multiplier: 1.0, reproducible_noise: true}"


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.replace("OUT", str(tmp_path / "runs")))
    return cfg


def _execute(tmp_path: Path, name: str, overrides: list[str]):
    from plait.config import load_config
    from plait.run import execute

    return execute(load_config(_config(tmp_path), [f"run.name={name}", *overrides]))


def _final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    last = sorted((run_dir / "checkpoints").iterdir())[-1]
    tensors = load_file(str(last / "tensors.safetensors"))
    return {k[len("task/model/"):]: v for k, v in tensors.items() if k.startswith("task/model/")}


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_dp_sat_spends_the_privacy_of_dp_sgd(tmp_path, fresh_host):
    """flashdp after the recipe's SAM: DP-SAT (an ascent on every step but the first), ε equal to the same run
    at rho = 0 (DP-SGD): the batch is read once per step, by the private transform."""
    fresh_host()
    sat = _execute(tmp_path, "sat", [DP])
    sgd = _execute(tmp_path, "sgd", [DP, "recipe.rho=0"])
    a, b = _summary(sat.dir), _summary(sgd.dir)
    assert math.isfinite(a["privacy/epsilon"]) and a["privacy/epsilon"] == b["privacy/epsilon"]
    assert a["privacy/steps"] == b["privacy/steps"] == STEPS
    assert a["sam/mode"] == "dp-sat" and a["sam/ascent_steps"] == STEPS - 1 and b["sam/ascent_steps"] == 0
    assert a["sam_if"]["sam_mode"] == "dp-sat" and a["sam_if"]["grad_transform"] == ["flashdp"]
    pa, pb = _final_params(sat.dir), _final_params(sgd.dir)
    assert not all(torch.equal(pa[k], pb[k]) for k in pa)  # same noise, same batches: only the ascent differs


def test_dp_sat_at_rho_zero_is_a_plain_flashdp_run(tmp_path, fresh_host):
    """rho = 0, reproducible noise: the recipe's parameters equal DP-SGD written directly on FirstOrderStep
    (flashdp alone, per-sample cross-entropies, l2 as SGD weight decay, the same momentum) exactly."""
    from plait.plugins.flashdp import build_flashdp
    from plait.plugins.flashdp.config import FlashDPConfig
    from plait.plugins.sam_if.data import TabularMLP, load_tabular
    from plait.step import FirstOrderStep

    fresh_host()
    run = _execute(tmp_path, "rho0", [DP, "recipe.rho=0", "recipe.momentum=0.5", "recipe.record_trajectory=true"])
    got = _final_params(run.dir)

    data = load_tabular("digits", n_train=N_TRAIN, n_test=30, seed=0)
    X, y = data.train.X, data.train.y
    model = TabularMLP(64, 10, (8,), "float64", 0)
    objective = SimpleNamespace(sample_losses=lambda idx: torch.nn.functional.cross_entropy(
        model(X[idx]), y[idx], reduction="none"), batch_indices=None)
    dp = build_flashdp(**dataclasses.asdict(FlashDPConfig(noise_multiplier=1.0, reproducible_noise=True)))
    step = FirstOrderStep(SimpleNamespace(cfg=OmegaConf.create({"run": {"steps": STEPS, "seed": 3}})), model,
                          objective, optimizer="sgd", lr=LR, momentum=0.5, weight_decay=L2, batch_size=BATCH,
                          dataset_size=N_TRAIN, transform=dp)
    for s in range(1, STEPS + 1):
        step(s)
    want = model.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert _summary(run.dir)["privacy/epsilon"] == dp.epsilon()
    meta = json.loads((run.dir / "trajectory" / "trajectory.json").read_text())
    assert meta["momentum"] == 0.5 and meta["sam_mode"] == "dp-sat"


def test_dp_sat_records_the_perturbation_it_applied(tmp_path, fresh_host):
    """The trajectory's e_t is DP-SAT's: ρ ĝ_{t−1}/‖ĝ_{t−1}‖ with ĝ the previous privatized gradient (recovered
    from the recorded weights: w_{t+1} = w_t − η_t (ĝ_t + l2 w_t)), zero at the first step; batches are Poisson."""
    from plait.plugins.sam_if.sam import load_trajectory

    fresh_host()
    run = _execute(tmp_path, "rec", [DP, "recipe.record_trajectory=true"])
    tr = load_trajectory(run.dir / "trajectory")
    w, E, lrs = tr["weights"], tr["perturbations"][:, 0], tr["lrs"]
    assert w.shape == (STEPS, 64 * 8 + 8 + 8 * 10 + 10) and tr["meta"]["momentum"] == 0.0
    assert torch.count_nonzero(E[0]) == 0
    for t in range(STEPS - 1):
        g = (w[t] - w[t + 1]) / lrs[t] - L2 * w[t]
        torch.testing.assert_close(E[t + 1], 0.1 * g / g.norm(), rtol=1e-7, atol=1e-10)
    sizes = {int((b >= 0).sum()) for b in tr["batch"]}
    assert len(sizes) > 1  # Poisson batches (expected 24), not the fixed-size order


def test_dp_sat_resume_is_exact(tmp_path, fresh_host):
    """ĝ_{t−1}, the accountant and the trajectory travel in the checkpoint: 3 + 3 steps equal 6."""
    from plait.config import load_config
    from plait.run import execute

    fresh_host()
    full = _execute(tmp_path, "full", [DP, "recipe.record_trajectory=true"])
    part = _execute(tmp_path, "part", [DP, "recipe.record_trajectory=true", "run.steps=3"])
    resumed = execute(load_config(_config(tmp_path), ["run.name=part", DP, "recipe.record_trajectory=true",
                                                      f"run.resume={part.dir}"]))
    assert resumed.dir == part.dir
    a, b = _final_params(full.dir), _final_params(part.dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _summary(full.dir)["privacy/epsilon"] == _summary(part.dir)["privacy/epsilon"]


@pytest.mark.parametrize("overrides,match", [
    (["grad_transform={name: sam}"], "grad_transform[0]: 'sam' under recipe sam_train, which already does SAM"),
    (["grad_transform=[{name: sam}, {name: flashdp, noise_multiplier: 1.0}]"], "already does SAM"),
    ([DP, "recipe.m=4"], "recipe.m: m-sharpness (m=4) does not combine with grad_transform flashdp"),
])
def test_refusals_are_one_line(tmp_path, fresh_host, capsys, overrides, match):
    fresh_host()
    capsys.readouterr()
    assert main(["run", str(_config(tmp_path)), *overrides]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("dp", [False, True])
def test_freeze_transform_leaves_frozen_parameters_unchanged(tmp_path, fresh_host, dp):
    from plait.plugins.sam_if.data import TabularMLP
    from plait.plugins.sam_if.sam import load_trajectory

    fresh_host()
    run = _execute(tmp_path, "frozen", ["transforms=[{name: freeze, patterns: ['0.*']}]",
                                        "recipe.record_trajectory=true", *([DP] if dp else [])])
    got, init = _final_params(run.dir), TabularMLP(64, 10, (8,), "float64", 0).state_dict()
    assert torch.equal(got["0.weight"], init["0.weight"]) and torch.equal(got["0.bias"], init["0.bias"])
    assert not torch.equal(got["2.weight"], init["2.weight"])
    tr = load_trajectory(run.dir / "trajectory")
    assert tr["weights"].shape == (STEPS, 8 * 10 + 10) and tr["perturbations"].shape[-1] == 8 * 10 + 10


def test_dp_sam_digits_preset_validates(fresh_host):
    from plait.config import load_config, validate

    host = fresh_host()
    cfg = load_config(REPO / "configs" / "compose" / "dp_sam_digits.yaml")
    comps = validate(cfg, host.registries)
    assert comps["recipe"].entry.name == "sam_train" and comps["grad_transform"].entry.name == "flashdp"
    assert cfg.grad_transform.target_epsilon == 8
