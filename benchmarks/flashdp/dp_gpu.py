"""FlashDP on one GPU (compiled Triton clip-sum kernels) vs non-private training and Opacus: throughput, peak memory.

For a GPT-2-medium-shaped model (HF ``GPT2Config``: n_embd 1024, 24 layers, 16 heads, vocab 50257) and a
LLaMA-1B-shaped one (HF ``LlamaConfig``: hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192,
vocab 128256, tied embeddings), random init, built on the GPU, ``--warmup`` untimed + ``--steps`` timed
first-order steps (forward, backward, DP work, SGD update) of:

    non_dp            loss.backward() + optimizer.step()
    flashdp           ``FlashDP("per_layer")``: the layers' backward runs ``plait.kernels.dp_clip``'s Triton kernels
                      (per-sample norm, clip, batch sum and Philox noise fused; CUDA tensors only)
    opacus_per_layer  Opacus hooks (``GradSampleModule``) + ``DPPerLayerOptimizer``, same thresholds C/sqrt(K)
                      (only if opacus imports; HF Conv1D gets the Linear rule, as in benchmarks/flashdp/dp_speed.py)
    flashdp_varying   ``flashdp`` with the batch size and length changing every step, as Poisson sampling and
                      padding to the longest example make them in training (the kernels must not re-tune)
    dp_flat           ``FlashDP("flat")`` (not run by default: ``--variants`` adds it)

in each of ``--dtypes``: ``bf16`` (fp32 weights, ``torch.autocast`` bf16), ``bf16p`` (bf16 weights, no
autocast) and ``fp32`` (IEEE fp32 matmuls, TF32 off). Only Linear/Conv1D layers train (embeddings, norms and
the tied LM head are frozen) in every variant; the loss is the sum over samples of each sample's mean
next-token loss (what FlashDP requires); σ = 1, C = 1. It reports tokens/s (batch*seq / median step time),
``torch.cuda.max_memory_allocated`` over the steps (peak reset after the build) and, per model and dtype, the
ratios flashdp/non_dp tokens/s (goal >= 0.9), flashdp/non_dp step time (the floor ratio, goal <= 1.10, as
benchmarks/flashdp/dp_speed.py reports on CPU), flashdp/non_dp peak memory and flashdp/opacus peak memory.

Before the sizes, a correctness check: FlashDP per-layer with σ = 0 on a small fp32 GPT-2 on the device (Triton
path) vs the same model in float64 on the CPU (PyTorch path): max abs gradient difference relative to the
largest gradient entry.

Each (model, dtype, variant) is guarded, so an OOM or error is recorded and the rest still run; the JSON file
(``--out``) is rewritten after every result; nothing new starts after ``--budget-s``. Timings are reported,
never asserted. Run on the GPU machine (normally through ``bash benchmarks/gpu/run_all.sh``):

    python benchmarks/flashdp/dp_gpu.py --out $OUT/dp_gpu.json
    python benchmarks/flashdp/dp_gpu.py --models gpt2-medium --dtypes bf16p --steps 3 --out /tmp/x.json

Check the logic on CPU with tiny models (the PyTorch path; the Triton kernels only run on CUDA tensors):

    python benchmarks/flashdp/dp_gpu.py --device cpu --tiny --out /tmp/dp_gpu_cpu.json

Works without plait being installed (imports the flashdp modules from this checkout).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "gpu"))
from _results import Results, err, gib, import_from_checkout, mem_now, mem_peak, reset_peak, sync  # noqa: E402  (benchmarks/gpu/_results.py)
from dp_speed import register_opacus_conv1d  # noqa: E402  (benchmarks/flashdp/dp_speed.py: stdlib imports only)

T_START = time.perf_counter()

MODELS = {  # name: (family, config kwargs, default batch)
    "gpt2-medium": ("gpt2", dict(vocab_size=50257, n_embd=1024, n_layer=24, n_head=16, n_positions=1024), 8),
    "llama-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                               num_key_value_heads=8, intermediate_size=8192, max_position_embeddings=2048,
                               tie_word_embeddings=True), 4),
}
TINY_MODELS = {
    "gpt2-tiny": ("gpt2", dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128), 2),
    "llama-tiny": ("llama", dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=128,
                                 tie_word_embeddings=True), 2),
}
VARIANTS = ("non_dp", "flashdp", "opacus_per_layer", "flashdp_varying", "dp_flat")
DEFAULT_VARIANTS = "non_dp,flashdp,opacus_per_layer,flashdp_varying"
DTYPES = ("bf16", "bf16p", "fp32")
SIGMA, C, DELTA, DATASET_SIZE, LR = 1.0, 1.0, 1e-5, 50_000, 1e-4  # delta < 1/N


def log(*a) -> None:
    print(f"[dp_gpu {time.perf_counter() - T_START:6.1f}s]", *a, file=sys.stderr, flush=True)


# --- plait import (installed, or straight from this checkout) ----------------------------------------------------
FlashDP = import_from_checkout("plait.plugins.flashdp.transform", log).FlashDP


# --- helpers ----------------------------------------------------------------------------------------------------


def build_model(spec, device, dtype: str, attn: str, seed: int = 0):
    """Random init on ``device`` (fp32 weights; bf16 weights for ``bf16p``), train mode, dropout off, only the
    Linear/Conv1D layers trainable (embedding, norms and a tied head frozen)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers.pytorch_utils import Conv1D

    family, kw, _ = spec
    if family == "gpt2":
        cfg = GPT2Config(**kw, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        cls = GPT2LMHeadModel
    else:
        cfg = LlamaConfig(**kw, attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
        cls = LlamaForCausalLM
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg)
    if dtype == "bf16p":
        model = model.to(torch.bfloat16)
    model.train()
    model.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, Conv1D)):
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
    model.get_input_embeddings().weight.requires_grad_(False)  # also freezes a tied head
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(step: int, batch: int, seq: int, vocab: int, device):
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    pos = torch.arange(seq, device=device).unsqueeze(0).expand(batch, -1)  # per-sample rows for Opacus
    return ids, pos


