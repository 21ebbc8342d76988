"""DP-ZO vs ZO vs DP-SGD on the sentiment task with the bundled pretrained tiny OPT (issue 17's benchmark).

One process drives one ``plait run`` subprocess per variant (so each has its own peak RSS, read from the kernel
with ``os.wait4``), all on the same data, model and step count:

* ``zo``        ``configs/quickstart.yaml``: MeZO steps with the ZO2 engine (fp16 host storage), batch 16;
* ``dpzo_eps2``, ``dpzo_eps8``  the same plus ``grad_transform: dp_zo`` at target ε 2 / 8 (δ 1e-5, C = 20 as
  ``configs/compose/dp_zo2.yaml``; Poisson batches of mean 16);
* ``dpzo_fixed``  DP-ZO's mechanism (per-example losses, clip, noise of ε 8's σ) on ZO's own fixed batches of 16
  (``poisson: false, allow_no_privacy: true``: no guarantee) — what the privatisation costs on the same work;
  ``dpzo_epsN / dpzo_fixed`` is then what Poisson sampling adds (batches of varying size, padded to their
  longest example; the accounting needs it);
* ``dpsgd_eps2``, ``dpsgd_eps8``  first-order ``sft`` (``configs/basics/sft_quickstart.yaml`` on the same
  bundled base, AdamW) with ``grad_transform: flashdp`` at the same ε, δ and steps (C = 1).

Step time: the median over log windows (``perf/steps_per_sec`` of each window; the first window, with the
warm-up, is dropped). Accuracy: the label-word eval accuracy at the end (``summary.json``). ``--repeats R``
runs the list R times interleaved and keeps, per variant, the fastest median and the largest peak RSS (the
machine may be shared: say so with the figures). Ratios: DP-ZO / ZO step time and peak RSS (goals ≤ 1.05) and
DP-ZO / DP-SGD peak RSS (goal ≤ 0.5), each reported whether met or not. ``floor`` is the peak RSS of a process
that only makes a run's imports (torch, transformers, plait); at this model size it is most of every run's peak,
so ``*_rss_above_imports_vs_dpsgd`` also gives the ratio of what training adds on top of it.

Two parts settle what the tiny model cannot:

* ``step_ratio`` (in this process): the DP-ZO step against the plain ZO step on the same ZO2 engine, model and
  batch (OPT ``--ratio-size``, random init, fixed batches of 16), timed in interleaved rounds until the ratio's
  bootstrap 95 % interval is within ±5 % (``_stable.Interleaved``); what DP-ZO adds per step is the per-example
  reduction of logits the passes already hold, the clip and one scalar of noise. Goal ≤ 1.05.
* ``memory_at_size``: peak RSS of ZO, DP-ZO (ε 8) and DP-SGD (flashdp, ε 8) runs of ``--memory-steps`` steps
  at OPT ``--memory-size`` (random init, same task), where the model, not the imports, is most of the process.

    .venv/bin/python benchmarks/zo2/dp_zo.py                 # 300 steps per variant (~10 min on 2 busy cores)
    .venv/bin/python benchmarks/zo2/dp_zo.py --quick         # 20 steps, a smoke test of the script (~2 min)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _common.py, _stable.py
from _common import SHAPES, emit, log  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
VARIANTS = ("zo", "dpzo_fixed", "dpzo_eps2", "dpzo_eps8", "dpsgd_eps2", "dpsgd_eps8")
SIGMA_EPS8 = 0.7427978515625  # the noise multiplier the accountant calibrates for ε 8 here (the eps8 runs report it)

def _quickstart_model() -> str:
    """The model path of configs/quickstart.yaml, so that the DP-SGD runs start from the same weights as ZO's."""
    from omegaconf import OmegaConf

    return f"model.path={OmegaConf.load(REPO / 'configs/quickstart.yaml').model.path}"


BASE = _quickstart_model()


