"""WiP multiplication-less attention on the bundled LM: accuracy and arithmetic cost per operator, one JSON.

For each operator (l1 = AdderNet, pot, minprod, mitchell; exact is the reference): perplexity ratio to the
original model after the swap, after closed-form calibration and after the few-step fine-tune; the fraction
of the perplexity gap recovered; the multiplications removed from attention and from the whole forward;
the estimated energy ratio (Horowitz 45 nm table, fp32) of attention and of the whole forward; and the
wall-clock of one eval forward relative to exact (PyTorch emulation on CPU: *not* the efficiency claim).

    .venv/bin/python benchmarks/wip/wip.py                                   # full eval split, 100 steps
    .venv/bin/python benchmarks/wip/wip.py --eval-blocks 64 --steps 30       # quicker
    .venv/bin/python benchmarks/wip/wip.py --no-dim-scales --lm-loss --calib-blocks 32 --lr 3e-3   # the first recovery

One JSON object is printed on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common.py, _stable.py
from _common import emit, log  # noqa: E402

from plait.plugins.wip.attention import swap_attention  # noqa: E402
from plait.plugins.wip.lm import heldout_blocks, load_lm  # noqa: E402
from plait.plugins.wip.wip_recover_recipe import compare_operators  # noqa: E402


def forward_seconds(model, ids, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--operators", default="l1,pot,minprod,mitchell")
    ap.add_argument("--calib-blocks", type=int, default=192)
    ap.add_argument("--eval-blocks", type=int, default=0, help="0: the whole eval split")
    ap.add_argument("--steps", type=int, default=100, help="fine-tune steps")
    ap.add_argument("--key-bias", action="store_true")
    ap.add_argument("--no-dim-scales", dest="dim_scales", action="store_false",
                    help="do not train per-dimension q/k input scales")
    ap.add_argument("--lm-loss", action="store_true", help="fine-tune on the next-token loss, not distillation")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--mixer", default="exact")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_lm()
    calib = heldout_blocks(tok, "calib", 128, limit=args.calib_blocks)
    evals = heldout_blocks(tok, "eval", 128, limit=args.eval_blocks)
    ops = [o for o in args.operators.split(",") if o]
    result = compare_operators(model, calib, evals, ops, mixer=args.mixer, key_bias=args.key_bias,
                               dim_scales=args.dim_scales, distill=not args.lm_loss, finetune_steps=args.steps,
                               lr=args.lr, on_result=lambda n, r: log(n, {k: round(v, 4) for k, v in r.items()
                                                              if isinstance(v, float)}))
    probe = evals[:16]
    t_exact = forward_seconds(swap_attention(copy.deepcopy(model), "exact"), probe, 5)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {torch.get_num_threads()} "
           "thread(s), shared", "model_params": sum(p.numel() for p in model.parameters()),
           "eval_tokens": int(evals.numel()), "calib_blocks": len(calib), "finetune_steps": args.steps,
           "mixer": args.mixer, "key_bias": args.key_bias, "dim_scales": args.dim_scales,
           "finetune_loss": "next-token" if args.lm_loss else "distill", "lr": args.lr,
           "ppl_original": result["original"]["ppl"], "operators": {}}
    for name, row in result["operators"].items():
        swapped = swap_attention(copy.deepcopy(model), name, args.mixer, args.key_bias, args.dim_scales)
        out["operators"][name] = {
            **{k: row[k] for k in ("ppl_ratio_swap", "ppl_ratio_calibrated", "ppl_ratio_finetuned",
                                   "gap_recovered_calibrated", "gap_recovered_finetuned", "qk_multiplications",
                                   "attention_mults_removed", "model_mults_removed", "attention_energy_ratio",
                                   "model_energy_ratio")},
            "cpu_forward_time_ratio_to_exact": forward_seconds(swapped, probe, 5) / t_exact,
        }
    emit(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
