"""Step time of the ZO2 engine vs plain in-place MeZO on CPU, interleaved in one process.

Measures the median wall time of one ZO step (two forward passes + perturbation draws + update) for:

    mezo            ``InPlaceMeZO`` (the baseline: every parameter in place)
    mezo_4draw      the same as before issue 23's hot-spot work: restore and update as separate passes (z drawn
                    four times per parameter and step), every draw on the calling thread (no draw pool)
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

    .venv/bin/python benchmarks/zo2/zo_speed.py                       # OPT "small", batch 8, seq 128, 2+15 rounds
    .venv/bin/python benchmarks/zo2/zo_speed.py --size 100m --steps 3  # larger model (~20 s per step per variant)
    .venv/bin/python benchmarks/zo2/zo_speed.py --variants mezo,zo2

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

HERE = Path(__file__).resolve().parents[1]  # benchmarks/: _common.py, _stable.py
sys.path.insert(0, str(HERE))

VARIANTS = ("mezo", "mezo_4draw", "zo2", "zo2_no_overlap", "zo2_no_bucket", "zo2_fp16", "zo2_disk")
ZO2_OPTIONS = {
    "zo2": {},
    "zo2_no_overlap": {"overlap": False},
    "zo2_no_bucket": {"bucket": False},
    "zo2_fp16": {"storage_dtype": "fp16"},
    "zo2_disk": {"disk_dir": "TEMP"},
}
GOALS = {"zo2": ("<=", 1.10), "zo2_disk": ("<=", 1.5)}  # vs MeZO (mezo_4draw/mezo > 1: what the hot-spot work saved)
FLOOR_GOALS = {"mezo": ("<=", 1.05), "zo2": ("<=", 1.05), "zo2_disk": ("<=", 1.5)}  # vs the floor


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="opt", choices=["opt", "qwen3", "llama"])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "100m"])
    ap.add_argument("--shape", default=None, choices=["opt-1.3b"],
                    help="a published block shape on top of --size (opt-1.3b: 24 blocks of d 2048, ffn 8192; "
                         "~1.2B params, ~4.8 GB fp32 per variant's model: minutes per round on 2 cores)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2, help="rounds not counted")
    ap.add_argument("--steps", type=int, default=15, help="timed rounds at least")
    ap.add_argument("--max-rounds", type=int, default=40, help="timed rounds at most (until ratios settle)")
    ap.add_argument("--max-seconds", type=float, default=240.0, help="stop adding rounds after this")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--disk-root", default=None, help="parent directory of the temp shard directory")
    return ap.parse_args(argv)


def io_floor_s(folder: str, nbytes: int) -> dict:
    """Seconds to read and write ``nbytes`` once, sequentially, in ``folder`` (the disk tier's I/O floor).

    A file of ``nbytes`` is written (no fsync: the tier writes back through its memory maps, also without one)
    and read back in 8 MiB chunks, three times; the fastest of each is kept. On a machine whose page cache holds
    the shards this is memory bandwidth, as it is for the tier itself."""
    path = Path(folder) / "io-floor.bin"
    chunk = os.urandom(8 << 20)
    writes, reads = [], []
    try:
        for _ in range(3):
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                left = nbytes
                while left > 0:
                    f.write(chunk[:min(left, len(chunk))])
                    left -= len(chunk)
            writes.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with open(path, "rb", buffering=0) as f:
                while f.read(8 << 20):
                    pass
            reads.append(time.perf_counter() - t0)
    finally:
        path.unlink(missing_ok=True)
    w, r = min(writes), min(reads)
    return {"bytes": nbytes, "write_s": round(w, 4), "read_s": round(r, 4), "floor_s": round(w + r, 4),
            "write_gib_per_s": round(nbytes / w / 2**30, 2), "read_gib_per_s": round(nbytes / r / 2**30, 2)}


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from _common import (
        LR,
        RUN_SEED,
        block_bytes,
        build_model,
        choose_variants,
        emit,
        log,
        make_batch,
        make_mezo,
        zo2_engine,
    )
    from _stable import Interleaved

    from plait.plugins.zo2.mezo import InPlaceMeZO, step_seed

    chosen = choose_variants(args.variants, VARIANTS, ("mezo",))

    t_start = time.perf_counter()
    disk_dir = None
    engines, vocab, n_params = {}, None, None
    try:
        # two no-grad forwards: a ZO step's compute floor
        floor_model, vocab = build_model(args.arch, args.size, shape=args.shape)
        for v in chosen:
            model, vocab = build_model(args.arch, args.size, shape=args.shape)
            n_params = sum(p.numel() for p in model.parameters())
            if v == "mezo":
                engines[v] = InPlaceMeZO(model, torch.device("cpu"), make_mezo())
            elif v == "mezo_4draw":
                engines[v] = InPlaceMeZO(model, torch.device("cpu"), make_mezo(), fold_restore=False)
                engines[v].draw_pool.close()  # draws on the calling thread, as before the draw pool
            else:
                opts = dict(ZO2_OPTIONS[v])
                if opts.get("disk_dir") == "TEMP":
                    disk_dir = tempfile.mkdtemp(prefix="plait-zo-speed-", dir=args.disk_root)
                    opts["disk_dir"] = disk_dir
                engines[v] = zo2_engine(model, make_mezo(), **opts)
        log(f"[zo_speed] built {len(engines)} engines ({args.arch} {args.shape or args.size}, "
            f"{n_params / 1e6:.1f}M params) "
            f"in {time.perf_counter() - t_start:.1f}s")
        batches = {}

        def batch_of(r: int):
            if r not in batches:
                batches.clear()
                batches[r] = make_batch(r, args.batch, args.seq, vocab)
            return batches[r]

        def floor_step(r: int):
            with torch.no_grad():
                b = batch_of(r)
                return [floor_model(**b).loss.item(), floor_model(**b).loss.item()]

        def engine_step(v):
            return lambda r: engines[v].step(batch_of(r), step_seed(RUN_SEED, r), LR)[0]

        fns = {"floor": floor_step, **{v: engine_step(v) for v in chosen}}
        pairs = [(v, "floor") for v in chosen] + [(v, "mezo") for v in chosen if v != "mezo"]
        bench = Interleaved(fns, pairs=pairs, warmup=args.warmup, min_rounds=args.steps,
                            max_rounds=max(args.steps, args.max_rounds), max_seconds=args.max_seconds,
                            log=lambda m: log("[zo_speed] " + m)).run()
        io = io_floor_s(disk_dir, block_bytes(engines["zo2_disk"].model)) if "zo2_disk" in chosen else None
        for eng in engines.values():
            eng.close()
    finally:
        if disk_dir:
            shutil.rmtree(disk_dir, ignore_errors=True)

    tokens = args.batch * args.seq
    results = {"floor": bench.summary("floor", tokens)}
    losses = bench.results
    for v in chosen:
        results[v] = bench.summary(v, tokens)
        if v != "mezo":
            results[v]["losses_equal_mezo"] = losses[v] == losses["mezo"]  # mezo_4draw too: the same bits
            if v == "zo2_fp16":
                results[v]["max_abs_loss_diff_vs_mezo"] = max(abs(a - b) for la, lb in zip(losses[v], losses["mezo"])
                                                              for a, b in zip(la, lb))
    ratios = {f"{v}/mezo": bench.ratio(v, "mezo", GOALS.get(v)) for v in chosen if v != "mezo"}
    for v in chosen:
        if v != "zo2_disk":
            ratios[f"{v}/floor"] = bench.ratio(v, "floor", FLOOR_GOALS.get(v))
    if io is not None:
        # the disk tier's floor is the larger of its compute floor and its I/O floor; scale the floor variant's
        # rounds so that the bootstrap interval still pairs rounds
        compute = statistics.median(bench.times["floor"])
        scale = max(compute, io["floor_s"]) / compute
        ratios["zo2_disk/floor"] = {**bench.ratio("zo2_disk", "floor"), "floor": "max(io, compute)",
                                    "io_floor_s": io["floor_s"], "compute_floor_s": round(compute, 4)}
        r = ratios["zo2_disk/floor"]
        r["ratio"] = round(r["ratio"] / scale, 4)
        r["ci95"] = [round(x / scale, 4) for x in r["ci95"]]
        bound = FLOOR_GOALS["zo2_disk"][1]
        r["goal"] = f"<= {bound}"
        r["verdict"] = ("met" if r["settled"] and r["ci95"][1] <= bound else
                        "missed" if r["settled"] and r["ci95"][0] > bound else "unsettled")
    emit({
        "benchmark": "zo_speed",
        "config": {"arch": args.arch, "size": args.size, "shape": args.shape, "dtype": "float32", "init": "random",
                   "batch": args.batch,
                   "seq": args.seq, "warmup": args.warmup, "min_rounds": args.steps, "threads": args.threads,
                   "device": "cpu", "n_params": n_params},
        "machine": {**bench.machine(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "variants": results,
        "ratios": ratios,
        "io_floor": io,
        "notes": ["floor = two no-grad forwards of the same batch on the same model (a central-difference step's "
                  "compute); ratios are medians over timed rounds with a paired bootstrap 95% interval; "
                  "'unsettled' = interval wider than +-5% (or straddling the goal): not reported as met",
                  "tokens/s = batch*seq / median step time (each step runs 2 forward passes over them)",
                  "on CPU the 'device' copy is another host tensor: the host tier measures copy + fusion "
                  "overhead, not PCIe"],
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    })


if __name__ == "__main__":
    main()
