"""Capsule benchmark: short-training metrics over seeds and inference frames/s. Prints one JSON object.

* ``depth_high_vibration``: V2-SfMLearner vs the vision-only ablation on the high-vibration tube (the test sizes:
  32×48 frames, width-16 nets, ``--depth-steps``), per seed: AbsRel and its best-constant reference, ATE, ATE
  with the IMU shuffled across the test set (V2), the zero-motion / constant-velocity references, and the
  frame-to-frame rotation error RPE-rot (degrees; also IMU-shuffled and zero-motion). With one
  seed both models start from identical vision weights, so the difference is the IMU path alone.
* ``classify_lesions``: PiT vs plain ViT (class-weighted CE, the shipped configs), per seed.
* ``fps_depth_pose_vibration``: depth + pose + vibration inference, batch 1, at 64×80 and 256×320.

    python benchmarks/capsule/capsule.py [--seeds 3] [--depth-steps 300] [--cls-steps 300] [--jobs 3] [--part all] [--quick]

Runs are independent processes (``--jobs`` at a time, one thread each); fps is measured alone at the end.
On a shared machine absolute figures drift; compare within one JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DEPTH_SMALL = ["data.height=32", "data.width=48", "data.vibration=high", "recipe.log_images=false"]
KEYS_D = ["eval/abs_rel", "eval/abs_rel_best_constant", "eval/ate", "eval/ate_imu_shuffled",
          "eval/ate_zero_motion", "eval/ate_constant_velocity", "eval/rpe_rot_deg", "eval/rpe_rot_deg_imu_shuffled",
          "eval/rpe_rot_deg_zero_motion"]
KEYS_C = ["eval/accuracy", "eval/balanced_accuracy", "eval/macro_f1", "eval/mcc", "eval/majority_accuracy"]


def _run(job: tuple[str, str, list[str]]) -> tuple[str, dict]:
    """One training run from a shipped config (in a worker process, one thread)."""
    name, config, overrides = job
    torch.set_num_threads(1)
    from plait.config import load_config
    from plait.run import execute

    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "capsule" / config,
                          [f"run.out_dir={tmp}", "run.progress=false", "run.eval_every=0", *overrides])
        final = execute(cfg).summary["final_eval"]
    print(f"{name} {' '.join(overrides)}: {time.perf_counter() - t:.0f}s", file=sys.stderr)
    return name, final


def fps(height: int, width: int, depth_width: int, blocks: list[int], repeats: int) -> float:
    from plait.plugins.capsule.depthnet import build_v2_sfmlearner

    m = build_v2_sfmlearner(height=height, width=width, depth_width=depth_width, depth_blocks=blocks,
                            pose_width=depth_width, pose_blocks=blocks, imu_window=10, vibration=True).eval()
    a, b, imu = torch.rand(1, 3, height, width), torch.rand(1, 3, height, width), torch.randn(1, 6, 10)
    with torch.no_grad():
        m.depth(a), m.pose(a, b, imu)
        t = time.perf_counter()
        for _ in range(repeats):
            m.depth(a), m.pose(a, b, imu)
    return repeats / (time.perf_counter() - t)


def _table(runs: list[tuple[str, dict]], keys: list[str]) -> dict:
    out: dict = {}
    for name, final in runs:
        for k in keys:
            if k in final:
                out.setdefault(name, {}).setdefault(k, []).append(round(final[k], 4))
    for metrics in out.values():
        metrics.update({f"{k}_mean": round(float(np.mean(v)), 4) for k, v in list(metrics.items())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--depth-steps", type=int, default=300)
    ap.add_argument("--cls-steps", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=3)
    ap.add_argument("--part", choices=("all", "depth", "classify"), default="all", help="which training runs")
    ap.add_argument("--quick", action="store_true", help="fps only")
    args = ap.parse_args()
    out: dict = {"torch": torch.__version__}
    if not args.quick:
        jobs = []
        for seed in range(args.seeds):
            s = [f"run.seed={seed}", f"model.seed={seed}", f"data.seed={seed}"]
            for name, extra in [("v2", []), ("vision_only", ["model.vibration=false"])][:2 * (args.part != "classify")]:
                jobs.append((f"depth:{name}", "depth_v2.yaml",
                             s + DEPTH_SMALL + [f"run.steps={args.depth_steps}"] + extra))
            for name, cfg in [("pit", "classify_pit.yaml"), ("vit", "classify_vit.yaml")][:2 * (args.part != "depth")]:
                jobs.append((f"classify:{name}", cfg, s + [f"run.steps={args.cls_steps}"]))
        t = time.perf_counter()
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(_run, jobs))
        out["training_wall_seconds"] = round(time.perf_counter() - t, 1)
        out["depth_high_vibration"] = _table([(n.split(":")[1], r) for n, r in results if n.startswith("depth")], KEYS_D)
        out["classify_lesions"] = _table([(n.split(":")[1], r) for n, r in results if n.startswith("classify")], KEYS_C)
    torch.set_num_threads(1)
    out["threads"] = torch.get_num_threads()
    out["fps_depth_pose_vibration"] = {
        "64x80_tiny(w16,[1,1,1])": round(fps(64, 80, 16, [1, 1, 1], 20), 2),
        "256x320_tiny(w16,[1,1,1])": round(fps(256, 320, 16, [1, 1, 1], 10), 2),
        "256x320_resnet18(w64,[2,2,2,2])": round(fps(256, 320, 64, [2, 2, 2, 2], 5), 2),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
