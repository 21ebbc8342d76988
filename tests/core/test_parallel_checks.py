"""Nothing runs silently duplicated: a recipe/strategy pair that is not supported, ``--nproc N > 1`` without a
``parallel:`` strategy, and ``single`` on several ranks are refused with one line (exit 2) before any rank
starts. The reference is the strategies' own declarations (``updates=``) read from the registry."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from plait.cli import main
from plait.manager import get_host

SFT = """
run: {{name: p, seed: 0, steps: 1, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false}}
recipe: {{name: sft, batch_size: 4}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 8, n_eval: 4}}
"""
ZO = """
run: {{name: p, seed: 0, steps: 1, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false}}
recipe: {{name: zo, batch_size: 4}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 8, n_eval: 4}}
perturbation: {{name: mezo, eps: 1.0e-3, lr: 1.0e-3}}
"""


def _cfg(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text.format(out=tmp_path / "runs"))
    return str(p)


def _one_line(err: str) -> str:
    err = err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def _zeroth_order_strategies() -> list[str]:
    reg = get_host().registries.for_section("parallel")
    return [e.name for e in reg.entries() if e.extra.get("updates") == ("zeroth_order",)]


def test_declarations_cover_distzo2():
    assert {"zo_ddp", "pertp", "zo_2d"} <= set(_zeroth_order_strategies())


@pytest.mark.parametrize("strategy", ["zo_ddp", "pertp", "zo_2d"])
def test_zeroth_order_strategy_under_sft_refused_at_validate(tmp_path, capsys, strategy):
    code = main(["validate", _cfg(tmp_path, SFT), f"parallel.name={strategy}"])
    err = _one_line(capsys.readouterr().err)
    assert code == 2
    assert repr(strategy) in err and "'sft'" in err and "zeroth-order" in err


def test_zeroth_order_strategy_under_zo_validates(tmp_path, capsys):
    assert main(["validate", _cfg(tmp_path, ZO), "parallel.name=zo_ddp"]) == 0


@pytest.mark.parametrize("extra,what", [([], "no 'parallel:' section"), (["parallel.name=single"], "'single'")])
def test_nproc_without_a_splitting_strategy_refused(tmp_path, capsys, extra, what):
    code = main(["run", "--nproc", "2", _cfg(tmp_path, ZO), *extra])
    err = _one_line(capsys.readouterr().err)
    assert code == 2
    assert "--nproc 2" in err and what in err
    listed = err.split("for recipe 'zo': ")[1].split(")")[0].split(", ")
    assert set(listed) == set(_zeroth_order_strategies())  # the strategies the recipe supports, single excluded
    assert not (tmp_path / "runs").exists()  # no rank started


def test_torchrun_without_parallel_refused_on_every_rank(tmp_path):
    """Launched by torchrun directly (WORLD_SIZE set), a config with no ``parallel:`` is refused by the rank."""
    env = {"WORLD_SIZE": "2", "RANK": "0", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "plait", "run", _cfg(tmp_path, SFT)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    err = _one_line(out.stderr)
    assert err.startswith("error: WORLD_SIZE=2:") and "no 'parallel:' section" in err


def test_dp_sat_chain_under_ddp_runs(tmp_path, capsys):
    """DP-SAT (sam before flashdp) under ddp runs as private DDP with SAM's ascent along the previous noisy
    gradient (the 2-rank equivalence is in tests/plugins/parallel/test_ddp_sam.py; a group of one here)."""
    code = main(["run", _cfg(tmp_path, SFT), "parallel.name=ddp", "run.steps=2",
                 "grad_transform=[{name: sam, rho: 0.05}, {name: flashdp, noise_multiplier: 1.0}]"])
    assert code == 0, capsys.readouterr().err
    (run_dir,) = list((tmp_path / "runs" / "p").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sam/mode"] == "dp-sat" and summary["sam/ascent_steps"] == 1  # step 1 has no ĝ_0
    assert summary["privacy/sample_rate"] == 4 / 8 and summary["privacy/steps"] == 2


class _Placement:
    """A data-parallel placement as `FirstOrderStep` sees one (split_batch / reduce_gradients), one rank."""

    name = "ddp"

    def split_batch(self, indices):
        return indices

    def reduce_gradients(self, params, extra=()):
        return list(extra)


class _SelfSampling:
    """A third-party per-sample transform that cannot defer its noise to after an all-reduce (no set_parallel)."""

    loss_reduction = "sum"


class _Objective:
    def batch_indices(self, step, micro):
        return [0, 1]

    def sample_losses(self, indices):
        raise AssertionError("not reached")


@pytest.mark.parametrize("with_sam", [False, True])
def test_chain_that_cannot_run_privately_under_ddp_refused(with_sam):
    """A self-sampling member runs under a placement only if it defers its noise to after the all-reduce
    (``set_parallel``); one that cannot (its noise would be drawn on every rank) is refused with one line naming
    the chain, alone or after DP-SAT's sam."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from plait.errors import ConfigError
    from plait.plugins.sam_if.sam import SAMTransform
    from plait.step import FirstOrderStep, TransformChain

    members, names = [_SelfSampling()], ["custom"]
    if with_sam:
        sam = SAMTransform(rho=0.1)
        sam.compose_before_private()
        members, names = [sam, *members], ["sam", *names]
    run = SimpleNamespace(parallel=_Placement(), cfg=OmegaConf.create({"run": {"steps": 1, "seed": 0}}))
    with pytest.raises(ConfigError, match="under parallel 'ddp' is not supported") as exc:
        FirstOrderStep(run, torch.nn.Linear(2, 1), _Objective(), lr=0.1, batch_size=2, dataset_size=4,
                       transform=TransformChain(members, names))
    _one_line(str(exc.value))
    assert all(repr(n) in str(exc.value) for n in names)
    # what is allowed comes from the registry's declarations (the core names no method)
    entries = get_host().registries.for_section("grad_transform").entries()
    defer = [e.name for e in entries if e.extra.get("defers_noise")]
    before = [e.name for e in entries if e.extra.get("composes_before_private")]
    assert defer and before
    assert f"({', '.join(defer)})" in str(exc.value) and f"after {' / '.join(before)} (DP-SAT)" in str(exc.value)


