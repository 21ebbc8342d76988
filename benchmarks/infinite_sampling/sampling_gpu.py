"""Infinite-Sampling rollout schedulers on one GPU: peak memory and tokens/s, full vs micro vs length-aware.

A Qwen3-1.7B-shaped model (hidden 2048, 28 layers, 16 heads, 8 KV heads, head_dim 128, intermediate 6144,
vocab 151936, tied embeddings; random init, built directly on the GPU in bf16), ``--prompts`` random prompts of
``--prompt-len`` tokens, ``G`` completions each, ``g`` concurrent rows. Completion lengths are scripted (EOS
banned before, forced at, a lognormal length with median ``--max-new / 8`` and sigma 0.8, clipped to
``[1, --max-new]``; memory and steps do not depend on weight values). Greedy decoding by default (``--sample``:
seeded sampling; its host-side draw costs the same per token for every variant).

Variants, in this order (the most informative first, so a budget cut loses the least):

    micro_group         rounds of g rows per prompt, the slot cache freed between rounds (naive micro groups)
    length_aware_noisy  continuous + FPTAS/longest-first/SJF plan over scripted x lognormal(0, 0.5) predictions
    full_group          all G rows at once, padded (HF generate)
    continuous          g slots, FIFO refill
    length_aware_oracle the plan over the scripted lengths themselves

Per variant: ``torch.cuda.max_memory_allocated`` during ``generate`` (peak reset before; also above the
weights), ``max_memory_reserved``, decode steps, the measured live-KV peak, wall seconds and tokens/s
(generated tokens / wall). The slot cache is preallocated (``rows x (P + max_new)`` positions), so allocated
memory tracks the rows, not the live tokens; the ``peak_kv_bytes`` field is the live part. Ratios:
micro/full memory (paper: 10.64 / 21.55 GB = 0.49 with HF's dynamic cache), length_aware/micro tokens/s
(paper: >= 1.25) and decode steps (paper: 1770 / 3250 = 0.545). Every scheduler must emit the same tokens
(checked). The JSON (``--out``) is rewritten after every variant; nothing new starts after ``--budget-s``.

    python benchmarks/infinite_sampling/sampling_gpu.py --out $OUT/sampling_gpu.json
    python benchmarks/infinite_sampling/sampling_gpu.py --device cpu --tiny --out /tmp/sampling_gpu.json   # CPU logic check
    python benchmarks/infinite_sampling/sampling_gpu.py --device cpu --tiny --dtype bfloat16 --G 32 --g 8   # closer to the GPU run

A failed variant is recorded with its full traceback (``runs.<variant>.trace``) and the next one starts. The
first GPU run (2026-12-04, transformers 5.17.0) failed every variant in ``kv_cache.prefill``: the slot cache was
passed as ``cache=``, a keyword transformers 5.17 does not know (it names it ``past_key_values``); see
docs/infinite_sampling.md.

Works without plait installed (imports the plugin's modules from this checkout). Timings are reported, never
asserted. A summary JSON is printed on stdout at the end; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "gpu"))
from _results import Results, import_from_checkout  # noqa: E402  (benchmarks/gpu/_results.py)

T_START = time.perf_counter()
# Qwen3-1.7B (config.json of Qwen/Qwen3-1.7B)
QWEN3_1_7B = dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=6144, vocab_size=151936, max_position_embeddings=40960,
                  rope_theta=1_000_000, tie_word_embeddings=True, rms_norm_eps=1e-6)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128, vocab_size=1024, max_position_embeddings=1024, tie_word_embeddings=True)
EOS, PAD = 2, 0
ORDER = ("micro_group", "length_aware_noisy", "full_group", "continuous", "length_aware_oracle")


def log(*a) -> None:
    print(f"[sampling_gpu {time.perf_counter() - T_START:6.1f}s]", *a, file=sys.stderr, flush=True)


def import_samplers():
    """The plugin's ``samplers`` module, from the installed plait or straight from this checkout."""
    return import_from_checkout("plait.plugins.infinite_sampling.samplers", log)




