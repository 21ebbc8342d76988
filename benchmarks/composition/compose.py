"""Composition benchmark: each configs/compose/ preset beside its components alone, and the shared step's cost.

Two parts, one JSON object on stdout (progress on stderr):

* ``presets``: for each first-order preset in configs/compose/ (dp_pit_red_lesion, dp_sam_sft_opt,
  wip_calibrated_sft, dp_sam_digits, dp_grpo_addition), the composed run and each component alone (e.g. DP-SAT
  next to DP-SGD, SAM alone and the plain recipe), each variant a ``plait run`` in its own child process: the
  headline metric before/after (from the run's summary.json), ε where private, the median time of one
  ``train_step`` (evaluation excluded) and the child's peak RSS (``ru_maxrss``); ratios of step time and peak
  RSS to the plain recipe's variant.
* ``shared_step``: the goal "the shared step costs nothing": every plain recipe (sft, classify, depth,
  sam_train, grpo) on the tree before the shared step (``--old-rev``, default 03ef209, extracted with
  ``git archive`` to a temp dir) and on this tree, the same config file and overrides, in child processes that
  import ``plait`` from the given tree's ``core/`` (``plait.plugins`` from ``plugins/``, ``plait.kernels`` from
  ``kernels/``, as pyproject's package-dir maps them) and time ``train_step``; old/new alternate round by round
  (the first tree of a round alternates). Reported: median step time per tree (over all timed steps of all
  rounds), new/old ratio per recipe, and whether the final train losses agree.

Children run one thread each (``OMP_NUM_THREADS=1``), one at a time; on a shared machine absolute figures drift,
compare within one JSON. ``--quick`` (what benchmarks/run_all.py runs) shrinks every run to a few steps: its
headline metrics are a smoke test, not results (the presets' measured figures are in docs/composition.md).

    .venv/bin/python benchmarks/composition/compose.py --quick
    .venv/bin/python benchmarks/composition/compose.py --part shared_step --rounds 4 --steps 30
    .venv/bin/python benchmarks/composition/compose.py --part presets
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

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
OLD_REV = "03ef209"

# Plain recipes for the shared-step goal: (config under configs/, overrides). Same file in both trees (unchanged
# since the old revision). sam_train records no trajectory (file writes), grpo skips its warm-up SFT (so the
# timed steps are GRPO steps).
PLAIN = {
    "sft": ("basics/sft_quickstart.yaml", ["run.device=cpu"]),
    "classify": ("capsule/red_lesion_pit.yaml", []),
    "depth": ("capsule/depth_v2.yaml", ["recipe.log_images=false"]),
    "sam_train": ("sam_if/digits.yaml", ["recipe.record_trajectory=false"]),
    "grpo": ("grpo/addition.yaml", ["recipe.warmup_sft_steps=0"]),
}

# Presets: name -> (config under configs/compose/, headline metric, {variant: overrides}); the first variant is
# the composed preset, "plain" the recipe without the composed components (the step-time / RSS reference).
PRESETS = {
    "dp_pit_red_lesion": ("dp_pit_red_lesion.yaml", "eval/balanced_accuracy", {
        "dp_pit": [],
        "plain": ["~grad_transform"],
    }),
    "dp_sam_sft_opt": ("dp_sam_sft_opt.yaml", "eval/accuracy", {
        "dp_sat": [],
        "dp_sgd": ["grad_transform={name: dp_flat, target_epsilon: 8.0, max_grad_norm: 1.0}"],
        "sam": ["grad_transform={name: sam, rho: 0.05}"],
        "plain": ["~grad_transform"],
    }),
    "wip_calibrated_sft": ("wip_calibrated_sft.yaml", "eval/loss", {
        "wip_calibrated": [],
        "wip_uncalibrated": ["transforms=[{name: wip_attention, operator: minprod}]"],
        "plain": ["~transforms"],
    }),
    "dp_sam_digits": ("dp_sam_digits.yaml", "eval/accuracy", {
        "dp_sat": [],
        "dp_sgd": ["recipe.rho=0"],
        "plain": ["~grad_transform"],  # non-private SAM: the plain sam_train recipe
    }),
    "dp_grpo_addition": ("dp_grpo_addition.yaml", "eval/reward_mean", {
        "dp_grpo": [],
        "plain": ["~grad_transform"],
    }),
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# child: import plait from a tree, time train_step inside `plait run`
# ---------------------------------------------------------------------------------------------------------------
def bootstrap(root: Path) -> None:
    """Make ``plait``, ``plait.plugins`` and ``plait.kernels`` the packages of the source tree ``root`` (its
    ``core/``, ``plugins/``, ``kernels/``), whatever is installed: registered in sys.modules before anything
    imports them, so the installed editable finder is never asked."""
    import importlib.machinery
    import importlib.util

    parents = {}
    for name, folder in (("plait", "core"), ("plait.plugins", "plugins"), ("plait.kernels", "kernels")):
        path = root / folder
        if (path / "__init__.py").exists():
            spec = importlib.util.spec_from_file_location(name, path / "__init__.py",
                                                          submodule_search_locations=[str(path)])
        else:  # a folder without __init__.py (kernels/ in later trees): a namespace package
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(path)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        if spec.loader is not None:
            spec.loader.exec_module(module)
        parents[name] = module
    parents["plait"].plugins = parents["plait.plugins"]
    parents["plait"].kernels = parents["plait.kernels"]


def child(args) -> int:
    import resource

    root = Path(args.tree).resolve()
    bootstrap(root)
    import plait
    import plait.run as prun
    from plait.cli import main as cli_main

    loaded = Path(plait.__file__).resolve()
    if root not in loaded.parents:
        raise SystemExit(f"child: plait imported from {loaded}, not from {root}")
    times: list[float] = []
    losses: list[float] = []
    original = prun.train_loop

    def timed_loop(run, task, **kw):  # the recipes import train_loop lazily (their factories), so they see this
        inner = task.train_step

        def train_step(step):
            t = time.perf_counter()
            out = inner(step)
            times.append(time.perf_counter() - t)
            if "train/loss" in out:
                losses.append(float(out["train/loss"]))
            return out

        task.train_step = train_step
        return original(run, task, **kw)

    prun.train_loop = timed_loop
    with tempfile.TemporaryDirectory() as tmp:
        rc = cli_main(["run", str(args.config), f"run.out_dir={tmp}", "run.progress=false", *args.overrides])
        summaries = list(Path(tmp).glob("*/*/summary.json"))
        summary = json.loads(summaries[0].read_text()) if summaries else {}
    out = {"rc": rc, "tree": str(root), "step_times": times, "losses": losses,
           "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "summary": summary}
    Path(args.result).write_text(json.dumps(out))
    return 0 if rc in (0, None) else int(rc)


def spawn(tree: Path, config: Path, overrides: list[str], timeout: float) -> dict:
    """One child (one thread); its result, or {"error": …}."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--tree", str(tree), "--config",
               str(config), "--result", str(result), "--", *overrides]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        env.pop("PYTHONPATH", None)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:g} s"}
        wall = time.perf_counter() - t0
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return {"error": f"exit {proc.returncode}: {' | '.join(tail)}"}
        out = json.loads(result.read_text())
        out["wall_s"] = round(wall, 1)
        return out


