"""Run-folder readers and checks shared by the distzo2 tests, and the small pertp config of the error tests
(not a test module: no ``test_`` prefix)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.plugins.distzo2.conftest import PAIR_RUNS, STEPS

PERTP_CFG = """
run: {{name: e, seed: 0, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out},
      progress: false}}
recipe: {{name: zo, batch_size: 4, eval_batch_size: 32, eval_examples: 4}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 16, n_eval: 4}}
perturbation: {{name: mezo, eps: 1.0e-3, lr: 1.0e-3}}
parallel: {{name: pertp, timeout_s: {timeout}}}
"""


def pertp_config(tmp_path, steps=3, timeout=60):
    """tmp_path/cfg.yaml: ``steps`` zo steps of the tiny OPT under parallel pertp, runs under tmp_path/runs."""
    p = tmp_path / "cfg.yaml"
    p.write_text(PERTP_CFG.format(steps=steps, out=tmp_path / "runs", timeout=timeout))
    return p


TRAIN_KEYS = ("train/loss", "train/projected_grad", "train/lr", "train/skipped_steps")


def run_dir(root: Path, name: str) -> Path:
    dirs = sorted((root / "runs" / name).iterdir())
    assert len(dirs) == 1, f"expected one run directory for {name}, found {dirs}"  # ranks > 0 write nothing
    return dirs[0]


def final(run_dir: Path) -> dict[str, torch.Tensor]:
    ck = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"
    return {k[len("task/model/"):]: v for k, v in load_file(str(ck)).items() if k.startswith("task/model/")}


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    return [{k: r[k] for k in TRAIN_KEYS if k in r} for r in metric_rows(run_dir) if "train/loss" in r]


def records(result: dict, run: int) -> list[dict]:
    return [{k: r[k] for k in TRAIN_KEYS if k in r} for r in result["steps"][run]]


def assert_params_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def assert_equals_single(root: Path, results, name: str, single_dir: Path) -> None:
    """Run ``name`` of a launch logged, on every rank, and saved exactly what the single-process run did."""
    want_rows = train_rows(single_dir)
    assert len(want_rows) == STEPS
    assert train_rows(run_dir(root, name)) == want_rows, name  # losses, projected gradients, lr: bit for bit
    for r in results:
        assert records(r.result, PAIR_RUNS.index(name)) == want_rows, (name, r.rank)  # every rank's numbers
    assert_params_equal(final(run_dir(root, name)), final(single_dir))


def step_collectives(result: dict, run: int, group: str = "default") -> list[dict]:
    return [c for c in result["collectives"] if c["run"] == run and c["step"] > 0 and c["group"] == group]
