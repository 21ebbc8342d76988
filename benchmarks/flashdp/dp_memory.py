"""Peak host memory (RSS) of FlashDP vs non-private training and Opacus, on CPU, one child process per variant.

Same model, data, loss, trainable set and variants as ``dp_speed.py`` (GPT2LMHeadModel, vocab 2048, n_embd
256, 2 layers, batch 8, seq 128, σ = 1, C = 1; only Linear/Conv1D layers train by default):

    baseline          imports torch, transformers (GPT-2 modeling), opacus and plait's flashdp; builds no model
    non_dp            backward + SGD step
    flashdp           FlashDP per-layer (PyTorch path on CPU)
    dp_flat           FlashDP flat (keeps every DP layer's (a, g) until the end of the backward)
    opacus_flat       Opacus GradSampleModule + DPOptimizer (holds B per-sample grads of every trained tensor)
    opacus_per_layer  Opacus GradSampleModule + DPPerLayerOptimizer
    opacus_ghost      Opacus ghost clipping (two backwards, no per-sample grads for Linear/Conv1D)

Each child reports ru_maxrss (whole life) and the peak during the steps only (VmHWM reset through
/proc/self/clear_refs after the build). Ratios variant/non_dp, raw and above the baseline child; the
"above baseline" figures are what the variant itself costs (model + activations + per-sample state). A
child that fails is reported with its error; nothing is asserted.

Run (from the repository root; 2-5 minutes on 2 cores, mostly child start-up):

    .venv/bin/python benchmarks/flashdp/dp_memory.py
    .venv/bin/python benchmarks/flashdp/dp_memory.py --layers 4 --batch 16 --variants baseline,non_dp,flashdp,opacus_flat

One JSON object is printed on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # benchmarks/: _common.py, _stable.py
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from dp_speed import VARIANTS as DP_VARIANTS  # noqa: E402
from dp_speed import add_model_args

VARIANTS = ("baseline",) + DP_VARIANTS


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant (the peak is reached by step 2)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # internal: run one variant here
    return ap.parse_args(argv)


# --- child -----------------------------------------------------------------------------------------------------------
def run_child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import opacus  # noqa: F401  (the baseline imports what every variant imports)
    import opacus.grad_sample  # noqa: F401
    import opacus.optimizers  # noqa: F401
    import opacus.utils.fast_gradient_clipping_utils  # noqa: F401
    import transformers.models.gpt2.modeling_gpt2  # noqa: F401
    from _common import hwm_kib, log, maxrss_kib, reset_hwm, rss_kib
    from dp_speed import Runner, make_batch

    import plait.plugins.flashdp.transform  # noqa: F401

    v = args.variant
    out = {"variant": v}
    if v == "baseline":
        out.update(peak_rss_kib=maxrss_kib(), end_rss_kib=rss_kib(), step_peak_rss_kib=None)
        return out
    t0 = time.perf_counter()
    runner = Runner(v, args)
    out["n_trainable"] = runner.n_trainable
    out["model_bytes"] = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    out["build_s"] = round(time.perf_counter() - t0, 2)
    out["after_build_rss_kib"] = rss_kib()
    hwm_ok = reset_hwm()
    losses, times = [], []
    for t in range(args.steps):
        ids, pos = make_batch(t, args)
        ts = time.perf_counter()
        losses.append(round(runner.step(ids, pos, t + 1), 5))
        times.append(round(time.perf_counter() - ts, 2))
        log(f"  {v}: step {t} {times[-1]:.2f}s loss {losses[-1]:.4f} rss {rss_kib() / 1024:.0f} MiB")
    out.update(step_s=times, losses=losses, end_rss_kib=rss_kib(), peak_rss_kib=maxrss_kib(),
               step_peak_rss_kib=hwm_kib() if hwm_ok else None)
    return out


# --- parent ----------------------------------------------------------------------------------------------------------
def _child_argv(args, variant: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--variant", variant]
    for flag in ("vocab", "d_model", "layers", "heads", "batch", "seq", "threads", "train", "head", "attn",
                 "opacus_conv1d", "steps"):
        argv += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    return argv


def run_variant(args, variant: str) -> dict:
    from _common import log

    log(f"[dp_memory] variant {variant} ...")
    t0 = time.perf_counter()
    proc = subprocess.run(_child_argv(args, variant), capture_output=True, text=True, cwd=REPO)
    wall = round(time.perf_counter() - t0, 1)
    sys.stderr.write(proc.stderr[-4000:] if proc.returncode else "".join(
        line + "\n" for line in proc.stderr.splitlines() if line.startswith("  ")))
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return {"variant": variant, "error": f"child exited with {proc.returncode}: {tail[0]}"[:1500], "wall_s": wall}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_s"] = wall
    return res


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def summarize(args, results: dict) -> dict:
    import torch
    import transformers
    from _common import mib

    base = results.get("baseline", {}).get("peak_rss_kib")
    variants = {}
    for v, r in results.items():
        if "error" in r:
            variants[v] = {"error": r["error"]}
            continue
        peak, step_peak = r.get("peak_rss_kib"), r.get("step_peak_rss_kib")
        variants[v] = {
            "peak_rss_mib": mib(peak),
            "peak_above_baseline_mib": mib(peak - base) if None not in (peak, base) else None,
            "step_peak_rss_mib": mib(step_peak),
            "step_peak_above_baseline_mib": mib(step_peak - base) if None not in (step_peak, base) else None,
            "after_build_rss_mib": mib(r.get("after_build_rss_kib")),
            "step_s": r.get("step_s"),
            "losses": r.get("losses"),
            "wall_s": r.get("wall_s"),
        }

    def kib(v, key):
        r = results.get(v, {})
        return None if "error" in r else r.get(key)

    def ratios(key):
        out = {}
        for v in results:
            if v in ("baseline", "non_dp"):
                continue
            a, b = kib(v, key), kib("non_dp", key)
            out[f"{v}/non_dp"] = {"raw": _ratio(a, b),
                                  "above_baseline": _ratio(a - base, b - base) if None not in (a, b, base) else None}
        return out

    first = next((r for r in results.values() if "n_trainable" in r), {})
    return {
        "benchmark": "dp_memory",
        "config": {"model": "GPT2LMHeadModel", "vocab": args.vocab, "d_model": args.d_model, "layers": args.layers,
                   "heads": args.heads, "batch": args.batch, "seq": args.seq, "dtype": "float32", "init": "random",
                   "train": args.train, "head": args.head, "trainable_params": first.get("n_trainable"),
                   "model_mib": round(first["model_bytes"] / 2**20, 1) if "model_bytes" in first else None,
                   "steps": args.steps, "threads": args.threads, "opacus_conv1d": args.opacus_conv1d},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__},
        "date": time.strftime("%Y-%m-%d"),
        "baseline_rss_mib": mib(base),
        "variants": variants,
        "ratios": ratios("peak_rss_kib"),
        "ratios_step_phase": ratios("step_peak_rss_kib"),
        "notes": ["peak = ru_maxrss of the child over its whole life (build included)",
                  "step_peak = VmHWM reset after the build: the peak during the steps only",
                  "above_baseline subtracts the baseline child (imports only), i.e. the variant's own memory",
                  "host RSS includes allocator caching: small differences (a few MiB) are noise"],
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.variant:
        try:
            print(json.dumps(run_child(args)), flush=True)
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            sys.exit(1)
        return
    from _common import choose_variants, emit, log

    chosen = choose_variants(args.variants, VARIANTS, ("baseline", "non_dp"))
    t0 = time.perf_counter()
    results = {v: run_variant(args, v) for v in chosen}
    out = summarize(args, results)
    out["total_wall_s"] = round(time.perf_counter() - t0, 1)
    log(f"[dp_memory] done in {out['total_wall_s']}s")
    emit(out)


if __name__ == "__main__":
    main()
