"""The launcher path: ``plait run --nproc 2`` starts ``torchrun … -m plait run`` (so ``python -m plait`` works),
and the run it makes equals the single-process one; the shipped configs compose the strategies."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[3]
CFG = """
run: {{name: cli, seed: 2, steps: 3, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false}}
recipe: {{name: zo, batch_size: 4, eval_batch_size: 32, eval_examples: 4}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 16, n_eval: 4}}
perturbation: {{name: mezo, eps: 1.0e-3, lr: 1.0e-3}}
parallel: {{name: pertp, backend: gloo, timeout_s: 120}}
"""


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    ck = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"
    return {k: v for k, v in load_file(str(ck)).items() if k.startswith("task/model/")}


@pytest.mark.slow
def test_distzo2_plait_run_nproc_equals_single_process(tmp_path, fresh_host):
    from plait.config import load_config
    from plait.run import execute

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CFG.format(out=tmp_path / "runs"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "plait", "run", "--nproc", "2", str(cfg), "run.name=dist"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run directory:") == 1  # rank 0 reports, rank 1 stays quiet
    dist_dirs = list((tmp_path / "runs" / "dist").iterdir())
    assert len(dist_dirs) == 1
    fresh_host()
    single = execute(load_config(cfg, ["run.name=single", "~parallel"]))
    a, b = _final(dist_dirs[0]), _final(single.dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (dist_dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["perf/comm_bytes"] for r in rows if "perf/comm_bytes" in r] == [16.0] * 3  # 1 float64 out, 1 in


def test_distzo2_configs_compose_the_strategies(fresh_host):
    from plait.config import load_config, validate

    host = fresh_host()
    names = {}
    for path in sorted((REPO / "configs" / "distzo2").glob("*.yaml")):
        cfg = load_config(path)
        validate(cfg, host.registries)
        names[path.stem] = (cfg.recipe.name, cfg.parallel.name, cfg.offload.name, cfg.parallel.sliced_upload)
    assert names == {"opt_2d": ("zo", "zo_2d", "none", False), "opt_pertp": ("zo", "pertp", "none", False),
                     "opt_pertp_zo2": ("zo", "pertp", "zo2", False),
                     "opt_pertp_zo2_sliced": ("zo", "pertp", "zo2", True),
                     "opt_zo_ddp": ("zo", "zo_ddp", "none", False)}


@pytest.mark.parametrize("override,match", [
    ("recipe.bogus=1", "recipe.bogus"),  # a schema error: caught before torchrun starts, one line from one process
    pytest.param("perturbation.one_sided=true", "perturbation.one_sided",  # found by the ranks, strategy built
                 marks=pytest.mark.slow),
])
def test_distzo2_nproc_bad_input_is_one_line_exit_2_without_a_launcher_traceback(tmp_path, override, match):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CFG.format(out=tmp_path / "runs"))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "plait", "run", "--nproc", "2", str(cfg), override],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("error: ") and match in line for line in lines), proc.stderr[-3000:]
    assert len(set(lines)) == 1 and len(lines) <= 2  # the same line, at most once per rank