def median_step(times: list[float], warmup: int) -> float | None:
    timed = times[warmup:]
    return statistics.median(timed) if timed else None


# ---------------------------------------------------------------------------------------------------------------
# parts
# ---------------------------------------------------------------------------------------------------------------
def old_tree(rev: str, dest: Path) -> Path:
    """``git archive rev`` of this repository extracted into ``dest`` (no worktree metadata is written)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def part_shared_step(args) -> dict:
    out: dict = {"old_rev": args.old_rev, "rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                 "recipes": {}}
    with tempfile.TemporaryDirectory(prefix="plait-old-") as tmp:
        trees = {"old": old_tree(args.old_rev, Path(tmp)), "new": REPO}
        for recipe in args.recipes:
            cfg, overrides = PLAIN[recipe]
            ov = [*overrides, f"run.steps={args.steps}", "run.eval_every=0", "run.ckpt_every=0",
                  f"run.log_every={args.steps}"]
            per = {"old": [], "new": []}
            final_loss: dict = {}
            errors = []
            for r in range(args.rounds):
                order = ("old", "new") if r % 2 == 0 else ("new", "old")
                for which in order:
                    res = spawn(trees[which], trees[which] / "configs" / cfg, ov, args.timeout)
                    if "error" in res:
                        errors.append(f"{which} round {r}: {res['error']}")
                        continue
                    per[which] += res["step_times"][args.warmup:]
                    final_loss[which] = res["losses"][-1] if res["losses"] else None
                    log(f"[shared_step] {recipe} {which} round {r}: median "
                        f"{median_step(res['step_times'], args.warmup) * 1e3:.1f} ms/step ({res['wall_s']} s)")
            entry: dict = {"config": f"configs/{cfg}", "overrides": ov}
            for which in ("old", "new"):
                entry[f"{which}_median_ms"] = round(statistics.median(per[which]) * 1e3, 2) if per[which] else None
                entry[f"{which}_n_steps"] = len(per[which])
            if entry["old_median_ms"] and entry["new_median_ms"]:
                entry["ratio_new_old"] = round(entry["new_median_ms"] / entry["old_median_ms"], 3)
                entry["within_5pct"] = entry["ratio_new_old"] <= 1.05
            entry["final_train_loss"] = final_loss
            if errors:
                entry["error"] = "; ".join(errors)
            out["recipes"][recipe] = entry
    return out


def headline(summary: dict, key: str) -> dict:
    first, final = summary.get("first_eval") or {}, summary.get("final_eval") or {}
    return {"before": first.get(key), "after": final.get(key)}


def part_presets(args) -> dict:
    out: dict = {}
    for name in args.presets:
        cfg, key, variants = PRESETS[name]
        path = REPO / "configs" / "compose" / cfg
        extra = [f"run.steps={args.preset_steps}", "run.eval_every=0", "run.ckpt_every=0",
                 f"run.log_every={args.preset_steps}"] if args.preset_steps else ["run.ckpt_every=0"]
        res_p: dict = {"config": f"configs/compose/{cfg}", "metric": key, "variants": {}}
        for variant, overrides in variants.items():
            res = spawn(REPO, path, [*overrides, *extra], args.timeout)
            if "error" in res:
                res_p["variants"][variant] = {"overrides": overrides, "error": res["error"]}
                log(f"[presets] {name} {variant}: {res['error']}")
                continue
            s = res["summary"]
            v = {"overrides": overrides, key: headline(s, key), "steps": s.get("steps"),
                 "median_step_ms": round(median_step(res["step_times"], args.warmup) * 1e3, 2)
                 if res["step_times"][args.warmup:] else None,
                 "peak_rss_mib": round(res["maxrss_mib"], 1), "wall_s": res["wall_s"]}
            for k in ("privacy/epsilon", "privacy/noise_multiplier", "sam/ascent_steps", "dp/frozen"):
                if k in s:
                    v[k] = s[k]
            res_p["variants"][variant] = v
            log(f"[presets] {name} {variant}: {key} {v[key]['before']} -> {v[key]['after']}, "
                f"{v['median_step_ms']} ms/step, {v['peak_rss_mib']} MiB ({res['wall_s']} s)")
        plain = res_p["variants"].get("plain", {})
        for variant, v in res_p["variants"].items():
            if variant == "plain" or "error" in v or "error" in plain:
                continue
            if v.get("median_step_ms") and plain.get("median_step_ms"):
                v["step_time_ratio_to_plain"] = round(v["median_step_ms"] / plain["median_step_ms"], 3)
            v["peak_rss_ratio_to_plain"] = round(v["peak_rss_mib"] / plain["peak_rss_mib"], 3)
        out[name] = res_p
    return out


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="all", choices=("all", "presets", "shared_step"))
    ap.add_argument("--quick", action="store_true", help="a few steps per run (run_all's mode): a smoke test")
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated subset of " + ", ".join(PRESETS))
    ap.add_argument("--recipes", default=",".join(PLAIN), help="comma-separated subset of " + ", ".join(PLAIN))
    ap.add_argument("--preset-steps", type=int, default=0, help="run.steps of every preset variant (0: the preset's)")
    ap.add_argument("--rounds", type=int, default=4, help="old/new rounds per recipe (shared_step)")
    ap.add_argument("--steps", type=int, default=30, help="steps per shared_step child")
    ap.add_argument("--warmup", type=int, default=3, help="leading steps of each child left out of the medians")
    ap.add_argument("--old-rev", default=OLD_REV, help="the tree before the shared step")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per child")
    # child mode (internal)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.warmup = 2, 8, 2
        args.preset_steps = args.preset_steps or 6
    args.presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for p in args.presets:
        if p not in PRESETS:
            ap.error(f"--presets: unknown {p!r}; allowed: {', '.join(PRESETS)}")
    for r in args.recipes:
        if r not in PLAIN:
            ap.error(f"--recipes: unknown {r!r}; allowed: {', '.join(PLAIN)}")
    if not args.child and args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    t0 = time.perf_counter()
    result: dict = {"benchmark": "compose", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
                    "cpu_count": os.cpu_count(), "load_avg_1min_start": round(os.getloadavg()[0], 2)}
    if args.part in ("all", "presets"):
        result["presets"] = part_presets(args)
    if args.part in ("all", "shared_step"):
        result["shared_step"] = part_shared_step(args)
    result["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
