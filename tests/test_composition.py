"""The composition matrix of docs/composition.md: every "works" cell runs a few steps on a tiny model and each
configured component is shown to have acted; every "refused" cell is one line and exit 2 from `plait validate`.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from plait.config import load_config
from plait.run import execute

LM = """
run: {{name: c, seed: 0, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false}}
recipe: {{name: sft, lr: 1.0e-2, batch_size: 8, eval_batch_size: 32, eval_examples: 8}}
model: {{name: hf_causal_lm, arch: {arch}, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 64, n_eval: 8}}
"""
DP = "{name: flashdp, noise_multiplier: 0.5, max_grad_norm: 1.0, delta: 1.0e-3}"
DP_FLAT = "{name: dp_flat, noise_multiplier: 0.5, max_grad_norm: 1.0, delta: 1.0e-3}"
SAM = "{name: sam, rho: 0.05}"


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _run(tmp_path, fresh_host, overrides, steps=4, arch="opt"):
    fresh_host()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(LM.format(steps=steps, out=tmp_path / "runs", arch=arch))
    return execute(load_config(cfg, overrides))


def _assert_loss_moved(rows):
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses) and losses[0] != losses[-1]


# --- works ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chain", [DP, DP_FLAT, f"[{SAM}, {DP}]"], ids=["flashdp", "dp_flat", "sam+flashdp"])
def test_sft_with_a_private_chain_logs_epsilon_and_trains(tmp_path, fresh_host, chain):
    run = _run(tmp_path, fresh_host, [f"grad_transform={chain}"])
    rows = _rows(run.dir)
    _assert_loss_moved(rows)
    eps = [r["privacy/epsilon"] for r in rows if "privacy/epsilon" in r]
    assert eps and all(math.isfinite(e) and e > 0 for e in eps) and eps == sorted(eps)
    summary = json.loads((run.dir / "summary.json").read_text())
    assert math.isfinite(summary["privacy/epsilon"])
    if "sam" in chain:
        assert summary["sam/mode"] == "dp-sat" and summary["sam/ascent_steps"] == 3  # step 1 has no ĝ_0


def test_sft_with_sam_counts_an_ascent_every_step(tmp_path, fresh_host):
    run = _run(tmp_path, fresh_host, [f"grad_transform={SAM}"])
    rows = _rows(run.dir)
    _assert_loss_moved(rows)
    assert all(r["sam/perturbation_norm"] > 0 for r in rows if "sam/perturbation_norm" in r)
    summary = json.loads((run.dir / "summary.json").read_text())
    assert summary["sam/ascent_steps"] == 4 and summary["sam/mode"] == "sam"


def _final_model(run_dir):
    from safetensors.torch import load_file

    ck = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"
    return {k: v for k, v in load_file(str(ck)).items() if k.startswith("task/model/")}


def test_sft_with_freeze_and_sam_moves_only_the_unfrozen_parameters(tmp_path, fresh_host):
    """Same seed, 1 step vs 3 steps: the frozen embeddings are identical, every other tensor kind moved."""
    overrides = [f"grad_transform=[{SAM}]", "transforms=[{name: freeze, patterns: ['*embed_tokens*', '*embed_positions*']}]"]
    one = _final_model(_run(tmp_path, fresh_host, overrides + ["run.name=one"], steps=1).dir)
    three = _final_model(_run(tmp_path, fresh_host, overrides + ["run.name=three"], steps=3).dir)
    frozen = [k for k in one if "embed_tokens" in k or "embed_positions" in k]
    assert frozen and all(torch.equal(one[k], three[k]) for k in frozen)
    assert any(not torch.equal(one[k], three[k]) for k in one if k not in frozen)


# --- refused ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("config,override,match", [
    ("quickstart", f"grad_transform={DP}", r"grad_transform: 'flashdp' transforms first-order gradients, but recipe "
                                           r"'zo' takes zeroth-order steps; use 'dp_zo'"),
    ("basics/sft_quickstart", "grad_transform={name: dp_zo, noise_multiplier: 1.0}", r"use 'dp_flat' or 'flashdp'"),
    ("quickstart", "grad_transform=[{name: dp_zo, noise_multiplier: 1.0}, {name: sam}]",
     r"grad_transform\[1\]: 'sam' after the private 'dp_zo'"),
    ("basics/sft_quickstart", "perturbation={name: mezo}", r"recipe 'sft' does not use a 'perturbation:' section"),
    ("basics/sft_quickstart", "offload={name: zo2}", r"recipe 'sft' does not use a 'offload:' section"),
    ("basics/sft_quickstart", f"grad_transform=[{DP}, {SAM}]", r"grad_transform\[1\]: 'sam' after the private"),
    ("basics/sft_quickstart", f"grad_transform=[{DP}, {DP_FLAT}]", r"grad_transform\[1\]: a second private"),
    # cells refused when the recipe is built before, now by the recipe entries' check_components at validate
    ("sam_if/digits", f"grad_transform={SAM}", r"^error: grad_transform\[0\]: 'sam' under recipe sam_train, which "
                                               r"already does SAM; remove it and set recipe\.rho"),
    ("sam_if/digits", f"grad_transform=[{SAM}, {DP}]", r"grad_transform\[0\]: 'sam' under recipe sam_train"),
    ("sam_if/digits", f"grad_transform={DP}\nrecipe.m=4", r"recipe\.m: m-sharpness \(m=4\) does not combine"),
    ("capsule/depth_v2", f"grad_transform={DP}", r"^error: grad_transform: the private 'flashdp' needs per-sample "
                                                 r"gradients, but model 'v2_sfmlearner' with norm: batch .*BatchNorm"),
    ("capsule/depth_v2", f"grad_transform=[{SAM}, {DP_FLAT}]", r"grad_transform\[1\]: the private 'dp_flat'"),
    ("capsule/depth_v2", f"grad_transform={DP}\nmodel.norm=group", r"grad_transform\.skip: pose_net and vibration "
                                                                     r"run twice per snippet"),
])
def test_refused_cells_are_one_line_and_exit_2(config, override, match, fresh_host, capsys, tmp_path):
    """`plait validate` refuses in one line with exit 2; `plait run` refuses the same way and writes nothing."""
    from plait.cli import main

    fresh_host()
    overrides = override.split("\n")
    for verb in ("validate", "run"):
        capsys.readouterr()
        assert main([verb, config, *overrides, f"run.out_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not any(tmp_path.iterdir())


def test_a_command_line_list_replaces_a_mapping_section_and_back(tmp_path, fresh_host):
    """``grad_transform=[…]`` on the command line over a file's one mapping (and a mapping over a list) replaces the
    section instead of failing to merge (a TypeError traceback before)."""
    from omegaconf import ListConfig

    from plait.config import load_config

    fresh_host()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(LM.format(steps=1, out=tmp_path / "runs", arch="opt") + f"grad_transform: {DP}\n")
    chained = load_config(cfg, [f"grad_transform=[{SAM}, {DP_FLAT}]"])
    assert isinstance(chained.grad_transform, ListConfig)
    assert [m.name for m in chained.grad_transform] == ["sam", "dp_flat"]
    cfg.write_text(LM.format(steps=1, out=tmp_path / "runs", arch="opt") + f"grad_transform: [{SAM}, {DP}]\n")
    single = load_config(cfg, [f"grad_transform={DP_FLAT}"])
    assert single.grad_transform.name == "dp_flat" and single.grad_transform.noise_multiplier == 0.5
