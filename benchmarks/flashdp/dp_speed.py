"""Step time of FlashDP (DP clipping fused into the backward) vs non-private training and Opacus, on CPU.

Measures the median wall time of one first-order training step (forward, backward, DP work, SGD update) of a
small HF ``GPT2LMHeadModel`` (default: vocab 2048, n_embd 256, 2 layers, 4 heads, random init, fp32; batch 8,
seq 128, same random token batches for every variant) for:

    non_dp            plain loss.backward() + optimizer.step() (the baseline)
    flashdp           ``FlashDP("per_layer")``: each parameter tensor is a clip group (C_k = C/sqrt(K)); the
                      layers' backward clips per sample, sums and adds noise (CPU: the PyTorch path of
                      ``plait.kernels.dp_clip``; the Triton kernels only run on CUDA tensors)
    dp_flat           ``FlashDP("flat")``: one global threshold C (ghost norms / instantiation, book-keeping)
    opacus_flat       Opacus hooks: ``GradSampleModule`` + ``DPOptimizer`` (per-sample grads held, flat clip)
    opacus_per_layer  Opacus hooks + ``DPPerLayerOptimizer`` (thresholds C/sqrt(K), as flashdp)
    opacus_ghost      Opacus ghost clipping: ``GradSampleModuleFastGradientClipping`` +
                      ``DPOptimizerFastGradientClipping`` + ``DPLossFastGradientClipping`` (two backwards)

Every variant uses σ = 1.0, C = 1.0, the same model (same seed), the same trainable parameters and the same
loss: the SUM over samples of each sample's mean next-token loss (what FlashDP requires; Opacus runs with
``loss_reduction="sum"``). By default only the Linear/Conv1D layers train (``--train linear``): embeddings and
LayerNorms are frozen in every variant so that every method does the same DP work (the research note's
set-up); the LM head is untied from the embedding and trained (``--head untied``; ``--head tied`` keeps GPT-2's
tied head, which is then frozen with the embedding). ``--train all`` trains every parameter.

Opacus 1.6 has no per-sample gradient rule for HF's ``Conv1D`` (it would fall back to functorch/vmap); by
default this script registers one (the Linear rule with the weight transposed) and a ghost-norm rule
(Opacus' Linear one, transpose-invariant), so Opacus is measured at its best (``--opacus-conv1d functorch``
keeps Opacus' own fallback). Opacus variants do no privacy accounting here (no ``PrivacyEngine``); FlashDP's
``__call__`` does (an RDP step + epsilon per step) and that cost is included.

The variants run interleaved in one process (round r: every variant does step r, the starting variant rotating
each round); the first ``--warmup`` rounds are not in the summary; after ``--steps`` timed rounds, rounds go on
until the headline ratios' bootstrap 95 % intervals are within ±5 % (``benchmarks/_stable.py``) or
``--max-rounds`` / ``--max-seconds`` run out. Reports the median/min/mean ms per step, tokens/s (batch*seq per
step), ratios to non_dp and the goals (median of per-round ratios, with the interval; ``unsettled`` when it is
wider than ±5 % or straddles the goal) flashdp/non_dp <= 1.10 and
best_opacus/flashdp >= 1.8 (CPU). ``flashdp_no_noise`` is FlashDP at σ = 0 (the same clipping): with it the
JSON splits flashdp/non_dp into the clipping (flashdp_no_noise/non_dp) and the noise (flashdp/flashdp_no_noise).
``first_loss`` must agree across variants (same model, same batch). A
variant that fails is reported with its error string; nothing is asserted.

Run (from the repository root; the defaults take 1-3 minutes on 2 cores):

    .venv/bin/python benchmarks/flashdp/dp_speed.py
    .venv/bin/python benchmarks/flashdp/dp_speed.py --layers 4 --steps 20
    .venv/bin/python benchmarks/flashdp/dp_speed.py --variants non_dp,flashdp,opacus_per_layer --train all

One JSON object is printed on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]  # benchmarks/: _common.py, _stable.py
sys.path.insert(0, str(HERE))

VARIANTS = ("non_dp", "flashdp", "flashdp_no_noise", "dp_flat", "opacus_flat", "opacus_per_layer", "opacus_ghost")
OPACUS = ("opacus_flat", "opacus_per_layer", "opacus_ghost")
SIGMA, C, DELTA, DATASET_SIZE, LR = 1.0, 1.0, 1e-5, 10_000, 1e-3
GOALS = {"flashdp/non_dp": ("<=", 1.10), "best_opacus/flashdp": (">=", 1.8)}


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """Flags shared with ``dp_memory.py``."""
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", default="linear", choices=["linear", "all"],
                    help="linear: only Linear/Conv1D layers train (embeddings, LayerNorms frozen); all: everything")
    ap.add_argument("--head", default="untied", choices=["untied", "tied"],
                    help="untied: the LM head is its own (trained) Linear; tied: GPT-2's head = token embedding")
    ap.add_argument("--attn", default="sdpa", help="HF attention implementation")
    ap.add_argument("--opacus-conv1d", default="linear-rule", choices=["linear-rule", "functorch"],
                    help="per-sample rule Opacus uses for HF Conv1D (it has none of its own)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_args(ap)
    ap.add_argument("--warmup", type=int, default=2, help="rounds not counted")
    ap.add_argument("--steps", type=int, default=8, help="timed rounds at least")
    ap.add_argument("--max-rounds", type=int, default=40, help="timed rounds at most (until the ratios settle)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="stop adding rounds after this")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    return ap.parse_args(argv)


# --- model, data, loss --------------------------------------------------------------------------------------------
def build_model(args, seed: int = 0):
    """Random-init GPT-2 (dropout off, train mode: Opacus' hooks only record in training mode), trainable set
    according to ``--train`` / ``--head``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    cfg = GPT2Config(vocab_size=args.vocab, n_embd=args.d_model, n_layer=args.layers, n_head=args.heads,
                     n_positions=max(args.seq, 128), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=args.head == "tied")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    if args.attn:
        model.config._attn_implementation = args.attn
    model.train()
    if args.train == "linear":
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, (torch.nn.Linear, Conv1D)):
                for p in m.parameters(recurse=False):
                    p.requires_grad_(True)
        model.transformer.wte.weight.requires_grad_(False)  # a tied head is the embedding: frozen with it
    return model


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(step: int, args):
    import torch

    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    # explicit per-sample position ids: a (1, T) broadcast would give Opacus no per-sample rows for wpe
    pos = torch.arange(args.seq).unsqueeze(0).expand(args.batch, -1)
    return ids, pos


