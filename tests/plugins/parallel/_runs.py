"""Helpers shared by the multi-process tests of ``parallel`` (not a test module: no ``test_`` prefix).

Each test launches a rank helper (``_capture_rank.py``, ``_eval_rank.py``) or ``plait run`` on 1 process and on
2 gloo ranks and compares what they wrote; these functions start the processes and read the run folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[3]
CLASSIFY_PIT = ROOT / "configs" / "capsule" / "classify_pit.yaml"
# sft on the tiny OPT, 6 of 24 examples a step (a DP sample rate of 1/4)
SFT_TINY = """recipe: {name: sft, batch_size: 6, optimizer: sgd, lr: 0.5}
model: {name: hf_causal_lm, arch: opt, size: tiny, config: {dropout: 0.0, attention_dropout: 0.0}}
data: {name: synthetic_sentiment, n_train: 24, n_eval: 4}
"""
FSDP_STEPS = 10
FSDP_CFG = """recipe: {name: sft, batch_size: 4, grad_accum: 2, optimizer: sgd, momentum: 0.9, lr: 0.05, max_grad_norm: 0.0}
model: {name: hf_causal_lm, arch: opt, size: tiny, config: {dropout: 0.0, attention_dropout: 0.0}}
data: {name: synthetic_sentiment, n_train: 32, n_eval: 4}
"""


def run_overrides(seed: int, steps: int) -> list[str]:
    """The ``run.*`` overrides of a quiet CPU run named ``r`` that logs the loss every step."""
    return ["run.name=r", f"run.seed={seed}", f"run.steps={steps}", "run.log_every=1", "run.eval_every=0",
            "run.ckpt_every=0", "run.progress=false", "run.device=cpu"]


FSDP_RUN = run_overrides(1, FSDP_STEPS)


def config_file(root: Path, text: str | None) -> Path:
    """Make ``root``; ``root/cfg.yaml`` holding ``text``, or the classify_pit preset where ``text`` is None."""
    root.mkdir(parents=True)
    if text is None:
        return CLASSIFY_PIT
    path = root / "cfg.yaml"
    path.write_text(text)
    return path


def launch_ranks(helper: Path, argv: list[str], nproc: int) -> None:
    """Run the rank helper script on ``nproc`` gloo ranks under ddp (torchrun), or as one plain process."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(helper), *argv, "parallel.name=ddp", "parallel.timeout_s=120"]
    else:
        cmd = [sys.executable, str(helper), *argv]
    out = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def run_fsdp(root: Path, *extra: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """``plait run [--nproc N]`` of FSDP_CFG under ``parallel: {name: fsdp}``, its run folders under root/runs."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cfg.yaml").write_text(FSDP_CFG)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["--nproc", str(nproc)] if nproc > 1 else []
    return subprocess.run([sys.executable, "-m", "plait", "run", *launch, str(root / "cfg.yaml"), *FSDP_RUN,
                           f"run.out_dir={root / 'runs'}", "parallel.name=fsdp", "parallel.timeout_s=120", *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def only_run(root: Path) -> Path:
    """The one run folder of run ``r`` under root/runs."""
    (run_dir,) = list((root / "runs" / "r").iterdir())
    return run_dir


def _loss_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def losses(run_dir: Path) -> list[float]:
    """The logged train losses of a run folder, in order."""
    return [r["train/loss"] for r in _loss_rows(run_dir)]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The logged train losses of a run folder by step (a step with an empty Poisson draw logs none)."""
    return {r["step"]: r["train/loss"] for r in _loss_rows(run_dir)}


def final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's newest checkpoint."""
    return load_file(str(sorted((run_dir / "checkpoints").iterdir())[-1] / "tensors.safetensors"))
