"""Infinite-Sampling rollout schedulers side by side on CPU: peak live KV, decode steps, tokens/s.

One process, one tiny random-init HF model (default Qwen3 "small": hidden 256, 4 layers), ``--prompts`` random
prompts of ``--prompt-len`` tokens, ``G = --G`` completions each, ``g = --g`` concurrent rows. Completion lengths
are *scripted* (EOS banned before the scripted length, forced at it) from a long-tailed distribution: lognormal
with median ``--max-new / 8`` and sigma ``--sigma``, clipped to ``[1, --max-new]``. Sampling is seeded per
(step, prompt, sample), so every scheduler emits the same tokens (checked and reported).

Variants (all through the registered schedulers' ``generate``):

    full_group          all G of a prompt in one padded batch (HF generate)
    micro_group         rounds of g rows per prompt, KV released between rounds (the paper's naive baseline)
    continuous          g slots, FIFO refill across groups
    length_aware        continuous + FPTAS lanes / longest-first / SJF stealing over *predicted* lengths:
                        ``oracle`` (the scripted lengths) and ``noisy`` (scripted x lognormal(0, --noise))
    length_aware_sjf    the same noisy predictions with SJF inside lanes (lane_order=shortest_first)

Reported: decode steps, peak live KV bytes (measured from the slot cache tensors each step), wall seconds and
tokens/s (generated tokens / wall, planning included), each variant's repeats interleaved (rotating start).
Ratios: peak KV micro/full (goal <= 0.30), decode steps length_aware/micro (goal <= 0.55), tokens/s
length_aware/micro (goal >= 1.3); ``floor`` gives each schedule's decode steps over the analytic bound
max(⌈ΣL/g⌉, max L) and tokens/s length_aware/continuous; ``analytic`` holds the schedule simulator's values for the same lengths (the
real runs must equal them) and a noise sweep of simulated steps.

``predictors`` (no model; the schedule simulator) asks whether a *length predictor's* plans cut decode steps
on a synthetic token-conditioned task (see `predictor_task`): plans from a constant, the running mean, an MLP
on the prompt only (k = 0), an MLP on the prompt + first k generated tokens (partial decode, ``prefix_tokens``)
and the oracle, all after the same online training steps; steps include the probe rounds of the partial decode.

    .venv/bin/python benchmarks/infinite_sampling/sampling.py                  # ~2-4 minutes on 2 shared cores
    .venv/bin/python benchmarks/infinite_sampling/sampling.py --size tiny --max-new 64 --repeats 1   # quick look

One JSON object on stdout; progress on stderr. Nothing is asserted.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from plait.plugins.basics.models import build_causal_lm
from plait.plugins.infinite_sampling.kv_cache import kv_bytes_per_token
from plait.plugins.infinite_sampling.predictor import (
    ConstantPredictor,
    LengthPredictor,
    RunningMeanPredictor,
    kendall_tau,
    smape,
)
from plait.plugins.infinite_sampling.samplers import (
    ContinuousScheduler,
    FullGroupScheduler,
    LengthAwareScheduler,
    MicroGroupScheduler,
)
from plait.plugins.infinite_sampling.schedule import (
    FifoDispatcher,
    PlannedDispatcher,
    makespan_lower_bound,
    simulate_barrier,
    simulate_slots,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common.py, _stable.py
from _common import emit  # noqa: E402  (benchmarks/ is not a package)

T0 = time.perf_counter()


def log(*a) -> None:
    print(f"[sampling {time.perf_counter() - T0:6.1f}s]", *a, file=sys.stderr, flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen3", choices=["opt", "qwen3", "llama"])
    ap.add_argument("--size", default="small", choices=["tiny", "small", "100m"])
    ap.add_argument("--G", type=int, default=32)
    ap.add_argument("--g", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2, help="prompts per generate call (B)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of the scripted lengths")
    ap.add_argument("--noise", type=float, default=0.5, help="lognormal sigma of the noisy predictions")
    ap.add_argument("--repeats", type=int, default=2, help="timed generate calls per variant (interleaved)")
    ap.add_argument("--greedy", action="store_true", help="argmax instead of seeded sampling")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--skip-model", action="store_true", help="only the simulator parts")
    ap.add_argument("--predictor-steps", type=int, default=30, help="online training steps of the predictor part")
    ap.add_argument("--prefix-tokens", type=int, default=1, help="k of the partial-decode predictor (>= 1)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------------------------------- lengths
def scripted_lengths(rng: np.random.Generator, n: int, max_new: int, sigma: float) -> list[int]:
    x = rng.lognormal(mean=math.log(max_new / 8), sigma=sigma, size=n)
    return [int(v) for v in np.clip(np.ceil(x), 1, max_new)]


def noisy(rng: np.random.Generator, lengths: list[int], sigma: float) -> list[int]:
    return [max(1, int(round(v * rng.lognormal(0.0, sigma)))) for v in lengths]


def analytic(L: list[list[int]], P: int, g: int, pred_noisy: list[int], noise_rng_seed: int) -> dict:
    """Steps and peak live tokens from the schedule simulator (the real runs must equal these)."""
    B, G = len(L), len(L[0])
    jobs = [(b, i) for b in range(B) for i in range(G)]
    flat = [L[b][i] for b, i in jobs]
    lengths = dict(zip(jobs, flat))
    plen = {j: P for j in jobs}
    full = simulate_barrier(L, [P] * B)
    rounds = [L[b][k:k + g] for b in range(B) for k in range(0, G, g)]
    micro = simulate_barrier(rounds, [P] * len(rounds))
    cont = simulate_slots(lengths, g, FifoDispatcher(jobs), plen)
    oracle = simulate_slots(lengths, g, PlannedDispatcher(jobs, flat, g), plen)
    la = simulate_slots(lengths, g, PlannedDispatcher(jobs, pred_noisy, g), plen)
    la_sjf = simulate_slots(lengths, g, PlannedDispatcher(jobs, pred_noisy, g, lane_order="shortest_first"), plen)
    sweep = {}
    rng = np.random.default_rng(noise_rng_seed)
    for sigma in (0.0, 0.25, 0.5, 1.0):
        row = {"longest_first": [], "shortest_first": []}
        for _ in range(20):  # 20 noise draws per sigma
            pred = noisy(rng, flat, sigma) if sigma else flat
            for order in row:
                row[order].append(simulate_slots(lengths, g, PlannedDispatcher(jobs, pred, g, lane_order=order)).steps)
        sweep[str(sigma)] = {k: round(float(np.mean(v)) / micro.steps, 4) for k, v in row.items()}
    return {
        "steps": {"full_group": full.steps, "micro_group": micro.steps, "continuous": cont.steps,
                  "length_aware_oracle": oracle.steps, "length_aware_noisy": la.steps,
                  "length_aware_sjf_noisy": la_sjf.steps, "lower_bound": makespan_lower_bound(flat, g)},
        "peak_live_tokens": {"full_group": full.peak_live_tokens, "micro_group": micro.peak_live_tokens,
                             "continuous": cont.peak_live_tokens, "length_aware_oracle": oracle.peak_live_tokens},
        "noise_sweep_steps_over_micro": sweep,
    }


# --------------------------------------------------------------------------------------------------- model runs
def model_part(args, L: list[list[int]], pred_noisy: list[int]) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = build_causal_lm(arch=args.arch, size=args.size)
    model.eval()
    B, G = len(L), len(L[0])
    rng = np.random.default_rng(args.seed + 1)
    specials = {tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}
    vocab = [t for t in range(4, len(tok)) if t not in specials]
    prompts = [[int(t) for t in rng.choice(vocab, args.prompt_len)] for _ in range(B)]
    forced = {(b, i): L[b][i] for b in range(B) for i in range(G)}
    flat = [L[b][i] for b in range(B) for i in range(G)]
    variants = {
        "full_group": (FullGroupScheduler(), None),
        "micro_group": (MicroGroupScheduler(g=args.g), None),
        "continuous": (ContinuousScheduler(g=args.g), None),
        "length_aware_oracle": (LengthAwareScheduler(g=args.g), flat),
        "length_aware_noisy": (LengthAwareScheduler(g=args.g), pred_noisy),
        "length_aware_sjf_noisy": (LengthAwareScheduler(g=args.g, lane_order="shortest_first"), pred_noisy),
    }
    sampling = {"greedy": True} if args.greedy else {"temperature": 1.0, "top_k": 0}
    names = list(variants)
    walls: dict[str, list[float]] = {k: [] for k in names}
    results = {}
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sched, pred = variants[name]
            out = sched.generate(model, prompts, G, args.max_new, step=0, sampling=sampling,
                                 eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, forced_lengths=forced,
                                 predicted_lengths=pred)
            walls[name].append(out.stats.wall_time_s)
            results[name] = out
            log(f"repeat {r} {name}: {out.stats.decode_steps} steps, {out.stats.wall_time_s:.2f} s")
    ref = results["full_group"]
    per = {}
    for name in names:
        st = results[name].stats
        wall = float(np.median(walls[name]))
        per[name] = {
            "decode_steps": st.decode_steps, "forward_calls": st.forward_calls, "prefills": st.prefills,
            "idle_slot_steps": st.idle_slot_steps, "tokens": st.tokens_generated,
            "peak_kv_bytes": st.peak_kv_bytes, "peak_allocated_kv_bytes": st.peak_allocated_kv_bytes,
            "peak_prompt_kv_bytes": st.peak_prompt_kv_bytes,
            "wall_s": [round(w, 3) for w in walls[name]], "wall_s_median": round(wall, 3),
            "tokens_per_s": round(st.tokens_generated / wall, 1),
            "same_tokens_as_full_group": results[name].completions == ref.completions,
        }
    plan = variants["length_aware_noisy"][0].last_plan
    return {"model": f"{args.arch}/{args.size}", "kv_bytes_per_token": kv_bytes_per_token(model),
            "variants": per, "length_aware_plan": {"exact_dp": plan.exact_dp, "guaranteed": plan.guaranteed,
                                                   "states": plan.states}}


# --------------------------------------------------------------------------------------------------- predictors
def predictor_task(rng: np.random.Generator, B: int, G: int, P: int, max_new: int, k: int, vocab: int):
    """A synthetic token-conditioned length task (no model; the tokens are drawn here).

    Each prompt ends with one of 4 instruction tokens (ids 4..7, difficulty ``d``: "answer briefly" ...
    "explain in detail"), so its samples' median length is ``max_new / 32 * 2**d``; each sample's first
    generated token is one of 2 openers (ids 8, 9: a direct answer x0.5, or a chain of thought x2), chosen with
    probability 1/2, as when a model commits early to a long answer; then lognormal(0, 0.3) noise. The other
    tokens are uniform over ``[10, vocab)``. So the prompt explains part of the spread and the first generated
    token more of it. Returns prompts, per-job prefixes (the first ``k`` generated tokens) and true lengths
    (``k + 1 <= L <= max_new``, so every job outlives the probe)."""
    prompts, prefixes, lengths = [], [], []
    for _ in range(B):
        d = int(rng.integers(0, 4))
        prompts.append([int(t) for t in rng.integers(10, vocab, P - 1)] + [4 + d])
        row_pre, row_len = [], []
        for _ in range(G):
            opener = int(rng.integers(8, 10))
            pre = [opener] + [int(t) for t in rng.integers(10, vocab, k - 1)] if k else []
            length = max_new / 32 * 2 ** d * (2.0 if opener == 9 else 0.5) * rng.lognormal(0.0, 0.3)
            row_pre.append(pre)
            row_len.append(int(np.clip(np.ceil(length), k + 1, max_new)))
        prefixes.append(row_pre)
        lengths.append(row_len)
    return prompts, prefixes, lengths


def probe_then_plan_steps(L: list[list[int]], pred_remaining: list[int], g: int, k: int) -> int:
    """Decode steps of partial decode: every job first runs ``k`` tokens in barrier rounds of g (jobs ending
    sooner leave their row idle), then the remaining ``L - k`` tokens are planned from the predictions."""
    flat = [v for row in L for v in row]
    probe = [min(v, k) for v in flat]
    steps = sum(max(probe[j:j + g]) for j in range(0, len(probe), g))
    jobs = [j for j, v in enumerate(flat) if v > k]
    rest = {j: flat[j] - k for j in jobs}
    pred = [pred_remaining[j] for j in jobs]
    return steps + simulate_slots(rest, g, PlannedDispatcher(jobs, pred, g)).steps


def predictor_part(args) -> dict:
    """Online training over ``--predictor-steps`` batches; each batch's plans use the predictor trained on the
    earlier batches only (as in the recipe). Steps are summed over the last half of the batches."""
    rng = np.random.default_rng(args.seed + 7)
    k, g, G, B, max_new = args.prefix_tokens, args.g, args.G, args.prompts, args.max_new
    vocab = 512
    preds = {"constant": ConstantPredictor(max_new), "running_mean": RunningMeanPredictor(max_new),
             "mlp_prompt": LengthPredictor(prefix_tokens=0, seed=args.seed),
             "mlp_prefix": LengthPredictor(prefix_tokens=k, seed=args.seed)}
    names = list(preds) + ["oracle"]
    steps = {n: 0 for n in names}
    steps["micro_group"] = steps["continuous"] = 0
    quality = {n: {"smape": [], "kendall_tau": []} for n in preds}
    half = args.predictor_steps // 2
    for step in range(args.predictor_steps):
        prompts, prefixes, L = predictor_task(rng, B, G, args.prompt_len, max_new, k, vocab)
        flat = [v for row in L for v in row]
        jobs = [(b, i) for b in range(B) for i in range(G)]
        lengths = dict(zip(jobs, flat))
        rep_prompts = [prompts[b] for b, _ in jobs]
        rep_prefix = [prefixes[b][i] for b, i in jobs]
        counted = step >= half
        for name, pr in preds.items():
            if name == "mlp_prefix":
                # predict the remaining length after the probe, then add the k probed tokens
                rem = [max(1, int(round(v))) for v in pr.predict_batch(rep_prompts, rep_prefix)]
                pred = [min(max_new, k + v) for v in rem]
                if counted:
                    steps[name] += probe_then_plan_steps(L, rem, g, k)
            else:
                pred = [max(1, min(max_new, int(round(v)))) for v in pr.predict_batch(rep_prompts, [[]] * len(jobs))]
                if counted:
                    steps[name] += simulate_slots(lengths, g, PlannedDispatcher(jobs, pred, g)).steps
            if counted:
                quality[name]["smape"].append(smape(pred, flat))
                quality[name]["kendall_tau"].append(kendall_tau(pred, flat))
        if counted:
            steps["oracle"] += simulate_slots(lengths, g, PlannedDispatcher(jobs, flat, g)).steps
            steps["continuous"] += simulate_slots(lengths, g, FifoDispatcher(jobs)).steps
            steps["micro_group"] += sum(max(L[b][j:j + g]) for b in range(B) for j in range(0, G, g))
        for name, pr in preds.items():
            if name == "mlp_prefix":
                pr.update(rep_prompts, rep_prefix, [v - k for v in flat])
            else:
                pr.update(rep_prompts, [[]] * len(jobs), flat)
    micro = steps["micro_group"]
    return {
        "task": "synthetic token-conditioned lengths (predictor_task)", "batches": args.predictor_steps,
        "counted_batches": args.predictor_steps - half, "prefix_tokens": k,
        "decode_steps": steps,
        "steps_over_micro": {n: round(v / micro, 4) for n, v in steps.items()},
        "quality_mean": {n: {m: _finite(np.nanmean(v) if np.isfinite(v).any() else float("nan"))
                             for m, v in q.items()} for n, q in quality.items()},
        "note": "constant and running_mean predict one value for every job, so their plans coincide; kendall_tau "
                "is null for them (constant predictions)",
    }


def _finite(x) -> float | None:
    return round(float(x), 4) if math.isfinite(float(x)) else None


# --------------------------------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
    if not 1 <= args.g <= args.G or args.G < 2 or args.max_new < 1 or args.prompts < 1:
        raise SystemExit("need 1 <= g <= G, G >= 2, max_new >= 1, prompts >= 1")
    rng = np.random.default_rng(args.seed)
    flat = scripted_lengths(rng, args.prompts * args.G, args.max_new, args.sigma)
    L = [flat[b * args.G:(b + 1) * args.G] for b in range(args.prompts)]
    pred_noisy = noisy(rng, flat, args.noise)
    out = {
        "benchmark": "sampling", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
        "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items()},
        "lengths": {"mean": round(float(np.mean(flat)), 2), "median": float(np.median(flat)), "max": max(flat),
                    "p90": float(np.percentile(flat, 90))},
    }
    log("simulator")
    out["analytic"] = analytic(L, args.prompt_len, args.g, pred_noisy, args.seed + 3)
    a = out["analytic"]
    goals = {
        "peak_kv_micro_over_full": (round(a["peak_live_tokens"]["micro_group"]
                                          / a["peak_live_tokens"]["full_group"], 4), "<= 0.30"),
        "steps_length_aware_over_micro": (round(a["steps"]["length_aware_noisy"] / a["steps"]["micro_group"], 4),
                                          "<= 0.55"),
    }
    if not args.skip_model:
        log("model runs")
        m = out["model_runs"] = model_part(args, L, pred_noisy)
        v = m["variants"]
        goals = {
            "peak_kv_micro_over_full": (round(v["micro_group"]["peak_kv_bytes"] / v["full_group"]["peak_kv_bytes"], 4),
                                        "<= 0.30"),
            "steps_length_aware_over_micro": (round(v["length_aware_noisy"]["decode_steps"]
                                                    / v["micro_group"]["decode_steps"], 4), "<= 0.55"),
            "tokens_per_s_length_aware_over_micro": (round(v["length_aware_noisy"]["tokens_per_s"]
                                                           / v["micro_group"]["tokens_per_s"], 4), ">= 1.3"),
        }
        out["ratios_to_micro"] = {
            name: {"decode_steps": round(x["decode_steps"] / v["micro_group"]["decode_steps"], 4),
                   "tokens_per_s": round(x["tokens_per_s"] / v["micro_group"]["tokens_per_s"], 4),
                   "peak_kv_bytes": round(x["peak_kv_bytes"] / v["micro_group"]["peak_kv_bytes"], 4)}
            for name, x in v.items()}
        out["runs_equal_simulator"] = all(v[n]["decode_steps"] == a["steps"][n] for n in v)
    out["goals"] = {k: {"value": val, "goal": goal} for k, (val, goal) in goals.items()}
    # the floor: no schedule of g slots decodes the rollouts in fewer than max(ceil(sum L / g), max L) steps
    bound = a["steps"]["lower_bound"]
    out["floor"] = {"lower_bound_steps": bound, **{
        f"{n}/bound": round(a["steps"][n] / bound, 4)
        for n in ("micro_group", "continuous", "length_aware_oracle", "length_aware_noisy") if n in a["steps"]}}
    if not args.skip_model:
        out["floor"]["tokens_per_s_length_aware_over_continuous"] = round(
            v["length_aware_noisy"]["tokens_per_s"] / v["continuous"]["tokens_per_s"], 4)
    if args.predictor_steps > 0:
        log("predictor plans")
        out["predictors"] = predictor_part(args)
    out["wall_s"] = round(time.perf_counter() - T0, 1)
    emit(out)
    return out


if __name__ == "__main__":
    main()