def _logits(model, ids, pos):
    return model(input_ids=ids, position_ids=pos, use_cache=False).logits


def lm_loss(logits, ids):
    """Σ_samples (mean next-token loss of the sample): the sum-over-samples loss every variant back-propagates."""
    import torch.nn.functional as F

    B, T, V = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), reduction="none")
    return nll.view(B, T - 1).mean(1).sum()


# --- Opacus: a per-sample rule for HF Conv1D -----------------------------------------------------------------------
_CONV1D_REGISTERED = False


def register_opacus_conv1d() -> None:
    """Per-sample grad (Linear rule, weight (in, out)) and ghost norm (Opacus' Linear rule) for HF Conv1D."""
    global _CONV1D_REGISTERED
    if _CONV1D_REGISTERED:
        return
    import torch
    from opacus.grad_sample import register_grad_sampler, register_norm_sampler
    from opacus.grad_sample.linear import compute_linear_norm_sample
    from transformers.pytorch_utils import Conv1D

    @register_grad_sampler(Conv1D)
    def _conv1d_grad_sample(layer, activations, backprops):
        a = activations[0].to(backprops.dtype)
        ret = {}
        if layer.weight.requires_grad:
            ret[layer.weight] = torch.einsum("n...i,n...j->nij", a, backprops)  # (B, in, out)
        if layer.bias is not None and layer.bias.requires_grad:
            ret[layer.bias] = torch.einsum("n...k->nk", backprops)
        return ret

    register_norm_sampler(Conv1D)(compute_linear_norm_sample)  # ‖G_b‖ is the same for W and Wᵀ
    _CONV1D_REGISTERED = True


