"""A 2-rank ``ddp`` run stopped after 10 steps and resumed on 2 ranks equals the uninterrupted 20-step 2-rank run
(losses and final parameters bit for bit); resuming it on 1 process is refused with one line naming both world
sizes (exit 2). sam_train on a tiny MLP keeps the launches cheap."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.plugins.parallel._runs import final_tensors, losses_by_step

CFG = """recipe: {name: sam_train, rho: 0.1, lr: 0.5, l2: 1.0e-2, batch_size: 8}
model: {name: tabular_mlp, num_features: 64, num_classes: 10, hidden: [8]}
data: {name: digits, n_train: 64, n_test: 30, seed: 0}
run: {name: r, seed: 2, steps: 20, log_every: 1, eval_every: 0, ckpt_every: 0, progress: false, device: cpu}
"""


def _plait(*argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["--nproc", str(nproc), *argv, "parallel.name=ddp", "parallel.timeout_s=60"] if nproc > 1 else [
        *argv, "parallel.name=ddp"]
    return subprocess.run([sys.executable, "-m", "plait", "run", *launch], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_two_rank_resume_is_exact_and_world_size_is_kept(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CFG)
    full = _plait(str(cfg), f"run.out_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-2000:]
    part = _plait(str(cfg), f"run.out_dir={tmp_path / 'part'}", "run.steps=10")
    assert part.returncode == 0, part.stderr[-2000:]
    (full_dir,) = list((tmp_path / "full" / "r").iterdir())
    (part_dir,) = list((tmp_path / "part" / "r").iterdir())

    wrong = _plait(str(cfg), f"run.out_dir={tmp_path / 'part'}", f"run.resume={part_dir}", nproc=1)
    assert wrong.returncode == 2
    err = wrong.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "written by 2 rank(s), this run has 1" in err

    resumed = _plait(str(cfg), f"run.out_dir={tmp_path / 'part'}", f"run.resume={part_dir}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = losses_by_step(full_dir), losses_by_step(part_dir)
    assert sorted(b) == list(range(1, 21)) and a == b
    fa, fb = final_tensors(full_dir), final_tensors(part_dir)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
