"""Step time of the ZO2 engine vs plain in-place MeZO on CPU, interleaved in one process.

Measures the median wall time of one ZO step (two forward passes + perturbation draws + update) for:

    mezo            ``InPlaceMeZO`` (the baseline: every parameter in place)
    zo2             ``ZO2Engine``, every block streamed from host memory, fp32 storage, overlap on, bucket on
    zo2_no_overlap  the same with overlap off (transfers inline)
    zo2_no_bucket   the same with bucket off (one copy per tensor instead of one flat buffer per block)
    zo2_fp16        the same with fp16 host storage
    zo2_disk        the same with blocks memory-mapped from safetensors shards in a temp dir (disk tier)

All variants take the same model (same seed), the same batches and the same step seeds; they run interleaved
(round r: every variant does step r, the starting variant rotating each round) to spread drift over all of
them. The first ``--warmup`` rounds are not timed in the summary (ZO2's first step has no pending lazy
update yet). Reports the median step time, tokens/s (batch*seq training tokens per step) and the ratios
variant/mezo (goals: zo2 <= 1.10 host tier, zo2_disk <= 1.5), plus whether each fp32 variant's losses equal
MeZO's exactly (they should: the engines agree bit for bit). Nothing is asserted.

Run (from the repository root; the defaults take 1-2 minutes on 2 cores):

    .venv/bin/python benchmarks/zo_speed.py                       # OPT "small", batch 8, seq 128, 2+15 rounds
    .venv/bin/python benchmarks/zo_speed.py --size 100m --steps 3  # larger model (~20 s per step per variant)
    .venv/bin/python benchmarks/zo_speed.py --variants mezo,zo2

One JSON object is printed on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

VARIANTS = ("mezo", "zo2", "zo2_no_overlap", "zo2_no_bucket", "zo2_fp16", "zo2_disk")
ZO2_OPTIONS = {
    "zo2": {},
    "zo2_no_overlap": {"overlap": False},
    "zo2_no_bucket": {"bucket": False},
    "zo2_fp16": {"storage_dtype": "fp16"},
    "zo2_disk": {"disk_dir": "TEMP"},
}
GOALS = {"zo2": "<= 1.10 (host tier)", "zo2_disk": "<= 1.5 (disk tier)"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="opt", choices=["opt", "qwen3", "llama"])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "100m"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2, help="rounds not counted")
    ap.add_argument("--steps", type=int, default=15, help="timed rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--disk-root", default=None, help="parent directory of the temp shard directory")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from _common import LR, RUN_SEED, build_model, choose_variants, emit, log, make_batch, make_mezo, zo2_engine
    from plait.plugins.zo2.mezo import InPlaceMeZO, step_seed

    chosen = choose_variants(args.variants, VARIANTS, ("mezo",))

    t_start = time.perf_counter()
    disk_dir = None
    engines, vocab, n_params = {}, None, None
    try:
        for v in chosen:
            model, vocab = build_model(args.arch, args.size)
            n_params = sum(p.numel() for p in model.parameters())
            if v == "mezo":
                engines[v] = InPlaceMeZO(model, torch.device("cpu"), make_mezo())
            else:
                opts = dict(ZO2_OPTIONS[v])
                if opts.get("disk_dir") == "TEMP":
                    disk_dir = tempfile.mkdtemp(prefix="plait-zo-speed-", dir=args.disk_root)
                    opts["disk_dir"] = disk_dir
                engines[v] = zo2_engine(model, make_mezo(), **opts)
        log(f"[zo_speed] built {len(engines)} engines ({args.arch} {args.size}, {n_params / 1e6:.1f}M params) "
            f"in {time.perf_counter() - t_start:.1f}s")

        times = {v: [] for v in chosen}
        losses = {v: [] for v in chosen}
        rounds = args.warmup + args.steps
        for r in range(rounds):
            batch = make_batch(r, args.batch, args.seq, vocab)
            seed = step_seed(RUN_SEED, r)
            order = chosen[r % len(chosen):] + chosen[: r % len(chosen)]
            for v in order:
                t0 = time.perf_counter()
                ls, _ = engines[v].step(batch, seed, LR)
                times[v].append(time.perf_counter() - t0)
                losses[v].append(ls)
            tag = "warm-up" if r < args.warmup else "timed"
            log(f"[zo_speed] round {r} ({tag}): " + ", ".join(f"{v} {times[v][-1]:.2f}s" for v in chosen))
        for eng in engines.values():
            eng.close()
    finally:
        if disk_dir:
            shutil.rmtree(disk_dir, ignore_errors=True)

    tokens = args.batch * args.seq
    results = {}
    for v in chosen:
        timed = times[v][args.warmup:]
        med = statistics.median(timed)
        results[v] = {
            "median_step_s": round(med, 4),
            "min_step_s": round(min(timed), 4),
            "mean_step_s": round(statistics.fmean(timed), 4),
            "tokens_per_s": round(tokens / med, 1),
            "step_s": [round(t, 4) for t in times[v]],
        }
        if v != "mezo":
            results[v]["losses_equal_mezo"] = losses[v] == losses["mezo"]
            if v == "zo2_fp16":
                results[v]["max_abs_loss_diff_vs_mezo"] = max(abs(a - b) for la, lb in zip(losses[v], losses["mezo"])
                                                              for a, b in zip(la, lb))
    base = results["mezo"]["median_step_s"]
    ratios = {f"{v}/mezo": {"step_time": round(results[v]["median_step_s"] / base, 3),
                            **({"goal": GOALS[v]} if v in GOALS else {})}
              for v in chosen if v != "mezo"}
    emit({
        "benchmark": "zo_speed",
        "config": {"arch": args.arch, "size": args.size, "dtype": "float32", "init": "random", "batch": args.batch,
                   "seq": args.seq, "warmup": args.warmup, "steps": args.steps, "threads": args.threads,
                   "device": "cpu", "n_params": n_params},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "variants": results,
        "ratios": ratios,
        "notes": ["step_s lists every round, warm-up included; median/min/mean and ratios use the timed rounds",
                  "tokens_per_s = batch*seq / median step time (each step runs 2 forward passes over them)",
                  "on CPU the 'device' copy is another host tensor: the host tier measures copy + fusion "
                  "overhead, not PCIe"],
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    })


if __name__ == "__main__":
    main()