def lm_loss(logits, ids):
    """Σ_samples mean next-token nll, computed in fp32."""
    B, T, V = logits.shape
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ids[:, 1:].reshape(-1),
                                            reduction="none")
    return nll.view(B, T - 1).mean(1).sum()


def autocast_ctx(device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Runner:
    """One variant on one model; ``step(ids, pos, t)`` -> loss."""

    def __init__(self, variant: str, model, batch: int, device, dtype: str):
        self.variant, self.model, self.device, self.dtype = variant, model, device, dtype
        self.fwd = model
        params = trainable(model)
        self.extra = {}
        if variant == "non_dp":
            self.opt = torch.optim.SGD(params, lr=LR)
        elif variant in ("flashdp", "flashdp_varying", "dp_flat"):
            # fixed batches, not Poisson sampling: no privacy guarantee, so allow_no_privacy (the cost is the same)
            self.dp = FlashDP("flat" if variant == "dp_flat" else "per_layer", C, {}, SIGMA, None, DELTA, [],
                              "freeze", True, False, "opacus")
            self.dp.prepare(model, dataset_size=DATASET_SIZE, batch_size=batch, steps=1000, seed=0)
            self.opt = torch.optim.SGD(trainable(model), lr=LR)
            self.extra = {"groups": len(self.dp.groups)}
        elif variant == "opacus_per_layer":
            register_opacus_conv1d()
            from opacus import GradSampleModule
            from opacus.optimizers import DPPerLayerOptimizer

            self.fwd = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
            k = len(params)
            self.opt = DPPerLayerOptimizer(torch.optim.SGD(params, lr=LR), noise_multiplier=SIGMA,
                                           max_grad_norm=[C / math.sqrt(k)] * k, expected_batch_size=batch,
                                           loss_reduction="sum")
            self.extra = {"groups": k}
        else:
            raise ValueError(f"unknown variant {variant!r}")

    def step(self, ids, pos, t: int) -> float:
        self.opt.zero_grad(set_to_none=True)
        if self.variant != "non_dp" and hasattr(self, "dp"):
            self.dp.before_backward(t)
        with autocast_ctx(self.device, self.dtype):
            logits = self.fwd(input_ids=ids, position_ids=pos, use_cache=False).logits
        loss = lm_loss(logits, ids)
        loss.backward()
        if self.variant != "non_dp" and hasattr(self, "dp"):
            self.dp(self.model, t)
        if self.variant == "opacus_per_layer" and self.dtype == "bf16":
            # under autocast Opacus' per-sample grads are bf16 (bf16 activations and backprops), and its noisy
            # sum, assigned to the fp32 parameter's .grad, is refused by torch ≥ 2.10 (grad_dtype); cast them to
            # the parameter's dtype first, as FlashDP accumulates in fp32 (the cast is in the timed step)
            for p in trainable(self.model):
                if getattr(p, "grad_sample", None) is not None and p.grad_sample.dtype != p.dtype:
                    p.grad_sample = p.grad_sample.to(p.dtype)
        self.opt.step()
        return float(loss.detach())


def time_variant(runner, args, batch, seq, vocab, device, label, vary: bool = False) -> dict:
    """``vary``: step t uses batch − (t mod 3) rows of seq − 8·(t mod 4) tokens (never the same shape twice in
    a row), so a kernel that re-tunes per shape shows in the step times."""
    times, losses, tokens = [], [], []
    for t in range(args.warmup + args.steps):
        b, n = (max(1, batch - t % 3), max(8, seq - 8 * (t % 4))) if vary else (batch, seq)
        ids, pos = make_batch(t, b, n, vocab, device)
        tokens.append(b * n)
        sync(device)
        t0 = time.perf_counter()
        losses.append(runner.step(ids, pos, t + 1))
        sync(device)
        times.append(time.perf_counter() - t0)
        log(f"  {label}: step {t}{' (warm-up)' if t < args.warmup else ''} {times[-1]:.3f}s loss {losses[-1]:.4f}")
    timed = times[args.warmup:]
    med = statistics.median(timed)
    tps = sum(tokens[args.warmup:]) / sum(timed) if vary else batch * seq / med
    return {"median_step_s": round(med, 4), "min_step_s": round(min(timed), 4),
            "tokens_per_s": round(tps, 1), "step_s": [round(x, 4) for x in times],
            "peak_mem_gib": gib(mem_peak(device)), "losses": [round(x, 4) for x in losses]}


# --- correctness ------------------------------------------------------------------------------------------------
def correctness(args, device) -> dict:
    """σ = 0 FlashDP per-layer grads: fp32 on ``device`` (Triton on CUDA) vs float64 on CPU (PyTorch path)."""
    spec = ("gpt2", dict(vocab_size=512, n_embd=64 if args.tiny else 256, n_layer=2, n_head=4, n_positions=128), 4)
    B, T = 4, 64
    out = {"model": dict(spec[1]), "batch": B, "seq": T}
    grads = {}
    for where, dev, dt in (("device", device, torch.float32), ("cpu_fp64", torch.device("cpu"), torch.float64)):
        model = build_model(spec, torch.device("cpu"), "fp32", "eager").to(device=dev, dtype=dt)
        t = FlashDP("per_layer", 0.05, {}, 0.0, None, DELTA, [], "freeze", True, False, "opacus")
        t.prepare(model, dataset_size=1000, batch_size=B, steps=10, seed=0)
        ids, pos = make_batch(0, B, T, 512, dev)
        t.before_backward(1)
        lm_loss(model(input_ids=ids, position_ids=pos, use_cache=False).logits, ids).backward()
        t.expected_batch = 1.0  # raw clipped sums
        t(model, 1)
        grads[where] = {n: p.grad.detach().to("cpu", torch.float64) for n, p in model.named_parameters()
                        if p.grad is not None}
        if where == "device":
            out["clipped_fraction_device"] = float(torch.stack(
                [(t.ctx.last_norms[g.index] > g.threshold).float().mean().cpu() for g in t.groups]).mean())
        del model
    scale = max(float(g.abs().max()) for g in grads["cpu_fp64"].values())
    diff = max(float((grads["device"][n] - grads["cpu_fp64"][n]).abs().max()) for n in grads["cpu_fp64"])
    out.update(tensors=len(grads["cpu_fp64"]), max_abs_grad=scale, max_abs_diff=diff, max_rel_diff=diff / scale,
               path="triton" if device.type == "cuda" else "torch")
    return out


# --- one model -----------------------------------------------------------------------------------------------------
def bench(name: str, spec, dtype: str, args, device, res: Results) -> None:
    key = f"{name}/{dtype}"
    out = res.doc["runs"].setdefault(key, {})
    family, kw, default_batch = spec
    batch = args.batch or default_batch
    seq = args.seq or (64 if args.tiny else 1024)
    vocab = kw["vocab_size"]
    out.update(model=name, dtype=dtype, batch=batch, seq=seq,
               autocast="bf16" if dtype == "bf16" else None,
               weights="bf16" if dtype == "bf16p" else "fp32")
    for v in args.variant_list:
        if time.perf_counter() - T_START > args.budget_s:
            out[v] = {"skipped": "time budget spent"}
            res.save()
            continue
        if v == "opacus_per_layer" and not args.have_opacus:
            out[v] = {"skipped": "opacus not importable"}
            res.save()
            continue
        model = runner = None
        try:
            reset_peak(device)
            t0 = time.perf_counter()
            model = build_model(spec, device, dtype, args.attn)
            runner = Runner(v, model, batch, device, dtype)
            build_s = round(time.perf_counter() - t0, 1)
            out.setdefault("n_params", sum(p.numel() for p in model.parameters()))
            out.setdefault("n_trainable", sum(p.numel() for p in trainable(model)))
            resident = gib(mem_now(device))
            reset_peak(device)
            out[v] = {"build_s": build_s, "resident_gib": resident, **runner.extra,
                      **time_variant(runner, args, batch, seq, vocab, device, f"{key} {v}",
                                     vary=v == "flashdp_varying")}
        except Exception as exc:  # noqa: BLE001  (OOM included: record it and go on)
            out[v] = err(exc)
            log(f"{key} {v} failed: {out[v]['error'][:300]}")
        finally:
            del runner, model
            reset_peak(device)
        res.save()

    def get(v, k):
        return out.get(v, {}).get(k)

    ratios = {}
    base_tps, base_mem = get("non_dp", "tokens_per_s"), get("non_dp", "peak_mem_gib")
    for v in args.variant_list:
        if v == "non_dp":
            continue
        if base_tps and get(v, "tokens_per_s"):
            ratios[f"{v}/non_dp_tokens_per_s"] = round(get(v, "tokens_per_s") / base_tps, 3)
        if base_mem and get(v, "peak_mem_gib"):
            ratios[f"{v}/non_dp_peak_mem"] = round(get(v, "peak_mem_gib") / base_mem, 3)
    if get("flashdp", "peak_mem_gib") and get("opacus_per_layer", "peak_mem_gib"):
        ratios["flashdp/opacus_per_layer_peak_mem"] = round(get("flashdp", "peak_mem_gib") /
                                                            get("opacus_per_layer", "peak_mem_gib"), 3)
    if get("flashdp", "tokens_per_s") and get("opacus_per_layer", "tokens_per_s"):
        ratios["flashdp/opacus_per_layer_tokens_per_s"] = round(get("flashdp", "tokens_per_s") /
                                                                get("opacus_per_layer", "tokens_per_s"), 3)
    if get("flashdp", "median_step_s") and get("non_dp", "median_step_s"):
        # the floor ratio of issue 23 (as benchmarks/flashdp/dp_speed.py on CPU): FlashDP step / non-DP step, goal <= 1.10
        ratios["flashdp/non_dp_step_s"] = round(get("flashdp", "median_step_s") / get("non_dp", "median_step_s"), 3)
        ratios["floor_goal"] = "flashdp/non_dp_step_s <= 1.10"
        ratios["floor_goal_met"] = ratios["flashdp/non_dp_step_s"] <= 1.10
    r = ratios.get("flashdp/non_dp_tokens_per_s")
    ratios["goal"] = "flashdp/non_dp tokens/s >= 0.9"
    ratios["goal_met"] = None if r is None else r >= 0.9
    out["ratios"] = ratios
    res.save()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny GPT-2 / LLaMA shapes (CPU logic check)")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--dtypes", default="bf16,bf16p,fp32", help="comma-separated subset of " + ",".join(DTYPES))
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 8 gpt2-medium, 4 llama-1b)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 1024; 64 with --tiny)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps (default 2; 1 with --tiny)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 2 with --tiny)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--attn", default=None, help="attention implementation (default sdpa)")
    ap.add_argument("--budget-s", type=float, default=170.0, help="start nothing new after this many seconds")
    ap.add_argument("--out", default=None, help="JSON file, rewritten after every result")
    args = ap.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    args.steps = args.steps or (2 if args.tiny else 5)
    args.attn = args.attn or "sdpa"
    args.variant_list = [v.strip() for v in args.variants.split(",") if v.strip()]
    return args