def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(**shape, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(cfg).to(dtype)
    return model.eval().requires_grad_(False)


def scripted(gen: torch.Generator, n: int, max_new: int, sigma: float = 0.8) -> list[int]:
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    x = torch.exp(math.log(max_new / 8) + sigma * z)
    return [int(v) for v in x.ceil().clamp(1, max_new)]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON file, rewritten after every variant")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                    help="model dtype; auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny Qwen3 shape and short lengths (CPU logic check)")
    ap.add_argument("--G", type=int, default=32)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new", type=int, default=1024)
    ap.add_argument("--noise", type=float, default=0.5, help="lognormal sigma of the noisy predictions")
    ap.add_argument("--sample", action="store_true", help="seeded sampling instead of greedy")
    ap.add_argument("--variants", default=",".join(ORDER))
    ap.add_argument("--budget-s", type=float, default=200.0, help="start no variant after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.tiny:
        args.max_new = min(args.max_new, 32)
        args.prompt_len = min(args.prompt_len, 8)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False; use --device cpu --tiny")
    samplers = import_samplers()
    kv = importlib.import_module("plait.plugins.infinite_sampling.kv_cache")
    shape = TINY if args.tiny else QWEN3_1_7B
    if args.dtype == "auto":
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        dtype = getattr(torch, args.dtype)
    variants = [v for v in args.variants.split(",") if v]
    bad = sorted(set(variants) - set(ORDER))
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; allowed: {', '.join(ORDER)}")
    res = Results(args.out, {
        "benchmark": "sampling_gpu", "date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "config": vars(args), "shape": shape, "dtype": str(dtype), "runs": {}})
    res.save()
    log(f"building {'tiny' if args.tiny else 'Qwen3-1.7B'}-shaped model on {device} ({dtype})")
    model = build_model(shape, device, dtype, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    res.doc["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    res.doc["kv_bytes_per_token"] = kv.kv_bytes_per_token(model)
    gen = torch.Generator().manual_seed(args.seed)
    B, G, g = args.prompts, args.G, args.g
    flat = scripted(gen, B * G, args.max_new)
    noise = torch.exp(args.noise * torch.randn(B * G, generator=gen, dtype=torch.float64))
    pred_noisy = [max(1, int(round(v * float(e)))) for v, e in zip(flat, noise)]
    prompts = [torch.randint(8, shape["vocab_size"], (args.prompt_len,), generator=gen).tolist() for _ in range(B)]
    forced = {(b, i): flat[b * G + i] for b in range(B) for i in range(G)}
    res.doc["lengths"] = {"mean": sum(flat) / len(flat), "max": max(flat), "sum": sum(flat)}
    make = {
        "micro_group": lambda: (samplers.MicroGroupScheduler(g=g), None),
        "length_aware_noisy": lambda: (samplers.LengthAwareScheduler(g=g), pred_noisy),
        "full_group": lambda: (samplers.FullGroupScheduler(), None),
        "continuous": lambda: (samplers.ContinuousScheduler(g=g), None),
        "length_aware_oracle": lambda: (samplers.LengthAwareScheduler(g=g), flat),
    }
    sampling = {"temperature": 1.0, "top_k": 0} if args.sample else {"greedy": True}
    tokens_ref = None
    for name in [v for v in ORDER if v in variants]:
        if time.perf_counter() - T_START > args.budget_s:
            res.doc["runs"][name] = {"skipped": "time budget spent"}
            res.save()
            continue
        log(f"{name} ...")
        try:
            sched, pred = make[name]()
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            out = sched.generate(model, prompts, G, args.max_new, step=0, sampling=sampling, eos_id=EOS,
                                 pad_id=PAD, forced_lengths=forced, predicted_lengths=pred)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            st = out.stats
            row = {"decode_steps": st.decode_steps, "forward_calls": st.forward_calls, "prefills": st.prefills,
                   "tokens": st.tokens_generated, "wall_s": round(st.wall_time_s, 3),
                   "tokens_per_s": round(st.tokens_generated / st.wall_time_s, 1),
                   "peak_kv_bytes": st.peak_kv_bytes, "peak_allocated_kv_bytes": st.peak_allocated_kv_bytes}
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                row.update(max_memory_allocated=peak, above_weights=peak - weights,
                           max_memory_reserved=torch.cuda.max_memory_reserved(device))
            if tokens_ref is None:
                tokens_ref = out.completions
            row["same_tokens_as_first"] = out.completions == tokens_ref
            res.doc["runs"][name] = row
            log(f"{name}: {row['decode_steps']} steps, {row['wall_s']} s, {row['tokens_per_s']} tok/s, "
                f"peak {row.get('max_memory_allocated', row['peak_kv_bytes']) / 2**30:.3f} GiB")
            del out
        except Exception as exc:  # noqa: BLE001 - record and go on to the next variant
            res.doc["runs"][name] = {"error": f"{type(exc).__name__}: {exc}",
                                     "trace": traceback.format_exc()}  # the whole stack: where it really failed
            log(f"{name} failed: {exc}")
        res.save()
    runs = res.doc["runs"]

    def ratio(a, b, key):
        x, y = runs.get(a, {}).get(key), runs.get(b, {}).get(key)
        return round(x / y, 4) if x is not None and y else None

    mem_key = "max_memory_allocated" if device.type == "cuda" else "peak_allocated_kv_bytes"
    res.doc["summary"] = {
        "memory_key": mem_key,
        "memory_micro_over_full": ratio("micro_group", "full_group", mem_key),
        "memory_above_weights_micro_over_full": ratio("micro_group", "full_group", "above_weights"),
        "peak_live_kv_micro_over_full": ratio("micro_group", "full_group", "peak_kv_bytes"),
        "memory_length_aware_over_micro": ratio("length_aware_noisy", "micro_group", mem_key),
        "steps_length_aware_over_micro": ratio("length_aware_noisy", "micro_group", "decode_steps"),
        "tokens_per_s_length_aware_over_micro": ratio("length_aware_noisy", "micro_group", "tokens_per_s"),
        "tokens_per_s_continuous_over_micro": ratio("continuous", "micro_group", "tokens_per_s"),
        "tokens_per_s_oracle_over_micro": ratio("length_aware_oracle", "micro_group", "tokens_per_s"),
        "same_tokens": all(r.get("same_tokens_as_first", False) for r in runs.values() if "skipped" not in r),
    }
    res.save()
    print(json.dumps({"summary": res.doc["summary"], "elapsed_s": res.doc["elapsed_s"]}, indent=2))
    failed = any("error" in r for r in runs.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