# --- variants --------------------------------------------------------------------------------------------------------
class Runner:
    """One variant: its own model copy, optimizer and DP machinery; ``step(ids, pos, t)`` -> loss (float)."""

    def __init__(self, variant: str, args):
        import torch

        self.variant, self.args = variant, args
        self.model = build_model(args)
        self.n_trainable = sum(p.numel() for p in trainable(self.model))
        self.extra = {}
        v = variant
        if v == "non_dp":
            self.opt = torch.optim.SGD(trainable(self.model), lr=LR)
        elif v in ("flashdp", "flashdp_no_noise", "dp_flat"):
            from plait.plugins.flashdp.transform import FlashDP

            # fixed batches, not Poisson sampling: no privacy guarantee, so allow_no_privacy (the cost is the same)
            # flashdp_no_noise: σ = 0, the same clipping — what the Gaussian draw costs is flashdp minus it
            self.dp = FlashDP("flat" if v == "dp_flat" else "per_layer", C, {}, 0.0 if v == "flashdp_no_noise"
                              else SIGMA, None, DELTA, [], "freeze",
                              True, False, "opacus")
            self.dp.prepare(self.model, dataset_size=DATASET_SIZE, batch_size=args.batch, steps=1000, seed=0)
            self.opt = torch.optim.SGD(trainable(self.model), lr=LR)
            self.extra = {"groups": len(self.dp.groups), "frozen_by_flashdp": len(self.dp.frozen)}
        elif v in ("opacus_flat", "opacus_per_layer"):
            if args.opacus_conv1d == "linear-rule":
                register_opacus_conv1d()
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

            self.gsm = GradSampleModule(self.model, batch_first=True, loss_reduction="sum", strict=False)
            params = trainable(self.gsm)
            base = torch.optim.SGD(params, lr=LR)
            if v == "opacus_flat":
                self.opt = DPOptimizer(base, noise_multiplier=SIGMA, max_grad_norm=C, expected_batch_size=args.batch,
                                       loss_reduction="sum")
            else:  # the equal split FlashDP uses: C_k = C / sqrt(K), noise σ·sqrt(Σ C_k²) = σ·C
                k = len(params)
                self.opt = DPPerLayerOptimizer(base, noise_multiplier=SIGMA, max_grad_norm=[C / math.sqrt(k)] * k,
                                               expected_batch_size=args.batch, loss_reduction="sum")
                self.extra = {"groups": k}
        elif v == "opacus_ghost":
            if args.opacus_conv1d == "linear-rule":
                register_opacus_conv1d()
            from opacus.grad_sample import GradSampleModuleFastGradientClipping
            from opacus.optimizers import DPOptimizerFastGradientClipping
            from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

            self.gsm = GradSampleModuleFastGradientClipping(self.model, batch_first=True, loss_reduction="sum",
                                                            strict=False, max_grad_norm=C, use_ghost_clipping=True)
            base = torch.optim.SGD(trainable(self.gsm), lr=LR)
            self.opt = DPOptimizerFastGradientClipping(base, noise_multiplier=SIGMA, max_grad_norm=C,
                                                       expected_batch_size=args.batch, loss_reduction="sum")
            self.crit = DPLossFastGradientClipping(self.gsm, self.opt, torch.nn.CrossEntropyLoss(reduction="sum"),
                                                   loss_reduction="sum")
        else:
            raise ValueError(f"unknown variant {v!r}")

    def step(self, ids, pos, t: int) -> float:
        v = self.variant
        self.opt.zero_grad(set_to_none=True)
        if v == "non_dp":
            loss = lm_loss(_logits(self.model, ids, pos), ids)
            loss.backward()
        elif v in ("flashdp", "flashdp_no_noise", "dp_flat"):
            self.dp.before_backward(t)
            loss = lm_loss(_logits(self.model, ids, pos), ids)
            loss.backward()
            self.dp(self.model, t)
        elif v in ("opacus_flat", "opacus_per_layer"):
            loss = lm_loss(_logits(self.gsm, ids, pos), ids)
            loss.backward()
        else:  # opacus_ghost: per-sample token-sum losses / (T-1) = per-sample mean, as lm_loss
            logits = _logits(self.gsm, ids, pos)
            B, T, V = logits.shape
            loss = self.crit(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1), shape=(B, T - 1, V)) / (T - 1)
            loss.backward()
        self.opt.step()
        return float(loss.detach())


def err(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1500]


