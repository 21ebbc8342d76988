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
    from _common import log, run_json_child

    log(f"[dp_memory] variant {variant} ...")
    return run_json_child(_child_argv(args, variant), variant, REPO, capture_stderr=True)


def summarize(args, results: dict) -> dict:
    import transformers
    from _common import cpu_machine, mib, rss_entry, rss_ratio

    base = results.get("baseline", {}).get("peak_rss_kib")
    variants = {}
    for v, r in results.items():
        if "error" in r:
            variants[v] = {"error": r["error"]}
            continue
        variants[v] = {**rss_entry(r, base), "step_s": r.get("step_s"), "losses": r.get("losses"),
                       "wall_s": r.get("wall_s")}

    def ratios(key):
        return {f"{v}/non_dp": rss_ratio(results, v, "non_dp", key, base) for v in results
                if v not in ("baseline", "non_dp")}

    first = next((r for r in results.values() if "n_trainable" in r), {})
    return {
        "benchmark": "dp_memory",
        "config": {"model": "GPT2LMHeadModel", "vocab": args.vocab, "d_model": args.d_model, "layers": args.layers,
                   "heads": args.heads, "batch": args.batch, "seq": args.seq, "dtype": "float32", "init": "random",
                   "train": args.train, "head": args.head, "trainable_params": first.get("n_trainable"),
                   "model_mib": round(first["model_bytes"] / 2**20, 1) if "model_bytes" in first else None,
                   "steps": args.steps, "threads": args.threads, "opacus_conv1d": args.opacus_conv1d},
        "machine": cpu_machine(transformers=transformers.__version__),
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
    from _common import run_variants

    run_variants("dp_memory", args, VARIANTS, ("baseline", "non_dp"), run_variant, summarize)


if __name__ == "__main__":
    main()
