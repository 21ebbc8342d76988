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
model: {{name: hf-causal-lm, arch: {arch}, size: tiny}}
data: {{name: synthetic-sentiment, n_train: 64, n_eval: 8}}
"""
DP = "{name: flashdp, noise_multiplier: 0.5, max_grad_norm: 1.0, delta: 1.0e-3}"
DP_FLAT = "{name: dp-flat, noise_multiplier: 0.5, max_grad_norm: 1.0, delta: 1.0e-3}"
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
@pytest.mark.parametrize("chain", [DP, DP_FLAT, f"[{SAM}, {DP}]"], ids=["flashdp", "dp-flat", "sam+flashdp"])
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
                                           r"'zo' takes zeroth-order steps; use 'dp-zo'"),
    ("basics/sft_quickstart", "grad_transform={name: dp-zo, noise_multiplier: 1.0}", r"use 'dp-flat' or 'flashdp'"),
    ("quickstart", "grad_transform=[{name: dp-zo, noise_multiplier: 1.0}, {name: sam}]",
     r"grad_transform\[1\]: 'sam' after the private 'dp-zo'"),
    ("basics/sft_quickstart", "perturbation={name: mezo}", r"recipe 'sft' does not use a 'perturbation:' section"),
    ("basics/sft_quickstart", "offload={name: zo2}", r"recipe 'sft' does not use a 'offload:' section"),
    ("basics/sft_quickstart", f"grad_transform=[{DP}, {SAM}]", r"grad_transform\[1\]: 'sam' after the private"),
    ("basics/sft_quickstart", f"grad_transform=[{DP}, {DP_FLAT}]", r"grad_transform\[1\]: a second private"),
])
def test_refused_cells_are_one_line_and_exit_2(config, override, match, fresh_host, capsys):
    from plait.cli import main

    fresh_host()
    assert main(["validate", config, override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