# --- main ------------------------------------------------------------------------------------------------------------
def _ratio(a, b):
    return None if a is None or b is None or b == 0 else round(a / b, 3)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from _common import choose_variants, emit, log
    from _stable import bootstrap_ratio, judge, load_average

    chosen = choose_variants(args.variants, VARIANTS, ("non_dp",))

    t_start = time.perf_counter()
    runners, errors = {}, {}
    for v in chosen:
        try:
            runners[v] = Runner(v, args)
        except Exception as exc:  # noqa: BLE001  (e.g. an Opacus incompatibility: report it, go on)
            errors[v] = {"error": err(exc), "where": "build", "traceback": traceback.format_exc()[-2000:]}
            log(f"[dp_speed] {v}: build failed: {err(exc)}")
    n_trainable = next(iter(runners.values())).n_trainable if runners else None
    log(f"[dp_speed] built {len(runners)} variants in {time.perf_counter() - t_start:.1f}s "
        f"({n_trainable / 1e6:.2f}M trainable params)" if runners else "[dp_speed] nothing built")

    times = {v: [] for v in runners}
    losses = {v: [] for v in runners}
    load_start, t_rounds = load_average(), time.perf_counter()

    def settled() -> bool:  # the headline ratios' 95 % intervals within ±5 %
        pairs = [("flashdp", "non_dp")] + [(o, "flashdp") for o in OPACUS if o in runners]
        return all(judge(*bootstrap_ratio(times[a][args.warmup:], times[b][args.warmup:]))["settled"]
                   for a, b in pairs if a in runners and b in runners)

    r = -1
    while True:
        r += 1
        timed_rounds = r - args.warmup
        if timed_rounds >= args.steps and (timed_rounds >= args.max_rounds or settled()
                                           or time.perf_counter() - t_rounds > args.max_seconds):
            break
        ids, pos = make_batch(r, args)
        live = [v for v in chosen if v in runners]
        order = live[r % len(live):] + live[: r % len(live)] if live else []
        for v in order:
            try:
                t0 = time.perf_counter()
                loss = runners[v].step(ids, pos, r + 1)
                times[v].append(time.perf_counter() - t0)
                losses[v].append(loss)
            except Exception as exc:  # noqa: BLE001
                errors[v] = {"error": err(exc), "where": f"step {r}", "traceback": traceback.format_exc()[-2000:]}
                log(f"[dp_speed] {v}: step {r} failed: {err(exc)}")
                del runners[v]
        tag = "warm-up" if r < args.warmup else "timed"
        log(f"[dp_speed] round {r} ({tag}): " + ", ".join(f"{v} {times[v][-1] * 1e3:.0f}ms" for v in chosen
                                                         if v in runners))

    tokens = args.batch * args.seq
    results = {}
    for v in chosen:
        if v in errors:
            results[v] = errors[v]
            continue
        timed = times[v][args.warmup:]
        med = statistics.median(timed)
        results[v] = {
            "median_ms": round(med * 1e3, 1),
            "min_ms": round(min(timed) * 1e3, 1),
            "mean_ms": round(statistics.fmean(timed) * 1e3, 1),
            "tokens_per_s": round(tokens / med, 1),
            "first_loss": round(losses[v][0], 5),
            "step_ms": [round(t * 1e3, 1) for t in times[v]],
            **runners[v].extra,
        }

    def med(v):
        return results.get(v, {}).get("median_ms")

    def paired(a, b, goal=None):  # median of per-round ratios with its bootstrap 95 % interval
        if a not in runners or b not in runners:
            return None
        return judge(*bootstrap_ratio(times[a][args.warmup:], times[b][args.warmup:]), goal=goal)

    base = med("non_dp")
    ratios = {f"{v}/non_dp": _ratio(med(v), base) for v in chosen if v != "non_dp"}
    ops = {v: med(v) for v in OPACUS if med(v) is not None}
    best = min(ops, key=ops.get) if ops else None
    ratios["best_opacus"] = best
    ratios["best_opacus/flashdp"] = _ratio(ops[best], med("flashdp")) if best else None
    ratios["flashdp/dp_flat"] = _ratio(med("flashdp"), med("dp_flat"))
    goals = {"flashdp/non_dp": paired("flashdp", "non_dp", GOALS["flashdp/non_dp"]),
             "best_opacus/flashdp": paired(best, "flashdp", GOALS["best_opacus/flashdp"]) if best else None}
    if "flashdp_no_noise" in runners:  # the clipping alone against the floor; flashdp over it is the noise's cost
        goals["flashdp_no_noise/non_dp"] = paired("flashdp_no_noise", "non_dp")
        goals["flashdp/flashdp_no_noise"] = paired("flashdp", "flashdp_no_noise")
    first = {v: results[v]["first_loss"] for v in chosen if "first_loss" in results[v]}
    emit({
        "benchmark": "dp_speed",
        "config": {"model": "GPT2LMHeadModel", "vocab": args.vocab, "d_model": args.d_model, "layers": args.layers,
                   "heads": args.heads, "batch": args.batch, "seq": args.seq, "dtype": "float32", "init": "random",
                   "train": args.train, "head": args.head, "trainable_params": n_trainable, "attn": args.attn,
                   "sigma": SIGMA, "max_grad_norm": C, "optimizer": "SGD", "loss": "sum over samples of mean token nll",
                   "opacus_conv1d": args.opacus_conv1d, "warmup": args.warmup, "steps": args.steps,
                   "threads": args.threads, "device": "cpu"},
        "machine": {"cpus": os.cpu_count(), "load_average_start": load_start, "load_average_end": load_average(),
                    "timed_rounds": len(next(iter(times.values()), [])) - args.warmup,
                    "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "opacus": _version("opacus")},
        "date": time.strftime("%Y-%m-%d"),
        "variants": results,
        "ratios": ratios,
        "goals": goals,
        "first_losses_agree": (max(first.values()) - min(first.values()) < 1e-4) if first else None,
        "notes": ["step_ms lists every round, warm-up included; median/min/mean and ratios use the timed rounds",
                  "CPU: FlashDP runs its PyTorch path (per-layer: blocks of instantiated per-sample grads clipped and "
                  "summed in one pass unless T^2(d_in+d_out) < 8 d_in d_out; flat: ghost norms where "
                  "2T^2 < d_in*d_out); the Triton kernels are GPU-only",
                  "Opacus variants do no accounting here; FlashDP's step includes its RDP accountant step",
                  "shared machine: step times vary round to round; differences under ~10% are noise"],
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    })


def _version(mod: str):
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return None


if __name__ == "__main__":
    main()