def argv_of(variant: str, steps: int, out: Path, n_train: int, size: str | None = None) -> list[str]:
    common = [f"run.steps={steps}", f"run.log_every={max(1, steps // 10)}", "run.eval_every=0", "run.ckpt_every=0",
              f"run.out_dir={out}", f"run.name={variant}", "run.progress=false", f"data.n_train={n_train}"]
    if size in SHAPES:  # a randomly initialised OPT of a published block shape (over the 100m preset)
        fields = ", ".join(f"{k}: {v}" for k, v in SHAPES[size].items())
        common += ["model.path=null", "model.arch=opt", "model.size=100m", f"model.config={{{fields}}}"]
    elif size:  # a randomly initialised OPT of this size preset instead of the bundled model
        common += ["model.path=null", "model.arch=opt", f"model.size={size}"]
    if variant == "zo":
        return [str(REPO / "configs/quickstart.yaml"), *common]
    if variant == "dpzo_fixed":  # the mechanism on ZO's own fixed batches: no Poisson sampling, so no guarantee
        return [str(REPO / "configs/quickstart.yaml"), *common,
                f"grad_transform={{name: dp_zo, noise_multiplier: {SIGMA_EPS8}, max_grad_norm: 20.0, delta: 1.0e-5, "
                "poisson: false, allow_no_privacy: true}"]
    eps = float(variant.rsplit("eps", 1)[1])
    if variant.startswith("dpzo"):
        return [str(REPO / "configs/quickstart.yaml"), *common,
                f"grad_transform={{name: dp_zo, target_epsilon: {eps}, max_grad_norm: 20.0, delta: 1.0e-5}}"]
    return [str(REPO / "configs/basics/sft_quickstart.yaml"), *([] if size else [BASE]), *common,
            f"grad_transform={{name: flashdp, target_epsilon: {eps}, max_grad_norm: 1.0, delta: 1.0e-5}}"]


FLOOR = ("import torch, transformers, plait.run, plait.plugins.zo2.zo_recipe, plait.plugins.flashdp.transform; "
         "from plait.plugins.basics.models import build_causal_lm")