def main(argv=None) -> int:
    from _results import machine, open_device, run_check, run_entry

    args = parse_args(argv)
    device = open_device(args.device, log)
    if device is None:
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means IEEE fp32 (FlashDP's fp32 kernels use "ieee")
    torch.backends.cudnn.allow_tf32 = False
    models = TINY_MODELS if args.tiny else MODELS
    names = list(models) if (args.tiny or not args.models) else [s.strip() for s in args.models.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = [n for n in names if n not in models] + [d for d in dtypes if d not in DTYPES] + \
          [v for v in args.variant_list if v not in VARIANTS]
    if bad:
        log(f"unknown model/dtype/variant {bad}; allowed: {', '.join(models)} / {', '.join(DTYPES)} / "
            f"{', '.join(VARIANTS)}")
        return 2
    try:
        import opacus
        args.have_opacus, opacus_version = True, opacus.__version__
    except Exception as exc:  # noqa: BLE001
        args.have_opacus, opacus_version = False, f"not importable: {exc}"
    import transformers

    from plait.kernels import dp_clip

    doc = {
        "benchmark": "dp_gpu",
        "config": {"device": str(device), "tiny": args.tiny, "models": names, "dtypes": dtypes,
                   "variants": args.variant_list, "batch": args.batch or "per model", "seq": args.seq or "default",
                   "warmup": args.warmup, "steps": args.steps, "attn": args.attn, "sigma": SIGMA,
                   "max_grad_norm": C, "optimizer": "SGD", "trainable": "Linear/Conv1D only (embeddings, norms, "
                   "tied head frozen)", "loss": "sum over samples of mean token nll", "tf32": False,
                   "shapes": {n: models[n][1] for n in names}},
        "machine": machine(device, transformers=transformers.__version__, opacus=opacus_version,
                           triton=getattr(dp_clip.triton, "__version__", None) if dp_clip.HAVE_TRITON else None),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "goal": "flashdp/non_dp tokens/s >= 0.9; flashdp peak memory close to non_dp and well below Opacus",
        "runs": {},
    }
    res = Results(args.out, doc)
    res.save()
    if not args.skip_check:
        run_check(doc, res, device, lambda: correctness(args, device),
                  lambda c: f"correctness: max rel grad diff {c['max_rel_diff']:.3g} ({c['path']} path)", log)
    for dtype in dtypes:  # dtype-major: the first dtype of every model before the next dtype
        for name in names:
            run_entry(doc["runs"], f"{name}/{dtype}", lambda: bench(name, models[name], dtype, args, device, res),
                      res, log, T_START, args.budget_s)
    doc["summary"] = {k: r.get("ratios", r.get("skipped") or r.get("error")) for k, r in doc["runs"].items()}
    res.save()
    print(json.dumps({"summary": doc["summary"], "correctness": {k: v for k, v in doc.get("correctness", {}).items()
                                                                 if k != "traceback"}}, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
