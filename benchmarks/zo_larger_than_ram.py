"""ZO fine-tuning of a model larger than RAM: ZO2's disk tier on an OPT-13B-shaped fp16 model (manual, minutes).

The CPU-only analogue of OPT-175B on an 18 GB GPU: ~26 GB of fp16 block shards on disk, a 24 GiB / 2-core
machine, peak RSS kept under a third of the model's bytes. Step 1 writes the shards block by block
(scripts/make_shards.py logic; skipped if the directory already holds them); step 2 runs ZO2 steps in a child
process streaming every block from the memory-mapped shards, and reports seconds per step and peak RSS.

    python benchmarks/zo_larger_than_ram.py --dir /var/tmp/plait-opt13b            # OPT-13B shape
    python benchmarks/zo_larger_than_ram.py --dir /tmp/x --layers 4 --steps 2       # a quick look

Prints one JSON object. Nothing is asserted; the figures go into docs/zo2.md.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

OPT_13B = {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "ffn_dim": 20480,
           "word_embed_proj_dim": 5120, "max_position_embeddings": 2048}


def child(args) -> None:
    import torch

    from plait.plugins.zo2.fused import ZO2Engine
    from plait.plugins.zo2.mezo import MeZO, step_seed
    from plait.plugins.zo2.shards import load_sharded_model

    torch.set_num_threads(2)
    model, _ = load_sharded_model(args.dir)
    work = Path(args.dir) / "work"  # the engine trains a working copy; the source shards stay as written
    work.mkdir(exist_ok=True)
    mezo = MeZO(eps=1e-3, lr=1e-6, weight_decay=0.0, distribution="gaussian", q=1, one_sided=False,
                no_decay=["bias", "norm"], schedule="constant", warmup_steps=0)
    eng = ZO2Engine(model, torch.device("cpu"), mezo, blocks=None, overlap=True, bucket=True, storage_dtype="fp16",
                    pin_memory=False, disk_dir=str(work))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (1, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times, losses = [], []
    for t in range(args.steps):
        t0 = time.perf_counter()
        l, _ = eng.step(batch, step_seed(0, t), 1e-6)
        times.append(time.perf_counter() - t0)
        losses.append(l)
        print(f"step {t}: {times[-1]:.1f}s loss {l}", file=sys.stderr, flush=True)
    eng.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds_per_step": times, "losses": losses, "peak_rss_bytes": rss}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp/plait-opt13b", help="shard directory (outside the repository)")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    from plait.plugins.zo2.shards import MANIFEST, write_sharded_model

    out = Path(args.dir)
    config = dict(OPT_13B, num_hidden_layers=args.layers)
    t0 = time.time()
    if not (out / MANIFEST).exists():
        write_sharded_model(out, "opt", "tiny", config, storage_dtype="fp16", seed=0,
                            progress=lambda i, n: print(f"\rwriting block {i}/{n}", end="", file=sys.stderr))
        print(file=sys.stderr)
    write_seconds = time.time() - t0
    write_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    proc = subprocess.run([sys.executable, __file__, "--child", "--dir", str(out), "--steps", str(args.steps),
                           "--seq", str(args.seq)], capture_output=True, text=True)
    sys.stderr.write(proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
    steps = result.get("seconds_per_step", [])
    print(json.dumps({
        "model": f"OPT-13B shape, {args.layers} layers, fp16 shards", "model_bytes": model_bytes,
        "write_seconds": round(write_seconds, 1), "write_peak_rss_bytes": write_rss,
        "train_peak_rss_bytes": result.get("peak_rss_bytes"),
        "train_rss_over_model": (result["peak_rss_bytes"] / model_bytes) if "peak_rss_bytes" in result else None,
        "seconds_per_step_median": sorted(steps)[len(steps) // 2] if steps else None,
        "seconds_per_step": steps, "losses": result.get("losses"), "error": result.get("error"),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