def run_one(variant: str, steps: int, out: Path, n_train: int, size: str | None = None) -> dict:
    if variant == "floor":  # the interpreter with every import a run makes, and nothing trained
        argv = [sys.executable, "-c", FLOOR]
    else:
        argv = [sys.executable, "-m", "plait", "run", *argv_of(variant, steps, out, n_train, size)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-1500:]
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {tail}"}
    if variant == "floor":
        return {"peak_rss_mib": usage.ru_maxrss / 1024}
    run_dir = sorted((out / variant).iterdir())[-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/steps_per_sec"] for r in rows if "perf/steps_per_sec" in r]
    times = [1.0 / r for r in (rates[1:] or rates)]
    fe = summary.get("final_eval", {})
    return {"step_s": statistics.median(times), "peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall,
            "accuracy": fe.get("eval/accuracy"), "eval_loss": fe.get("eval/loss"),
            "first_accuracy": summary.get("first_eval", {}).get("eval/accuracy"),
            "epsilon": summary.get("privacy/epsilon"), "noise_multiplier": summary.get("privacy/noise_multiplier"),
            "clipped_fraction": summary.get("final", {}).get("dp/clipped_fraction")}


def step_ratio(size: str, rounds: int, max_seconds: float) -> dict:
    """DP-ZO step / ZO step on one ZO2 engine each (same model weights, same batches), interleaved rounds."""
    import torch
    from _common import build_model, make_batch, make_mezo, zo2_engine
    from _stable import Interleaved

    from plait.plugins.flashdp.dp_zo import DPZO, PrivateMeZO
    from plait.plugins.zo2.mezo import step_seed

    torch.set_num_threads(1)
    batch, seq, lr = 16, 64, 1e-6
    engines, vocab = {}, None
    for v in ("zo", "dpzo"):
        model, vocab = build_model("opt", size)
        mezo = make_mezo()
        if v == "dpzo":
            dp = DPZO(max_grad_norm=20.0, noise_multiplier=1.0, target_epsilon=None, delta=1e-5,
                      allow_no_privacy=False, poisson=True)
            dp.prepare_zo(dataset_size=512, batch_size=batch, steps=10_000, seed=0, perturbations=1)
            mezo = PrivateMeZO(mezo, dp)
        engines[v] = (zo2_engine(model, mezo), mezo)
    batches: dict[int, dict] = {}

    def step(v: str):
        def run(r: int):
            if r not in batches:
                batches.clear()
                batches[r] = make_batch(r, batch, seq, vocab)
            eng, mezo = engines[v]
            if v == "dpzo":
                mezo.step_index = r + 1
            return eng.step(batches[r], step_seed(0, r), lr)[0]
        return run

    bench = Interleaved({"zo": step("zo"), "dpzo": step("dpzo")}, pairs=[("dpzo", "zo")], warmup=2,
                        min_rounds=rounds, max_rounds=max(rounds, 60), max_seconds=max_seconds,
                        log=lambda m: log("[dp_zo] " + m)).run()
    for eng, _ in engines.values():
        eng.close()
    return {"model": f"OPT {size}, random init, ZO2 host tier fp32, batch {batch}, seq {seq}, 1 thread",
            "zo": bench.summary("zo", batch * seq), "dpzo": bench.summary("dpzo", batch * seq),
            "dpzo/zo": bench.ratio("dpzo", "zo", ("<=", 1.05)), "machine": bench.machine()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-train", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="20 steps, 1 repeat: a smoke test, not a measurement")
    ap.add_argument("--ratio-size", default="small", help="OPT size preset of the in-process step ratio ('' skips)")
    ap.add_argument("--ratio-rounds", type=int, default=10, help="least timed rounds of the step ratio")
    ap.add_argument("--memory-size", default="100m",
                    help="OPT size preset (tiny, small, 100m) or block shape (" + ", ".join(SHAPES) + ") of the "
                         "peak-RSS part ('' skips)")
    ap.add_argument("--memory-steps", type=int, default=6, help="steps of each run of the peak-RSS part")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.repeats, a.ratio_rounds, a.memory_steps = 20, 1, 4, 2
        a.memory_size = "small" if a.memory_size == "100m" else a.memory_size
    chosen = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in chosen if v not in VARIANTS]
    if bad:
        raise SystemExit(f"--variants: unknown {bad}; allowed: {', '.join(VARIANTS)}")
    if "zo" not in chosen:
        chosen.insert(0, "zo")
    res: dict[str, dict] = {"floor": run_one("floor", 0, Path("."), 0)}
    with tempfile.TemporaryDirectory(prefix="dp_zo_bench_") as tmp:
        for rep in range(a.repeats):
            for v in chosen:
                log(f"[dp_zo] repeat {rep + 1}/{a.repeats}: {v} ({a.steps} steps)")
                r = run_one(v, a.steps, Path(tmp) / f"r{rep}", a.n_train)
                if "error" in r:
                    res[v] = r
                    continue
                best = res.get(v)
                if best is None or "error" in best:
                    res[v] = dict(r, repeats=[r["step_s"]])
                else:
                    best["repeats"].append(r["step_s"])
                    best["step_s"] = min(best["step_s"], r["step_s"])
                    best["peak_rss_mib"] = max(best["peak_rss_mib"], r["peak_rss_mib"])
    ratios: dict[str, float] = {}
    zo = res.get("zo", {})
    for eps in ("2", "8"):
        d, s = res.get(f"dpzo_eps{eps}", {}), res.get(f"dpsgd_eps{eps}", {})
        if "step_s" in d and "step_s" in zo:
            ratios[f"dpzo_eps{eps}_step_vs_zo"] = d["step_s"] / zo["step_s"]
            ratios[f"dpzo_eps{eps}_rss_vs_zo"] = d["peak_rss_mib"] / zo["peak_rss_mib"]
        if "step_s" in d and "step_s" in s:
            ratios[f"dpzo_eps{eps}_rss_vs_dpsgd"] = d["peak_rss_mib"] / s["peak_rss_mib"]
            floor = res["floor"].get("peak_rss_mib")
            if floor:  # what training adds on top of the imports (which dominate at this model size)
                ratios[f"dpzo_eps{eps}_rss_above_imports_vs_dpsgd"] = \
                    (d["peak_rss_mib"] - floor) / (s["peak_rss_mib"] - floor)
            ratios[f"dpzo_eps{eps}_step_vs_dpsgd"] = d["step_s"] / s["step_s"]
    fixed = res.get("dpzo_fixed", {})
    if "step_s" in fixed and "step_s" in zo:  # what the mechanism costs on the same batches as ZO
        ratios["dpzo_fixed_step_vs_zo"] = fixed["step_s"] / zo["step_s"]
        for eps in ("2", "8"):  # what Poisson sampling's varying batch sizes (and padded lengths) cost on top
            d = res.get(f"dpzo_eps{eps}", {})
            if "step_s" in d:
                ratios[f"dpzo_eps{eps}_step_vs_dpzo_fixed"] = d["step_s"] / fixed["step_s"]
    goals = {k: (v <= 0.5 if k.endswith("rss_vs_dpsgd") else v <= 1.05) for k, v in ratios.items()
             if not k.endswith(("step_vs_dpsgd", "above_imports_vs_dpsgd", "vs_dpzo_fixed"))}
    memory: dict[str, dict] = {}
    if a.memory_size:
        with tempfile.TemporaryDirectory(prefix="dp_zo_mem_") as tmp:
            for v in ("zo", "dpzo_eps8", "dpsgd_eps8"):
                log(f"[dp_zo] memory at OPT {a.memory_size}: {v} ({a.memory_steps} steps)")
                r = run_one(v, a.memory_steps, Path(tmp), a.n_train, a.memory_size)
                memory[v] = {"peak_rss_mib": r["peak_rss_mib"]} if "error" not in r else r
        if all("peak_rss_mib" in memory[v] for v in memory):
            floor = res["floor"].get("peak_rss_mib", 0.0)
            z, d, sg = (memory[v]["peak_rss_mib"] for v in ("zo", "dpzo_eps8", "dpsgd_eps8"))
            ratios[f"at_{a.memory_size}_dpzo_rss_vs_zo"] = d / z
            ratios[f"at_{a.memory_size}_dpzo_rss_vs_dpsgd"] = d / sg
            ratios[f"at_{a.memory_size}_dpzo_rss_above_imports_vs_dpsgd"] = (d - floor) / (sg - floor)
            goals[f"at_{a.memory_size}_dpzo_rss_vs_zo"] = d / z <= 1.05
            goals[f"at_{a.memory_size}_dpzo_rss_vs_dpsgd"] = d / sg <= 0.5
    ratio = step_ratio(a.ratio_size, a.ratio_rounds, 30.0 if a.quick else 600.0) if a.ratio_size else None
    if ratio is not None:
        goals["step_ratio_dpzo_vs_zo"] = ratio["dpzo/zo"]["verdict"]
    emit({"benchmark": "dp_zo", "steps": a.steps, "n_train": a.n_train, "repeats": a.repeats, "quick": a.quick,
          "loadavg_at_end": os.getloadavg(), "variants": res, "ratios": ratios,
          "memory_at_size": {"size": a.memory_size, "steps": a.memory_steps, **memory} if memory else None,
          "step_ratio": ratio, "goals_met": goals})
    return 0 if all("error" not in r for r in [*res.values(), *memory.values()]) else 1


if __name__ == "__main__":
    sys.exit(main())
