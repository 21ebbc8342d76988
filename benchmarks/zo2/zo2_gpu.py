"""ZO2 (blocks streamed from pinned host memory) vs in-GPU MeZO on one GPU: throughput, peak memory, exactness.

For OPT-1.3B / 2.7B / 6.7B shapes (HF ``OPTConfig``; random init in fp16, built directly on the GPU), batch 1,
seq 2048, ``--warmup`` untimed + ``--steps`` timed steps each of:

    mezo          ``InPlaceMeZO`` on cuda: every parameter on the GPU
    zo2           ``ZO2Engine`` on cuda: every block streamed, fp16 pinned host storage, overlap on
    zo2_no_overlap  the same with overlap off

It reports tokens/s (batch*seq / median step time), ``torch.cuda.max_memory_allocated`` during the steps
(peak reset after the engine is built) and the ratios zo2/mezo tokens/s (goal >= 0.95) and memory, and each
variant's compute-floor ratio: its median step time / the median of two no-grad forwards of the same batch on
the same model, all on the GPU (``floor``, timed first; goal <= 1.05). Before the
sizes it runs a correctness check: ZO2 vs InPlaceMeZO on a small fp32 OPT on the GPU, 5 steps, losses and
projected gradients compared exactly (and their max abs difference, plus the parameters after flush).

Each size (and each variant within it) is guarded, so an OOM or error is recorded and the rest still run; the
JSON file is rewritten after every result. ``--budget-s`` skips what would start after the budget is spent.

Run on the GPU machine (normally through ``bash benchmarks/gpu/run_all.sh``):

    python benchmarks/zo2/zo2_gpu.py --out $OUT/zo2_gpu.json
    python benchmarks/zo2/zo2_gpu.py --sizes 1.3b --steps 5 --out /tmp/x.json

Check the code paths on CPU with a tiny model (no GPU needed):

    python benchmarks/zo2/zo2_gpu.py --device cpu --tiny --out /tmp/zo2_gpu_cpu.json

Works without plait being installed (imports the engine modules from this checkout). Timings are reported,
never asserted. The JSON is also printed on stdout at the end; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "gpu"))
from _results import Results, err, gib, import_from_checkout, mem_now, mem_peak, reset_peak, sync  # noqa: E402  (benchmarks/gpu/_results.py)

# hidden, layers, heads, ffn (HF OPT configs); vocab 50272, max positions 2048
SHAPES = {"1.3b": (2048, 24, 32, 8192), "2.7b": (2560, 32, 32, 10240), "6.7b": (4096, 32, 32, 16384)}
TINY_SHAPES = {"tiny": (64, 2, 4, 128)}
CHECK_SHAPE = (256, 4, 4, 688)  # the correctness check's "small OPT" (the basics "small" preset shape)
VOCAB, MAX_POS = 50272, 2048
MEZO_ARGS = dict(eps=1e-3, lr=1e-6, weight_decay=0.0, distribution="gaussian", q=1, one_sided=False,
                 no_decay=["bias", "norm", "ln_", "layernorm"], schedule="constant", warmup_steps=0)
T_START = time.perf_counter()


def log(*a) -> None:
    print(f"[zo2_gpu {time.perf_counter() - T_START:6.1f}s]", *a, file=sys.stderr, flush=True)


# --- plait import (installed, or straight from this checkout) ----------------------------------------------------
_fused = import_from_checkout("plait.plugins.zo2.fused", log)
_mezo = import_from_checkout("plait.plugins.zo2.mezo", log)
ZO2Engine = _fused.ZO2Engine
InPlaceMeZO, MeZO, lm_loss, step_seed = _mezo.InPlaceMeZO, _mezo.MeZO, _mezo.lm_loss, _mezo.step_seed


# --- helpers ----------------------------------------------------------------------------------------------------


def opt_config(shape, vocab=VOCAB):
    from transformers import OPTConfig

    hidden, layers, heads, ffn = shape
    return OPTConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     ffn_dim=ffn, max_position_embeddings=MAX_POS, word_embed_proj_dim=hidden,
                     do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                     pad_token_id=1, bos_token_id=2, eos_token_id=2)


def build_model(shape, device: torch.device, dtype: torch.dtype, attn: str, seed: int = 0):
    """Random-init OPT built directly on ``device`` in ``dtype`` (no CPU copy, no fp32 detour)."""
    from transformers import AutoModelForCausalLM

    cfg = opt_config(shape)
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
        except TypeError:  # transformers 4.x spells it torch_dtype
            model = AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype, attn_implementation=attn)
    if any(p.device != device or p.dtype != dtype for p in model.parameters()):
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def make_batch(step: int, batch: int, seq: int, device: torch.device, vocab: int = VOCAB, pad: bool = False):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(4, vocab, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if pad and batch > 1:
        mask[0, -3:] = 0  # some right padding (correctness check)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    labels[mask == 0] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def zo2(model, device, mezo, overlap: bool, storage: str):
    return ZO2Engine(model, device, mezo, blocks=None, overlap=overlap, bucket=True, storage_dtype=storage,
                     pin_memory=device.type == "cuda", disk_dir=None)


def time_steps(eng, device, args, label: str) -> dict:
    """Warm-up + timed steps; peak memory over the timed and warm-up steps (reset before the first one)."""
    times, losses = [], []
    for t in range(args.warmup + args.steps):
        batch = make_batch(t, args.batch, args.seq, device)
        sync(device)
        t0 = time.perf_counter()
        ls, _ = eng.step(batch, step_seed(0, t), MEZO_ARGS["lr"])
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(ls)
        log(f"  {label}: step {t}{' (warm-up)' if t < args.warmup else ''} {times[-1]:.3f}s loss {ls[0]:.4f}")
    timed = times[args.warmup:]
    med = statistics.median(timed)
    return {"median_step_s": round(med, 4), "min_step_s": round(min(timed), 4),
            "tokens_per_s": round(args.batch * args.seq / med, 1), "step_s": [round(x, 4) for x in times],
            "peak_mem_gib": gib(mem_peak(device)), "losses": [[round(x, 5) for x in ls] for ls in losses]}


def time_floor(model, device, args) -> dict:
    """The compute floor of a central-difference ZO step: two no-grad forwards of the step's batch on the same
    model (all on the device), warm-up + timed steps as `time_steps`."""
    times = []
    with torch.no_grad():
        for t in range(args.warmup + args.steps):
            batch = make_batch(t, args.batch, args.seq, device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(2):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            sync(device)
            times.append(time.perf_counter() - t0)
    timed = times[args.warmup:]
    med = statistics.median(timed)
    return {"median_step_s": round(med, 4), "min_step_s": round(min(timed), 4),
            "tokens_per_s": round(args.batch * args.seq / med, 1), "step_s": [round(x, 4) for x in times]}


# --- correctness ------------------------------------------------------------------------------------------------
def correctness(args, device) -> dict:
    """ZO2 vs InPlaceMeZO on a small fp32 OPT on ``device``: 5 steps, exact equality and max abs differences."""
    shape = TINY_SHAPES["tiny"] if args.tiny else CHECK_SHAPE
    mz = dict(MEZO_ARGS, lr=1e-3, weight_decay=0.1)  # as the unit tests: exercises decay/no-decay
    model = build_model(shape, torch.device("cpu"), torch.float32, args.attn)
    ref = InPlaceMeZO(copy.deepcopy(model), device, MeZO(**mz))
    eng = zo2(model, device, MeZO(**mz), overlap=True, storage="fp32")
    loss_eq, grad_eq, max_loss, max_grad, per_step = True, True, 0.0, 0.0, []
    for t in range(args.check_steps):
        b = make_batch(t, 4, min(args.seq, 128), device, pad=True)
        la, ga = ref.step(b, step_seed(0, t), mz["lr"])
        lb, gb = eng.step(b, step_seed(0, t), mz["lr"])
        loss_eq &= la == lb
        grad_eq &= ga == gb
        max_loss = max(max_loss, max(abs(x - y) for x, y in zip(la, lb)))
        max_grad = max(max_grad, max(abs(x - y) for x, y in zip(ga, gb)))
        per_step.append({"mezo": la, "zo2": lb})
    sa, sb = ref.state_dict(), eng.state_dict()
    param_diff = max(float((sa[k].detach().float().cpu() - sb[k].float()).abs().max()) for k in sa)
    params_eq = all(torch.equal(sa[k].detach().cpu(), sb[k]) for k in sa)
    eng.close()
    return {"shape": dict(zip(("hidden", "layers", "heads", "ffn"), shape)), "dtype": "float32",
            "steps": args.check_steps, "losses_equal": loss_eq, "grads_equal": grad_eq,
            "max_abs_loss_diff": max_loss, "max_abs_grad_diff": max_grad, "params_equal_after_flush": params_eq,
            "max_abs_param_diff": param_diff, "losses": per_step}


# --- one model size ------------------------------------------------------------------------------------------------
def bench_size(name: str, shape, args, device, res: Results) -> None:
    out = res.doc["sizes"].setdefault(name, {})
    hidden, layers, heads, ffn = shape
    out["shape"] = {"hidden": hidden, "layers": layers, "heads": heads, "ffn": ffn, "vocab": VOCAB}
    dtype = torch.float16
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype, args.attn)
    out["n_params"] = sum(p.numel() for p in model.parameters())
    out["model_gib"] = gib(sum(p.numel() * p.element_size() for p in model.parameters()))
    out["build_s"] = round(time.perf_counter() - t0, 1)
    log(f"{name}: built {out['n_params'] / 1e9:.2f}B params in {out['build_s']}s")
    res.save()

    # the compute floor: two no-grad forwards of the same batch (every parameter on the device)
    try:
        out["floor"] = time_floor(model, device, args)
        log(f"{name} floor (two no-grad forwards): {out['floor']['median_step_s']:.4f}s")
    except Exception as exc:  # noqa: BLE001
        out["floor"] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        log(f"{name} floor failed: {exc}")
    res.save()

    # in-GPU MeZO (every parameter on the device)
    try:
        reset_peak(device)
        eng = InPlaceMeZO(model, device, MeZO(**MEZO_ARGS))
        out["mezo"] = {"resident_gib": gib(mem_now(device)), **time_steps(eng, device, args, f"{name} mezo")}
        del eng
    except Exception as exc:  # noqa: BLE001  (OOM included: record it and go on)
        out["mezo"] = err(exc)
        log(f"{name} mezo failed: {exc}")
    res.save()

    # ZO2: blocks move to pinned host storage (fp16), the rest stays on the device
    for label, overlap in (("zo2", True), ("zo2_no_overlap", False)):
        if time.perf_counter() - T_START > args.budget_s:
            out[label] = {"skipped": "time budget spent"}
            res.save()
            continue
        eng = None
        try:
            t1 = time.perf_counter()
            eng = zo2(model, device, MeZO(**MEZO_ARGS), overlap=overlap, storage="fp16")
            build_s = round(time.perf_counter() - t1, 1)
            reset_peak(device)
            out[label] = {"overlap": overlap, "storage": "fp16", "engine_build_s": build_s,
                          "resident_gib": gib(mem_now(device)), **time_steps(eng, device, args, f"{name} {label}")}
        except Exception as exc:  # noqa: BLE001
            out[label] = err(exc)
            log(f"{name} {label} failed: {exc}")
        finally:
            if eng is not None:
                try:
                    eng.close()  # restores the module classes; parameters stay on the host copies
                except Exception as exc:  # noqa: BLE001
                    log(f"{name} {label} close failed: {exc}")
            del eng
        res.save()

    mezo, z = out.get("mezo", {}), out.get("zo2", {})
    ratios = {}
    if "tokens_per_s" in mezo:
        for label in ("zo2", "zo2_no_overlap"):
            if "tokens_per_s" in out.get(label, {}):
                ratios[f"{label}/mezo_tokens_per_s"] = round(out[label]["tokens_per_s"] / mezo["tokens_per_s"], 3)
                if mezo.get("peak_mem_gib") and out[label].get("peak_mem_gib"):
                    ratios[f"{label}/mezo_peak_mem"] = round(out[label]["peak_mem_gib"] / mezo["peak_mem_gib"], 3)
    if "tokens_per_s" in z and "tokens_per_s" in out.get("zo2_no_overlap", {}):
        ratios["zo2_overlap_on/off_tokens_per_s"] = round(z["tokens_per_s"] / out["zo2_no_overlap"]["tokens_per_s"], 3)
    floor = out.get("floor", {})
    if "median_step_s" in floor:  # the compute-floor ratio: ZO step time / two no-grad forwards (goal <= 1.05)
        for label in ("mezo", "zo2", "zo2_no_overlap"):
            if "median_step_s" in out.get(label, {}):
                ratios[f"{label}/floor_step_s"] = round(out[label]["median_step_s"] / floor["median_step_s"], 3)
        ratios["floor_goal"] = "mezo/floor_step_s and zo2/floor_step_s <= 1.05"
    ratios["goal"] = "zo2/mezo_tokens_per_s >= 0.95"
    out["ratios"] = ratios
    res.save()
    del model
    reset_peak(device)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny OPT instead of the 1.3B/2.7B/6.7B shapes (CPU logic check)")
    ap.add_argument("--sizes", default=None, help="comma-separated subset of " + ",".join(SHAPES))
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; 64 with --tiny)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3; 1 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10; 2 with --tiny)")
    ap.add_argument("--check-steps", type=int, default=5)
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--attn", default=None, help="attention implementation (default sdpa on cuda, eager on cpu)")
    ap.add_argument("--budget-s", type=float, default=400.0, help="start nothing new after this many seconds")
    ap.add_argument("--out", default=None, help="JSON file, rewritten after every result")
    args = ap.parse_args(argv)
    args.seq = args.seq or (64 if args.tiny else 2048)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    args.steps = args.steps or (2 if args.tiny else 10)
    args.attn = args.attn or ("sdpa" if args.device.startswith("cuda") else "eager")
    return args


def main(argv=None) -> int:
    from _results import machine, open_device, run_check, run_entry

    args = parse_args(argv)
    device = open_device(args.device, log)
    if device is None:
        return 2
    shapes = TINY_SHAPES if args.tiny else SHAPES
    names = list(shapes) if (args.tiny or not args.sizes) else [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [n for n in names if n not in shapes]
    if bad:
        log(f"unknown size(s) {bad}; allowed: {', '.join(shapes)}")
        return 2
    import transformers

    doc = {
        "benchmark": "zo2_gpu",
        "config": {"device": str(device), "tiny": args.tiny, "sizes": names, "batch": args.batch, "seq": args.seq,
                   "warmup": args.warmup, "steps": args.steps, "dtype": "float16", "init": "random",
                   "attn": args.attn, "zo2": {"blocks": "all", "storage": "fp16", "bucket": True,
                                              "pin_memory": device.type == "cuda"}},
        "machine": machine(device, transformers=transformers.__version__),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "goal": "zo2/mezo tokens/s >= 0.95; correctness: losses equal (ZO2 == InPlaceMeZO, fp32)",
        "sizes": {},
    }
    res = Results(args.out, doc)
    res.save()
    if not args.skip_check:
        run_check(doc, res, device, lambda: correctness(args, device),
                  lambda c: f"correctness: losses equal {c['losses_equal']}, max abs loss diff "
                            f"{c['max_abs_loss_diff']:.3g}, params equal {c['params_equal_after_flush']}", log)

    def release() -> None:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for name in names:
        run_entry(doc["sizes"], name, lambda: bench_size(name, shapes[name], args, device, res), res, log, T_START,
                  args.budget_s, after=release)
    doc["summary"] = {n: doc["sizes"][n].get("ratios") for n in names}
    res.save()
    print(json.dumps(doc["summary"] | {"correctness_losses_equal": doc.get("correctness", {}).get("losses_equal")},
                     indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
