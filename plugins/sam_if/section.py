"""The ``influence:`` section of a training run: self-influence at the end of training.

A first-order run (recipes ``sft``, ``classify``, ``sam_train``) may carry ``influence: {name: tracin, …}``. The
core's `validate` calls the entry's ``after_run`` check (`check_tracin_section`; the other estimators refuse with
the reason); when the run completes, this plugin's ``on_run_end`` (`run_influence`) sums projected TracIn over the
run's saved checkpoints (`anyrun.attribute_run`, the same code as ``plait attribute RUN estimator=tracin``) and
writes ``RUN/attribution/scores.safetensors``, ``report.md`` (the top-k table), ``report.json``, plus the top
examples in TensorBoard: text ``attribution/top`` (the example's text for LM runs, its label otherwise) and, for
image runs, the images ``attribution/top_images`` (each min-max scaled). ``against: eval`` scores every training
example against each example of the run's eval split instead (``scores`` [n_train, n_eval], the same as
``plait attribute RUN --test eval``); the top table then lists the examples with the lowest mean score (the most
harmful to the eval set). Any exception raised there is one line on stderr and ``summary.attribution.error``.
"""
from __future__ import annotations

import sys
from typing import Any

from plait.errors import ConfigError, PlaitError

TRACIN_RECIPES = ("sft", "classify", "sam_train")
SECTION_OPTIONS = ("k", "projection", "seed", "batch_size", "params", "n")
AGAINST = ("self", "eval")


def checkpoints_kept(run_cfg) -> int:
    """How many checkpoints a finished run leaves: one every ``ckpt_every`` steps and one at the end, of which
    the newest ``keep_checkpoints`` are kept (0: all)."""
    steps, every, keep = int(run_cfg.steps), int(run_cfg.ckpt_every), int(run_cfg.keep_checkpoints)
    saved = (steps // every + (1 if steps % every else 0)) if every > 0 else 1
    return saved if keep == 0 else min(keep, saved)


def check_tracin_section(cfg, components: dict[str, Any]) -> None:
    """``influence: {name: tracin}`` on a training run: the recipe, the checkpoints it keeps, DP, the options."""
    from .anyrun import private_transforms
    from .projected import PROJECTIONS

    recipe = components["recipe"].entry.name
    if recipe not in TRACIN_RECIPES:
        raise ConfigError(f"influence: tracin at the end of training reads first-order recipes with per-example "
                          f"losses ({', '.join(TRACIN_RECIPES)}), not {recipe!r}; remove the section (~influence)")
    o = components["influence"].options
    if o.trajectory:
        raise ConfigError("influence.trajectory: a training run's tracin sums over its own checkpoints; remove "
                          "the key (a recorded trajectory is read by plait attribute on a sam_train run)")
    for key, low in (("k", 0), ("n", 0), ("seed", 0), ("batch_size", 1), ("top", 1)):
        if getattr(o, key) < low:
            raise ConfigError(f"influence.{key}: {getattr(o, key)} must be >= {low}")
    if o.against not in AGAINST:
        raise ConfigError(f"influence.against: {o.against!r}; allowed: {', '.join(AGAINST)} (self-influence, or "
                          f"scores of every training example against each example of the run's eval set)")
    if o.projection not in PROJECTIONS:
        raise ConfigError(f"influence.projection: {o.projection!r}; allowed: {', '.join(PROJECTIONS)}")
    r = cfg.run
    kept = checkpoints_kept(r)
    if kept < 2:
        raise ConfigError(f"influence: tracin sums over the run's saved checkpoints and this run keeps {kept} "
                          f"(run.steps={r.steps}, run.ckpt_every={r.ckpt_every}, run.keep_checkpoints="
                          f"{r.keep_checkpoints}); set run.ckpt_every to at most {max(1, int(r.steps) // 2)} "
                          f"and run.keep_checkpoints=0 (keep all)")
    private = private_transforms(components)
    if private and not o.allow_private_data:
        raise ConfigError(f"influence: the run trains with private {'+'.join(private)}, but attribution scores "
                          f"reveal individual training examples and are not differentially private; set "
                          f"influence.allow_private_data=true to compute them anyway, or remove the section "
                          f"(~influence)")


def refuse_at_end_of_run(name: str):
    """The ``after_run`` check of an estimator that cannot run at the end of any training run."""
    def check(cfg, components):
        raise ConfigError(f"influence: estimator {name!r} cannot run at the end of training: it reads a sam_train "
                          f"run's final weights or recorded trajectory through `plait attribute RUN "
                          f"estimator={name}`; the influence: section takes name: tracin (over the run's "
                          f"checkpoints, any first-order run)")
    return check


def run_influence(run) -> dict[str, Any] | None:
    """Compute and write the section's scores for a completed run; a failure is one line on stderr and
    ``summary['attribution']['error']`` (the trained run stays intact)."""
    from .anyrun import attribute_run

    comp = run.components["influence"]
    kw = comp.kwargs()
    opts = {k: kw[k] for k in SECTION_OPTIONS}
    out = run.dir / "attribution"
    step = int(run.cfg.run.steps)

    def images(recipe, order):
        x = getattr(getattr(getattr(recipe, "data", None), "train", None), "x", None)
        if x is None or getattr(recipe, "tokenizer", None) is not None or x.dim() != 4 or x.shape[1] not in (1, 3):
            return
        x = x[order].detach().float()
        lo = x.amin((1, 2, 3), keepdim=True)
        hi = x.amax((1, 2, 3), keepdim=True)
        run.logger.writer.add_images("attribution/top_images", (x - lo) / (hi - lo).clamp_min(1e-12), step)

    against = str(kw.get("against", "self"))
    try:
        report = attribute_run(run.dir, run.cfg, run.components, run.host, "tracin", opts, top=int(kw["top"]),
                               allow_private_data=bool(kw["allow_private_data"]), out=out, on_top=images,
                               test=None if against == "self" else against)
    except Exception as exc:  # whatever fails here (not only PlaitError), the run and its summary.json stay
        what = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        msg = what if isinstance(exc, PlaitError) else f"{type(exc).__name__}: {what}"
        print(f"influence: {msg}", file=sys.stderr)
        run.summary["attribution"] = {"error": msg}
        return None
    value = "self-influence" if against == "self" else "mean score vs eval"
    lines = [f"| rank | example | {value} | train loss | " + ("text" if report.get("lm") else "label") + " |",
             "|---|---|---|---|---|"]
    lines += [f"| {r + 1} | {row['index']} | {row.get('self_influence', row.get('mean_score')):.4g} | "
              f"{row['train_loss']:.4g} | {row['text'] if report.get('lm') else row.get('label', '')} |"
              for r, row in enumerate(report["top"])]
    run.logger.text("attribution/top", "\n".join(lines), step)
    run.summary["attribution"] = {"out_dir": str(out), "estimator": "tracin", "against": against,
                                  "checkpoints": report["checkpoints"],
                                  "n_train": report["n_train"], "seconds": round(report["seconds"], 3),
                                  "top": [row["index"] for row in report["top"]]}
    return report
