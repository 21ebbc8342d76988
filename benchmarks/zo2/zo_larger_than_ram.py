"""ZO fine-tuning of a model larger than RAM: ZO2's disk tier on an OPT-13B-shaped fp16 model (manual, minutes).

The CPU-only analogue of OPT-175B on an 18 GB GPU: ~26 GB of fp16 block shards on disk, a 24 GiB / 2-core
machine, peak RSS kept under a third of the model's bytes. Step 1 writes the shards block by block
(scripts/make_shards.py logic; skipped if the directory already holds them); step 2 runs ZO2 steps in a child
process streaming every block from the memory-mapped shards, and reports seconds per step and peak RSS.

    python benchmarks/zo2/zo_larger_than_ram.py --dir /var/tmp/plait-opt13b            # OPT-13B shape
    python benchmarks/zo2/zo_larger_than_ram.py --dir /tmp/x --layers 4 --steps 2       # a quick look
    nice -n 19 python benchmarks/zo2/zo_larger_than_ram.py --dir /var/tmp/plait-opt13b --steps 1 --dp   # DP-ZO

``--dp``: private zeroth-order steps (``dp_zo``, plugins/flashdp/dp_zo.py) through the same disk tier. The data
is ``--dp-n`` random token sequences of ``--seq`` tokens (the second half as completion); each step's batch is
Poisson-sampled at rate ``--batch`` / ``--dp-n``; each example's projected gradient comes from the engine's
own two streamed passes (no extra forward), is clipped to ``--dp-clip`` and gets Gaussian noise whose σ is
searched for ``--dp-epsilon`` at δ = 1e-5 over ``--steps`` steps; an empty batch applies the noise alone.
The JSON adds ε (the RDP accountant's, after the steps run), σ, the batch sizes and the clipped fraction.

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
    g = torch.Generator().manual_seed(0)
    dp = private = None
    if args.dp:
        from plait.plugins.flashdp.dp_zo import DPZO, PrivateMeZO

        dp = DPZO(max_grad_norm=args.dp_clip, noise_multiplier=None, target_epsilon=args.dp_epsilon, delta=1e-5,
                  allow_no_privacy=False, poisson=True)
        dp.prepare_zo(dataset_size=args.dp_n, batch_size=args.batch, steps=args.steps, seed=0, perturbations=1)
        private = PrivateMeZO(mezo, dp)
        data = torch.randint(4, 1000, (args.dp_n, args.seq), generator=g)
        labels = data.clone()
        labels[:, : args.seq // 2] = -100
        mezo = private
    eng = ZO2Engine(model, torch.device("cpu"), mezo, blocks=None, overlap=True, bucket=True, storage_dtype="fp16",
                    pin_memory=False, disk_dir=str(work))
    ids = torch.randint(4, 1000, (1, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times, losses, sizes = [], [], []
    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    for t in range(args.steps):
        t0 = time.perf_counter()
        if dp is not None:
            idx = dp.batch_indices(t + 1)
            private.step_index = t + 1
            sizes.append(len(idx))
            if not idx:  # an empty Poisson batch still releases its noise
                eng.apply_update(step_seed(0, t), private.noise_only(), 1e-6)
                l = []  # no forward ran
            else:
                batch = {"input_ids": data[idx], "attention_mask": torch.ones_like(data[idx]), "labels": labels[idx]}
                l, _ = eng.step(batch, step_seed(0, t), 1e-6)
        else:
            l, _ = eng.step(batch, step_seed(0, t), 1e-6)
        times.append(time.perf_counter() - t0)
        losses.append(l)
        print(f"step {t}: {times[-1]:.1f}s loss {l}", file=sys.stderr, flush=True)
    eng.close()
    if prof is not None:
        import io
        import pstats

        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
        Path(args.profile).write_text(text.getvalue())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"seconds_per_step": times, "losses": losses, "peak_rss_bytes": rss}
    if dp is not None:
        out.update({"epsilon": dp.epsilon(), "delta": dp.delta, "noise_multiplier": float(dp.sigma),
                    "sample_rate": dp.q, "batch_sizes": sizes, "clip": dp.C,
                    "clipped_fraction": (sum(dp.clipped) / len(dp.clipped)) if dp.clipped else None})
    print(json.dumps(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/var/tmp/plait-opt13b", help="shard directory (outside the repository)")
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--dp", action="store_true", help="DP-ZO steps (dp_zo) instead of plain ZO")
    ap.add_argument("--dp-epsilon", type=float, default=8.0, help="target ε at δ 1e-5 over --steps steps")
    ap.add_argument("--dp-clip", type=float, default=1.0, help="C: each example's projected gradient clip")
    ap.add_argument("--dp-n", type=int, default=64, help="examples in the private data set")
    ap.add_argument("--batch", type=int, default=2, help="expected batch size (Poisson rate batch / dp-n)")
    ap.add_argument("--profile", default=None, help="write a cProfile table (by own time) of the steps here")
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
    dp_args = ["--dp", "--dp-epsilon", str(args.dp_epsilon), "--dp-clip", str(args.dp_clip), "--dp-n",
               str(args.dp_n), "--batch", str(args.batch)] if args.dp else []
    proc = subprocess.run([sys.executable, __file__, "--child", "--dir", str(out), "--steps", str(args.steps),
                           "--seq", str(args.seq), *dp_args,
                           *(["--profile", str(Path(args.profile).resolve())] if args.profile else [])], capture_output=True, text=True)
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
        **({"dp_zo": {k: result.get(k) for k in ("epsilon", "delta", "noise_multiplier", "sample_rate", "clip",
                                                 "batch_sizes", "clipped_fraction")}} if args.dp else {}),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
