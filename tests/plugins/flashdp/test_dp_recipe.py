"""flashdp through the sft recipe and the CLI: ε in metrics and summary, exact resume, bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plait.checkpoint import Checkpointer
from plait.cli import main
from plait.config import load_config
from plait.run import execute
from tests.plugins.flashdp._sft_dp import sft_dp_config


def _final(d: Path):
    return load_file(str(sorted((d / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"))


def test_dp_run_reports_epsilon_and_resumes_exactly(tmp_path, fresh_host):
    fresh_host()
    # the uninterrupted and the resumed run must draw the same noise: derive it from run.seed (opt-in)
    repro = "grad_transform.reproducible_noise=true"
    full = execute(load_config(sft_dp_config(tmp_path), ["run.name=full", repro]))
    rows = [json.loads(l) for l in (full.dir / "metrics.jsonl").read_text().splitlines()]
    eps = [r["privacy/epsilon"] for r in rows if "privacy/epsilon" in r]
    assert len(eps) == 4 and all(b > a > 0 for a, b in zip(eps, eps[1:]))
    summary = json.loads((full.dir / "summary.json").read_text())
    assert summary["privacy/epsilon"] == pytest.approx(eps[-1]) and summary["privacy/steps"] == 4
    assert summary["privacy/sample_rate"] == pytest.approx(8 / 64)
    # independent check of the logged ε: the accountant's value for 4 steps at (σ=1, q=1/8)
    from plait.plugins.flashdp.accountant import RDPAccountant

    acc = RDPAccountant()
    acc.step(1.0, 8 / 64, 4)
    assert eps[-1] == pytest.approx(acc.get_epsilon(1e-3))

    part = execute(load_config(sft_dp_config(tmp_path, steps=2), ["run.name=part", repro]))
    resumed = execute(load_config(sft_dp_config(tmp_path), ["run.name=part", f"run.resume={part.dir}", repro]))
    ta, tb = _final(full.dir), _final(resumed.dir)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # Poisson batches, noise and optimizer state all resume
    assert json.loads((resumed.dir / "summary.json").read_text())["privacy/epsilon"] == pytest.approx(eps[-1])


def test_secret_noise_seed_is_checkpointed_and_restored_on_resume(tmp_path, fresh_host):
    # default: a secret seed, not run.seed; two resumes of one checkpoint draw the same batches and noise
    fresh_host()
    part = execute(load_config(sft_dp_config(tmp_path, steps=1), ["run.name=secret"]))
    seed = Checkpointer.load(Checkpointer(part.dir / "checkpoints").latest())[1]["task"]["grad_transform"]["seed"]
    assert seed != 2 and str(seed) not in (part.dir / "config.yaml").read_text()  # run.seed is 2
    copies = [shutil.copytree(part.dir, tmp_path / f"copy{i}") for i in range(2)]  # a resume reopens its run dir
    again = [_final(execute(load_config(sft_dp_config(tmp_path, steps=2), [f"run.resume={d}"])).dir) for d in copies]
    assert all(torch.equal(again[0][k], again[1][k]) for k in again[0])


def test_epsilon_is_logged_at_the_logged_step_not_averaged_over_the_window(tmp_path, fresh_host):
    # ε grows every step; a window mean over steps 3–4 would sit below the accountant's value after 4 steps
    from plait.plugins.flashdp.accountant import RDPAccountant

    fresh_host()
    run = execute(load_config(sft_dp_config(tmp_path), ["run.name=window", "run.log_every=2"]))
    rows = [json.loads(l) for l in (run.dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["privacy/epsilon"] for r in rows if "privacy/epsilon" in r}
    assert sorted(logged) == [2, 4]
    for steps, eps in logged.items():
        acc = RDPAccountant()
        acc.step(1.0, 8 / 64, steps)
        assert eps == pytest.approx(acc.get_epsilon(1e-3), rel=1e-9)


def test_flat_mode_runs(tmp_path, fresh_host):
    fresh_host()
    run = execute(load_config(sft_dp_config(tmp_path, steps=2), ["grad_transform.name=dp_flat",
                                                        "grad_transform.noise_multiplier=1.0"]))
    assert run.summary["privacy/epsilon"] > 0


@pytest.mark.parametrize("override,match", [
    ("grad_transform.delta=0.5", "must be < 1/N"),
    ("grad_transform.noise_multiplier=0.0", "gives no privacy"),
    ("grad_transform.max_grad_norm=0", "max_grad_norm must be > 0"),
    ("recipe.grad_accum=2", "grad_accum 2"),
    ("grad_transform.poisson=false", "grad_transform.poisson false"),
    ("grad_transform.skip=[nonexistent*]", "'nonexistent*' matches no DP layer"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, fresh_host, capsys, override, match):
    fresh_host()
    assert main(["run", str(sft_dp_config(tmp_path)), override]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err


def test_unreachable_target_epsilon(tmp_path, fresh_host, capsys):
    fresh_host()
    assert main(["run", str(sft_dp_config(tmp_path)), "~grad_transform.noise_multiplier",
                 "grad_transform.target_epsilon=1e-6"]) == 2
    assert "unreachable" in capsys.readouterr().err
