"""DP-ZO (``grad_transform: dp_zo``) under DistZO2 ``zo_ddp`` and ``zo_2d`` on 2 gloo ranks.

One launch runs both strategies with ``reproducible_noise`` (so the secret seed is run.seed, and the
single-process run in this process draws the same Poisson batches and the same noise). Checked:
* every rank's parameters hash the same after every step (the worker hashes them after each step);
* the rank-0 checkpoint equals the single-process DP-ZO run's bit for bit. ``zo_2d`` on 2 ranks is one PertP pair
  on the whole batch. ``zo_ddp`` evaluates each rank's share of the Poisson batch in its own forward; it is
  still exact because each example's loss is a row-wise computation (every example of this task has the same
  token length, so no padding differs, and the CPU matmuls give each row the same bits whatever the number of
  rows), the gather rebuilds the global batch in index order, and the private estimate sums the clipped
  g_i in that order, as the single process does. A platform whose kernels break this would fail here;
* ε (summary.json) equals the single-process run's, and the step count is the run's;
* empty shares: with E[B] = 2 on 2 ranks several steps give a rank no example (or the batch is empty);
  the test checks from the batches' own seeds that such steps occurred, so the handling is exercised.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.plugins.distzo2.distzo2_launch import launch

STEPS = 8
CFG = """
run: {{name: ref, seed: 5, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out},
      progress: false, keep_checkpoints: 0}}
recipe: {{name: zo, batch_size: 2, eval_batch_size: 32, eval_examples: 4}}
model: {{name: hf_causal_lm, arch: opt, size: tiny, dtype: float32}}
data: {{name: synthetic_sentiment, n_train: 16, n_eval: 4}}
perturbation: {{name: mezo, eps: 1.0e-3, lr: 2.0e-3, weight_decay: 0.01}}
grad_transform: {{name: dp_zo, noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-3, reproducible_noise: true}}
"""
RUNS = ("ddp", "twod")


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    ck = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"
    return {k: v for k, v in load_file(str(ck)).items() if k.startswith("task/model/")}


def _run_dir(root: Path, name: str) -> Path:
    dirs = sorted((root / "runs" / name).iterdir())
    assert len(dirs) == 1, dirs  # only rank 0 writes
    return dirs[0]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from plait import manager
    from plait.config import load_config
    from plait.run import execute

    root = tmp_path_factory.mktemp("dpzo")
    cfg = root / "cfg.yaml"
    cfg.write_text(CFG.format(steps=STEPS, out=root / "runs"))
    runs = [{"argv": [str(cfg), "run.name=ddp", "parallel={name: zo_ddp, backend: gloo, timeout_s: 120}"]},
            {"argv": [str(cfg), "run.name=twod", "parallel={name: zo_2d, backend: gloo, timeout_s: 120}"]}]
    results = launch(2, {"own_group": True, "runs": runs}, root / "launch", timeout=400)
    for r in results:
        assert r.result is not None and r.result["codes"] == [0, 0], f"rank {r.rank}:\n{r.stderr[-3000:]}"
    manager.reset_host()
    single = execute(load_config(cfg, ["run.name=single"]))
    return root, results, single


def _shares(n=16, q=2 / 16, seed=5):
    """Each step's Poisson batch (drawn as dp_zo draws it) and zo_ddp's share sizes on 2 ranks."""
    from plait.plugins.flashdp.mechanism import poisson_batch, step_seed

    out = []
    for step in range(1, STEPS + 1):
        b = poisson_batch(n, q, step_seed(seed, step))
        out.append((len(b), (len(b) + 1) // 2, len(b) // 2))  # local_batch(uneven): rank 0 takes the extra
    return out


def test_the_launch_exercises_empty_shares():
    shares = _shares()
    assert any(total > 0 and second == 0 for total, _, second in shares), shares  # rank 1 idle, rank 0 not
    assert any(total >= 2 for total, _, _ in shares), shares


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_ranks_hold_identical_parameters_after_every_step(launched, name):
    _, results, _ = launched
    i = RUNS.index(name)
    per_rank = [[s["hash"] for s in r.result["steps"][i]] for r in results]
    assert len(per_rank[0]) == STEPS and per_rank[0] == per_rank[1]
    assert len(set(per_rank[0])) == STEPS  # every step moved the parameters (empty batches: the noise alone)
    rows = results[0].result["steps"][i]
    assert sum(1 for r in rows if r.get("train/empty_batches")) == 2  # steps 3 and 7 (test above)


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_two_ranks_equal_the_single_process_dp_zo_run(launched, name):
    root, _, single = launched
    a, b = _final(_run_dir(root, name)), _final(single.dir)
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff == 0.0, diff
    summary = json.loads((_run_dir(root, name) / "summary.json").read_text())
    assert summary["privacy/epsilon"] == pytest.approx(single.summary["privacy/epsilon"], rel=1e-12)
    assert summary["privacy/steps"] == single.summary["privacy/steps"] == STEPS
    assert 0 < summary["privacy/epsilon"] < float("inf")
