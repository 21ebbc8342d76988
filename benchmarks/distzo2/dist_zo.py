"""DistZO2 on CPU: steps/s of 2 processes (``pertp``, ``zo_ddp``) relative to 1 process, same global batch.

Each variant is a real ``plait run`` of the ``zo`` recipe (in-place MeZO engine) on the same model, data and
global batch: ``single`` on one process, ``pertp`` and ``zo_ddp`` under ``torchrun --nproc-per-node 2``
(gloo). Every process gets one intra-op thread (``OMP_NUM_THREADS=1``), so two processes use two cores where
one uses one: the ratio is the scaling of the method, not of the thread pool. Step rate: the median of the
``perf/steps_per_sec`` windows rank 0 logs, the first window (warm-up) left out. Bytes per step: the
``perf/comm_bytes`` rank 0 logs (what it sent and received in the step's one collective). Also checks that
``pertp`` logged exactly the single process's losses. Nothing is asserted.

A variant ``<strategy>_sliced`` (e.g. ``pertp_sliced``, with ``--offload zo2``) adds ``parallel.sliced_upload:
true``: each rank uploads 1/k of a block, an all-gather completes it. It also reports ``upload_mib_per_step``
(host bytes rank 0 read per step) and whether its losses equal the unsliced variant's. On CPU/gloo "upload" is a
host memcpy and the gather goes through loopback TCP, so expect no gain there; the point is GPUs with NVLink.

    .venv/bin/python benchmarks/distzo2/dist_zo.py                         # OPT "small", batch 16, 25 steps
    .venv/bin/python benchmarks/distzo2/dist_zo.py --size tiny --steps 15
    .venv/bin/python benchmarks/distzo2/dist_zo.py --size tiny --offload zo2 --variants single,pertp,pertp_sliced
    python benchmarks/distzo2/dist_zo.py --device cuda --backend nccl --nproc 4 --variants single,pertp,zo_ddp,zo_2d \
        --model-config '{"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 32, "ffn_dim": 8192}'
                                                    # several GPUs (benchmarks/distzo2/dist_zo.sh); pertp uses 2

One JSON object on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common.py
from _common import emit, log  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CFG = """
run: {{name: {name}, seed: 0, steps: {steps}, log_every: {window}, eval_every: 0, ckpt_every: 0, out_dir: {out},
      progress: false, keep_checkpoints: 1, device: {device}}}
recipe: {{name: zo, batch_size: {batch}, max_length: {seq}, eval_batch_size: 64, eval_examples: 8}}
model: {{name: hf_causal_lm, arch: opt, size: {size}, config: {model_config}}}
data: {{name: synthetic_sentiment, n_train: 512, n_eval: 8}}
perturbation: {{name: mezo, eps: 1.0e-3, lr: 1.0e-4}}
"""


def run_variant(name: str, nproc: int, strategy: str | None, args, root: Path, sliced: bool = False) -> dict:
    cfg = root / f"{name}.yaml"
    text = CFG.format(name=name, steps=args.steps, window=args.window, out=root / "runs", batch=args.batch,
                      seq=args.seq, size=args.size, device=args.device, model_config=args.model_config)
    if args.offload != "none":
        text += f"offload: {{name: {args.offload}, storage_dtype: fp16}}\n"
    if strategy:
        text += f"parallel: {{name: {strategy}, backend: {args.backend}, sliced_upload: {str(sliced).lower()}}}\n"
    cfg.write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if nproc == 1:
        cmd = [sys.executable, "-m", "plait", "run", str(cfg)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "plait", "run", str(cfg)]
    log(f"[dist_zo] {name}: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = sorted((root / "runs" / name).iterdir())[-1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r["perf/steps_per_sec"] for r in rows if "perf/steps_per_sec" in r][1:]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    comm = [r["perf/comm_bytes"] for r in rows if "perf/comm_bytes" in r]
    up = [r["perf/upload_mib"] for r in rows if "perf/upload_mib" in r]
    return {"steps_per_sec": round(statistics.median(windows), 3), "windows": [round(w, 3) for w in windows],
            "comm_bytes_per_step": comm[-1] if comm else 0.0, "losses": losses,
            "upload_mib_per_step": round(up[-1], 4) if up else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--window", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=2, help="processes for zo_ddp and zo_2d (pertp always uses 2)")
    ap.add_argument("--variants", default="single,pertp,zo_ddp")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--backend", default="gloo")
    ap.add_argument("--offload", default="none", help="none | zo2 (fp16 host copies)")
    ap.add_argument("--model-config", default="{}", help="HF config overrides (JSON), e.g. an OPT-1.3B shape")
    args = ap.parse_args()
    variants = args.variants.split(",")
    procs = {"single": 1, "pertp": 2, "zo_ddp": args.nproc, "zo_2d": args.nproc}
    nproc = {v: procs[v.removesuffix("_sliced")] for v in ["single"] + variants}
    if any(v.endswith("_sliced") for v in variants) and args.offload != "zo2":
        raise SystemExit("the *_sliced variants slice zo2 block uploads: add --offload zo2")
    with tempfile.TemporaryDirectory(prefix="dist_zo-") as tmp:
        root = Path(tmp)
        res = {v: run_variant(v, nproc[v], None if v == "single" else v.removesuffix("_sliced"), args, root,
                              sliced=v.endswith("_sliced"))
               for v in ["single"] + [v for v in variants if v != "single"]}
    base = res["single"]["steps_per_sec"]
    out = {"model": f"opt-{args.size}", "model_config": json.loads(args.model_config), "global_batch": args.batch,
           "seq": args.seq, "steps": args.steps, "device": args.device, "backend": args.backend,
           "offload": args.offload, "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2)}
    for name, r in res.items():
        out[name] = {"processes": nproc[name], "steps_per_sec": r["steps_per_sec"], "windows": r["windows"],
                     "ratio_to_single": round(r["steps_per_sec"] / base, 3),
                     "comm_bytes_per_step": r["comm_bytes_per_step"]}
        if r["upload_mib_per_step"] is not None:
            out[name]["upload_mib_per_step"] = r["upload_mib_per_step"]
        plain = name.removesuffix("_sliced")
        if plain != name and plain in res:
            out[name]["same_losses_as_unsliced"] = r["losses"] == res[plain]["losses"]
    if "pertp" in res:
        out["pertp"]["same_losses_as_single"] = res["pertp"]["losses"] == res["single"]["losses"]
    emit(out)


if __name__ == "__main__":
    main()
