"""ddp on 2 gloo processes vs 1 process at the same global batch: steps/s, samples/s, bytes all-reduced per
step, and the ratio to the ideal (2 x the single-process samples/s at one thread per rank), for sft (OPT) and
classify (PiT). Prints one JSON object.

    .venv/bin/python benchmarks/parallel/ddp.py [--steps 30] [--size tiny]

Each run is a `plait run` subprocess with OMP_NUM_THREADS=1 (one thread per rank); steps/s is the mean of the
logged perf/steps_per_sec after the first window (start-up excluded). `sft_dp` and `classify_dp` add flashdp
(σ = 1, C = 1, Poisson sampling at the global rate): each rank clips its share, the noise is added once after the
all-reduce.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cases(size: str, steps: int) -> dict[str, tuple[list[str], int]]:
    run = [f"run.steps={steps}", "run.log_every=5", "run.eval_every=0", "run.ckpt_every=0", "run.progress=false",
           "run.device=cpu", "run.name=b", "run.keep_checkpoints=0"]
    sft = ROOT / "configs" / "basics" / "sft_quickstart.yaml"
    pit = ROOT / "configs" / "capsule" / "classify_pit.yaml"
    dp = ["grad_transform={name: flashdp, noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-3}"]
    out = {
        "sft": ([str(sft), f"model.size={size}", "recipe.batch_size=16", "recipe.grad_accum=1", *run], 16),
        "classify": ([str(pit), "data.num_images=240", "data.min_per_class=3", "recipe.batch_size=32",
                      "model.base_dims=[8,8,8]", "model.heads=[1,1,2]", *run], 32),
    }
    out.update({f"{k}_dp": (argv + dp, batch) for k, (argv, batch) in list(out.items())})
    return out


def measure(argv: list[str], nproc: int, out: Path) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = ["--nproc", str(nproc)] if nproc > 1 else []
    extra = ["parallel.name=ddp"] if nproc > 1 else []
    res = subprocess.run([sys.executable, "-m", "plait", "run", *launch, *argv, f"run.out_dir={out}", *extra],
                         env=env, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise SystemExit(f"run failed ({res.returncode}): {res.stderr[-2000:]}")
    (run_dir,) = list((out / "b").iterdir())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/steps_per_sec"] for r in rows if "perf/steps_per_sec" in r][1:]
    comm = [r["perf/comm_bytes"] for r in rows if "perf/comm_bytes" in r]
    return {"steps_per_sec": sum(rates) / len(rates), "comm_bytes_per_step": comm[-1] if comm else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--only", default=None, help="comma-separated cases: sft, classify, sft_dp, classify_dp")
    a = ap.parse_args()
    result: dict = {"note": "shared 2-core machine (other jobs running); gloo on CPU, one thread per rank",
                    "steps": a.steps}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (argv, batch) in cases(a.size, a.steps).items():
            if a.only and name not in a.only.split(","):
                continue
            one = measure(argv, 1, Path(tmp) / f"{name}1")
            two = measure(argv, 2, Path(tmp) / f"{name}2")
            result[name] = {
                "global_batch": batch,
                "one_process": {**one, "samples_per_sec": one["steps_per_sec"] * batch},
                "ddp_2": {**two, "samples_per_sec": two["steps_per_sec"] * batch},
                "speedup": two["steps_per_sec"] / one["steps_per_sec"],
                "ratio_to_ideal": two["steps_per_sec"] / (2 * one["steps_per_sec"]),
            }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
