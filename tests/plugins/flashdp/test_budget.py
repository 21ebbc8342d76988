"""The privacy budget is a hard limit (issue 21 item 3): a resume with more steps, or an explicit max_epsilon,
is refused at start with the projected ε; runs without a guarantee say so in summary.json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.config import load_config
from plait.plugins.flashdp.accountant import RDPAccountant, get_noise_multiplier
from plait.run import execute
from tests.plugins.flashdp._sft_dp import sft_dp_config


def _tree(d: Path):
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def test_a_resume_that_would_exceed_target_epsilon_is_refused_and_changes_nothing(tmp_path, fresh_host, capsys):
    # before: resumed with a larger run.steps, a target_epsilon=8 run ended at ε=9.61 with exit 0
    fresh_host()
    te = ["grad_transform.noise_multiplier=null", "grad_transform.target_epsilon=8"]
    run = execute(load_config(sft_dp_config(tmp_path, steps=2), te))
    eps = json.loads((run.dir / "summary.json").read_text())["privacy/epsilon"]
    assert eps <= 8.0
    before = _tree(run.dir)
    capsys.readouterr()
    assert main(["run", str(sft_dp_config(tmp_path, steps=2)), *te, f"run.resume={run.dir}", "run.steps=6"]) == 2
    err = capsys.readouterr().err.strip()
    # the projected ε, independently: the σ the search found, 6 steps at q = 8/64
    sigma = get_noise_multiplier(8.0, 1e-3, 8 / 64, 2)
    acc = RDPAccountant()
    acc.step(sigma, 8 / 64, 6)
    want = acc.get_epsilon(1e-3)
    assert want > 8 and "\n" not in err and "target_epsilon" in err and f"ε={want:.4g}" in err, err
    assert _tree(run.dir) == before


def test_max_epsilon_refuses_a_fresh_run_and_allows_one_within(tmp_path, fresh_host, capsys):
    fresh_host()
    acc = RDPAccountant()
    acc.step(1.0, 8 / 64, 4)
    eps4 = acc.get_epsilon(1e-3)
    assert main(["run", str(sft_dp_config(tmp_path, steps=4)), f"grad_transform.max_epsilon={eps4 * 0.9}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "max_epsilon" in err and f"ε={eps4:.4g}" in err, err
    assert main(["run", str(sft_dp_config(tmp_path, steps=4)), f"grad_transform.max_epsilon={eps4 * 1.01}"]) == 0


@pytest.mark.parametrize("override,reason", [
    ("grad_transform.reproducible_noise=true", "reproducible_noise"),
    ("grad_transform.noise_multiplier=0", "allow_no_privacy"),
])
def test_summary_says_the_guarantee_is_void(tmp_path, fresh_host, capsys, override, reason):
    fresh_host()
    extra = ["grad_transform.allow_no_privacy=true"] if "noise_multiplier=0" in override else []
    capsys.readouterr()
    assert main(["run", str(sft_dp_config(tmp_path, steps=1)), override, *extra]) == 0
    assert f"privacy guarantee: VOID ({reason}" in capsys.readouterr().out  # the end-of-run table
    d = next((tmp_path / "runs" / "d").iterdir())
    s = json.loads((d / "summary.json").read_text())  # strict JSON: ε = inf is null
    assert s["privacy/guarantee"] == "void" and reason in s["privacy/void_reason"]


def test_summary_says_the_guarantee_holds_for_a_private_run(tmp_path, fresh_host):
    fresh_host()
    run = execute(load_config(sft_dp_config(tmp_path, steps=1), []))
    assert json.loads((run.dir / "summary.json").read_text())["privacy/guarantee"] == "holds"


def test_validate_prints_the_projected_epsilon(tmp_path, fresh_host, capsys):
    fresh_host()
    acc = RDPAccountant()
    acc.step(1.0, 8 / 64, 4)
    want = acc.get_epsilon(1e-3)
    capsys.readouterr()
    assert main(["validate", str(sft_dp_config(tmp_path, steps=4))]) == 0
    out = capsys.readouterr().out
    assert f"grad_transform flashdp: projected ε = {want:.4g} over run.steps=4" in out, out
    assert main(["validate", str(sft_dp_config(tmp_path, steps=4)), f"grad_transform.max_epsilon={want / 2}"]) == 0
    assert "REFUSED at start" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