def _build_with_defaults(entry):
    """A grad_transform entry built from its schema's defaults (plus a noise level where DP requires one)."""
    import dataclasses

    from omegaconf import OmegaConf

    opts = OmegaConf.to_object(OmegaConf.structured(entry.config))
    fields = {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}
    if "noise_multiplier" in fields and fields["noise_multiplier"] is None:
        fields["noise_multiplier"] = 1.0
    return entry.factory(**fields)


def test_defers_noise_declared_by_exactly_the_transforms_with_set_parallel():
    """``defers_noise=True`` (read by the refusal above) is declared by exactly the registered grad_transforms
    whose objects can defer their noise to after the all-reduce (``set_parallel``, what FirstOrderStep calls)."""
    entries = get_host().registries.for_section("grad_transform").entries()
    declared = {e.name for e in entries if e.extra.get("defers_noise")}
    capable = {e.name for e in entries if hasattr(_build_with_defaults(e), "set_parallel")}
    assert declared == capable and {"flashdp", "dp_flat"} <= declared


def test_lone_private_transform_under_ddp_runs(tmp_path, capsys):
    """A DP transform alone under ddp runs (private DDP; the 2-rank equivalence is in
    tests/plugins/parallel/test_private_ddp.py) and accounts at the global sample rate."""
    code = main(["run", _cfg(tmp_path, SFT), "parallel.name=ddp",
                 "grad_transform={name: flashdp, noise_multiplier: 1.0}"])
    assert code == 0, capsys.readouterr().err
    (run_dir,) = list((tmp_path / "runs" / "p").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["privacy/sample_rate"] == 4 / 8 and summary["privacy/steps"] == 1


def test_ddp_refuses_recipes_it_does_not_run_exactly(tmp_path, capsys):
    """ddp's own declaration (``refuses=``) is what validate reads: every recipe named there is refused in one
    line naming both; the recipes not named validate."""
    entry = get_host().registries.for_section("parallel").get("ddp")
    refused = entry.extra["refuses"]
    assert set(refused) == {"depth", "grpo"}
    code = main(["validate", "configs/grpo/addition.yaml", "parallel.name=ddp"])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "'ddp'" in err and "'grpo'" in err and "rollouts" in err
    code = main(["validate", "configs/capsule/depth_clean.yaml", "parallel.name=ddp"])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and "'ddp'" in err and "'depth'" in err and "BatchNorm" in err
    assert main(["validate", _cfg(tmp_path, SFT), "parallel.name=ddp"]) == 0


SAM_TRAIN = """
run: {{name: p, seed: 0, steps: 1, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false}}
recipe: {{name: sam_train, rho: 0.1, lr: 0.5, batch_size: 8}}
model: {{name: tabular_mlp, num_features: 64, num_classes: 10, hidden: [8]}}
data: {{name: digits, n_train: 64, n_test: 31, seed: 0}}
"""


@pytest.mark.parametrize("option,key", [("recipe.m=2", "recipe.m"),
                                        ("recipe.record_trajectory=true", "recipe.record_trajectory")])
def test_sam_train_parts_outside_the_split_refused_under_ddp(tmp_path, capsys, option, key):
    """sam_train's m-sharpness (its own step, the whole batch per rank) and its trajectory (rank 0 would record
    only its slice of each batch) are refused under ddp in one line, not run per rank; both run in one process."""
    code = main(["run", _cfg(tmp_path, SAM_TRAIN), "parallel.name=ddp", option])
    err = _one_line(capsys.readouterr().err)
    assert code == 2 and err.startswith(f"error: {key}:") and "'ddp'" in err
    assert main(["run", _cfg(tmp_path, SAM_TRAIN), option]) == 0
