"""Capsule benchmark: training metrics (V2 vs vision-only on the high-vibration tube, PiT vs ViT with weighted
CE) over seeds, and inference frames/s of depth + pose + vibration at 64×80 and 256×320 (ResNet-18 widths need a multiple of
32, so 64×80 uses the tiny 3-stage nets). Prints one JSON object.

    python benchmarks/capsule.py [--seeds 3] [--depth-steps 300] [--cls-steps 400] [--quick]

Ratios are measured side by side in one process; on a shared machine absolute figures drift.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def _run(config: str, overrides: list[str]) -> dict:
    from plait.config import load_config
    from plait.run import execute

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(REPO / "configs" / "capsule" / config, [f"run.out_dir={tmp}", "run.progress=false",
                                                                  "run.eval_every=0", *overrides])
        run = execute(cfg)
        return run.summary["final_eval"]


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--depth-steps", type=int, default=300)
    ap.add_argument("--cls-steps", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="fps only")
    args = ap.parse_args()
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    out["fps_depth_pose_vibration"] = {
        "64x80_tiny(w16,[1,1,1])": fps(64, 80, 16, [1, 1, 1], 20),
        "256x320_tiny(w16,[1,1,1])": fps(256, 320, 16, [1, 1, 1], 10),
        "256x320_resnet18(w64,[2,2,2,2])": fps(256, 320, 64, [2, 2, 2, 2], 5),
    }
    if not args.quick:
        depth, cls = {}, {}
        for seed in range(args.seeds):
            s = [f"run.seed={seed}", f"model.seed={seed}"]
            for name, extra in [("v2", []), ("vision_only", ["model.vibration=false"])]:
                print(f"depth {name} seed {seed}", file=sys.stderr)
                depth.setdefault(name, []).append(_run("depth_v2.yaml", s + [f"run.steps={args.depth_steps}"] + extra))
            for name, cfg in [("pit", "classify_pit.yaml"), ("vit", "classify_vit.yaml")]:
                print(f"classify {name} seed {seed}", file=sys.stderr)
                cls.setdefault(name, []).append(_run(cfg, s + [f"run.steps={args.cls_steps}"]))
        keys_d = ["eval/abs_rel", "eval/abs_rel_best_constant", "eval/ate", "eval/ate_imu_shuffled",
                  "eval/ate_zero_motion", "eval/ate_constant_velocity"]
        keys_c = ["eval/accuracy", "eval/balanced_accuracy", "eval/macro_f1", "eval/mcc", "eval/majority_accuracy"]
        out["depth_high_vibration"] = {n: {k: [r.get(k) for r in rs] for k in keys_d} for n, rs in depth.items()}
        out["classify_lesions"] = {n: {k: [r.get(k) for r in rs] for k in keys_c} for n, rs in cls.items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
