"""Peak host memory (RSS) of zeroth-order training vs inference and first-order AdamW, on CPU.

Measures, for the same model (default: OPT preset "100m", random init, fp32) and the same data (random token
ids, labels = ids with the first half masked), the peak RSS of one child process per variant:

    baseline       imports torch, transformers (with the arch's modeling module) and plait, loads the
                   tokenizer, builds no model (subtracted to give "above baseline")
    inference      forward passes only (torch.no_grad), one per batch
    mezo           plain in-place MeZO steps (``InPlaceMeZO``)
    zo2_host_fp32  ``ZO2Engine``, every block streamed from host memory, fp32 storage
    zo2_host_fp16  the same with fp16 storage
    zo2_disk       ``ZO2Engine`` with ``disk_dir`` = a fresh temp dir (memory-mapped block shards)
    adamw          first order: loss.backward() + torch.optim.AdamW step

Each child reports ru_maxrss (peak over its whole life, model build included) and, separately, the peak
during the steps only (VmHWM reset through /proc/self/clear_refs after the model and engine are built), so a
build-time peak (e.g. the full fp32 model that ZO2 copies into fp16 or disk storage) can be told apart from
the training-time peak. Ratios: mezo/inference (goal <= 1.1), zo2_host/mezo, zo2_disk/model_bytes, adamw/mezo,
both raw and above baseline. Timings are printed for information only; nothing is asserted.

Run (from the repository root; the defaults take 4-7 minutes on 2 cores, mostly the 100m steps):

    .venv/bin/python benchmarks/zo2/zo_memory.py                      # 100m, batch 8, seq 128, 2 steps
    .venv/bin/python benchmarks/zo2/zo_memory.py --size small --steps 2  # quick check
    .venv/bin/python benchmarks/zo2/zo_memory.py --variants baseline,mezo,zo2_disk

One JSON object is printed on stdout; progress goes to stderr.

Disk tier: by default (``--disk-source shards``) the shards are written by ``scripts/make_shards.py`` in a
separate process first, the child builds the model from them without materializing it, and the engine trains
a block-by-block working copy (``<disk_dir>/work``), never the source shards. With ``--disk-source
materialize`` the child builds the whole model in RAM and ``ZO2Engine(disk_dir=…)`` writes the working shards
from it, so its build holds the full model (``after_build_rss`` and ``step_peak`` show what streaming costs
once the model is released).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # benchmarks/: _common.py, _stable.py
REPO = HERE.parent
sys.path.insert(0, str(HERE))

# How the zo2_disk child gets its model and shards — THE one-line switch:
#   "materialize": build the full model in RAM; ZO2Engine writes the shards from it (today's only way).
#   "shards":      shards pre-written by scripts/make_shards.py in a separate process; the child builds the
#                  model from the shard directory (``build_causal_lm(path=disk_dir)``) without materializing it.
DISK_SOURCE = "shards"

VARIANTS = ("baseline", "inference", "mezo", "zo2_host_fp32", "zo2_host_fp16", "zo2_disk", "adamw")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="opt", choices=["opt", "qwen3", "llama"])
    ap.add_argument("--size", default="100m", choices=["tiny", "small", "100m"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2,
                    help="steps (batches) per variant; the peak is reached by step 2 (ZO2's lazy update and "
                         "AdamW's state both appear then)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--disk-storage", default="fp32", choices=["fp32", "fp16"], help="storage dtype of the disk shards")
    ap.add_argument("--disk-source", default=DISK_SOURCE, choices=["materialize", "shards"])
    ap.add_argument("--disk-root", default=None, help="parent directory of the temp shard directory (default: system temp)")
    # internal: run one variant in this process and print its figures
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--disk-dir", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# --- child: one variant ----------------------------------------------------------------------------------------
def _model_for_disk(args):
    """(model, vocab, engine kwargs) for the zo2_disk child, according to ``--disk-source``."""
    from _common import build_model

    if args.disk_source == "materialize":
        model, vocab = build_model(args.arch, args.size)
        return model, vocab, dict(disk_dir=args.disk_dir)
    # "shards": built from the shard directory without materializing the blocks (model family zo2_shards)
    from plait.plugins.zo2.shards import load_sharded_model

    model, _ = load_sharded_model(args.disk_dir)
    work = Path(args.disk_dir) / "work"  # the engine trains a working copy; the source shards stay as written
    work.mkdir(exist_ok=True)
    return model, model.config.vocab_size, dict(disk_dir=str(work))


def run_child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import importlib

    import transformers  # noqa: F401  (the baseline imports what every variant imports)

    import plait.plugins.basics.models  # noqa: F401
    import plait.plugins.zo2.fused  # noqa: F401
    from plait.plugins.basics.tokenizer import load_tokenizer

    # imported lazily by transformers on the first build (~100 MiB): part of the baseline, not of the model
    importlib.import_module(f"transformers.models.{args.arch}.modeling_{args.arch}")
    load_tokenizer()
    from _common import (
        LR,
        RUN_SEED,
        block_bytes,
        build_model,
        hwm_kib,
        log,
        make_batch,
        make_mezo,
        maxrss_kib,
        model_bytes,
        reset_hwm,
        rss_kib,
        zo2_engine,
    )

    from plait.plugins.zo2.mezo import InPlaceMeZO, lm_loss, step_seed

    v = args.variant
    out = {"variant": v}
    if v == "baseline":
        out.update(peak_rss_kib=maxrss_kib(), end_rss_kib=rss_kib(), step_peak_rss_kib=None)
        return out

    t0 = time.perf_counter()
    if v == "zo2_disk":
        model, vocab, disk_kwargs = _model_for_disk(args)
    else:
        model, vocab = build_model(args.arch, args.size)
    out["model_bytes"] = model_bytes(model)
    out["block_bytes"] = block_bytes(model)
    out["n_params"] = sum(p.numel() for p in model.parameters())

    step = None
    if v == "inference":
        model.requires_grad_(False)

        def step(b, t):
            with torch.no_grad():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
                return [float(lm_loss(logits, b["labels"]))]
    elif v == "mezo":
        eng = InPlaceMeZO(model, torch.device("cpu"), make_mezo())
        step = lambda b, t: eng.step(b, step_seed(RUN_SEED, t), LR)[0]  # noqa: E731
    elif v in ("zo2_host_fp32", "zo2_host_fp16", "zo2_disk"):
        if v == "zo2_disk":
            kw = dict(storage_dtype=args.disk_storage, **disk_kwargs)
        else:
            kw = dict(storage_dtype=v.rsplit("_", 1)[1])
        eng = zo2_engine(model, make_mezo(), **kw)
        step = lambda b, t: eng.step(b, step_seed(RUN_SEED, t), LR)[0]  # noqa: E731
    elif v == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(b, t):
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits,
                           b["labels"])
            loss.backward()
            opt.step()
            return [float(loss.detach())]
    else:
        raise SystemExit(f"unknown variant {v!r}")
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["after_build_rss_kib"] = rss_kib()
    out["build_peak_rss_kib"] = maxrss_kib()
    hwm_ok = reset_hwm()

    batches = [make_batch(t, args.batch, args.seq, vocab) for t in range(args.steps)]
    losses, times = [], []
    for t, b in enumerate(batches):
        ts = time.perf_counter()
        losses.append(step(b, t))
        times.append(round(time.perf_counter() - ts, 2))
        log(f"  {v}: step {t} {times[-1]:.2f}s loss {losses[-1][0]:.4f} rss {rss_kib() / 1024:.0f} MiB")
    out.update(step_s=times, losses=losses, end_rss_kib=rss_kib(), peak_rss_kib=maxrss_kib(),
               step_peak_rss_kib=hwm_kib() if hwm_ok else None)
    if v == "zo2_disk":
        out["shard_bytes"] = sum(f.stat().st_size for f in Path(args.disk_dir).glob("*.safetensors"))
        out["disk_source"] = args.disk_source
    return out


# --- parent: one child per variant ----------------------------------------------------------------------------
def _child_argv(args, variant: str, disk_dir: str | None) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--arch", args.arch, "--size",
            args.size, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--threads",
            str(args.threads), "--disk-storage", args.disk_storage, "--disk-source", args.disk_source]
    if disk_dir:
        argv += ["--disk-dir", disk_dir]
    return argv


def _make_shards(args, disk_dir: str) -> None:
    """``--disk-source shards``: write the shards in a separate process, so the measured child never holds the
    whole model."""
    cmd = [sys.executable, str(REPO / "scripts" / "make_shards.py"), "--arch", args.arch, "--size", args.size,
           "--dtype", args.disk_storage, "--out", disk_dir]
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def run_variant(args, variant: str) -> dict:
    from _common import log, run_json_child

    disk_dir = None
    try:
        if variant == "zo2_disk":
            disk_dir = tempfile.mkdtemp(prefix="plait-zo-memory-", dir=args.disk_root)
            if args.disk_source == "shards":
                _make_shards(args, disk_dir)
        log(f"[zo_memory] variant {variant} ...")
        return run_json_child(_child_argv(args, variant, disk_dir), variant, REPO)
    finally:
        if disk_dir:
            shutil.rmtree(disk_dir, ignore_errors=True)


def summarize(args, results: dict) -> dict:
    from _common import cpu_machine, mib, ratio, rss_entry, rss_ratio

    base = results.get("baseline", {}).get("peak_rss_kib")
    model_b = next((r["model_bytes"] for r in results.values() if "model_bytes" in r), None)
    block_b = next((r["block_bytes"] for r in results.values() if "block_bytes" in r), None)
    n_params = next((r["n_params"] for r in results.values() if "n_params" in r), None)
    variants = {}
    for v, r in results.items():
        if "error" in r:
            variants[v] = {"error": r["error"]}
            continue
        variants[v] = {
            **rss_entry(r, base),
            "end_rss_mib": mib(r.get("end_rss_kib")),
            "build_s": r.get("build_s"),
            "step_s": r.get("step_s"),
            "wall_s": r.get("wall_s"),
            "mean_loss_per_step": [round(sum(ls) / len(ls), 5) for ls in r.get("losses", [])] or None,
        }
        for k in ("shard_bytes", "disk_source"):
            if k in r:
                variants[v][k] = r[k]

    def pair(num, den, key):
        return rss_ratio(results, num, den, key, base)

    def to_model(v, key):
        r = results.get(v, {})
        a = None if "error" in r else r.get(key)
        if a is None or model_b is None:
            return {"raw": None, "above_baseline": None}
        return {"raw": ratio(a * 1024, model_b), "above_baseline": ratio((a - base) * 1024, model_b) if base else None}

    def ratios(key):
        return {
            "mezo/inference": {**pair("mezo", "inference", key), "goal": "<= 1.1"},
            "zo2_host_fp32/mezo": pair("zo2_host_fp32", "mezo", key),
            "zo2_host_fp16/mezo": pair("zo2_host_fp16", "mezo", key),
            "zo2_disk/model_bytes": to_model("zo2_disk", key),
            "zo2_disk/mezo": pair("zo2_disk", "mezo", key),
            "adamw/mezo": pair("adamw", "mezo", key),
            "inference/model_bytes": to_model("inference", key),
            "mezo/model_bytes": to_model("mezo", key),
        }

    return {
        "benchmark": "zo_memory",
        "config": {"arch": args.arch, "size": args.size, "dtype": "float32", "init": "random", "batch": args.batch,
                   "seq": args.seq, "steps": args.steps, "threads": args.threads, "disk_storage": args.disk_storage,
                   "disk_source": args.disk_source},
        "machine": cpu_machine(),
        "date": time.strftime("%Y-%m-%d"),
        "baseline_rss_mib": mib(base),
        "n_params": n_params,
        "model_bytes": model_b,
        "model_mib": None if model_b is None else round(model_b / 2**20, 1),
        "block_bytes": block_b,
        "variants": variants,
        "ratios": ratios("peak_rss_kib"),
        "ratios_step_phase": ratios("step_peak_rss_kib"),
        "notes": [
            "peak = ru_maxrss of the child over its whole life (model build included)",
            "step_peak = VmHWM reset after the model/engine are built: the peak during the steps only",
            "zo2_disk with disk_source=materialize builds the full fp32 model in RAM before writing the shards, "
            "so its build holds the whole model; the peak is the larger of that and step_peak",
            "all variants run the model in eval mode (no dropout), as the zo recipe does",
        ],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(run_child(args)), flush=True)
        return
    from _common import run_variants

    run_variants("zo_memory", args, VARIANTS, ("baseline",), run_variant, summarize)


if __name__ == "__main__":
    main()
