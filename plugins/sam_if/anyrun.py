"""``plait attribute RUN estimator=tracin`` on a run of any first-order recipe (sft, classify, … and composed
SAM / DP runs): projected TracIn (`projected.CheckpointTracIn`) over the run's saved checkpoints.

The run is rebuilt from its ``config.yaml`` (no new run directory, nothing written there but ``attribution/``);
each complete checkpoint is loaded into the recipe, and the recipe's own ``sample_losses([i])`` is the loss of
training example i, so every model family a recipe builds is covered. Per checkpoint at step s: the learning rate
of step s+1 from the run's schedule (``recipe.step.lr_at``), times the steps since the previous checkpoint; the
optimizer kind, momentum and Adam second moments from the checkpoint's optimizer state (see `projected`).
Keep every checkpoint (``run.keep_checkpoints=0``, ``run.ckpt_every``) for a TracIn sum over training; with
the default ``keep_checkpoints: 2`` only the last two are summed (the report says how many).

Writes ``RUN/attribution/tracin/``: ``scores.safetensors`` (``self_influence`` [n], ``train_loss`` [n] at the last
checkpoint), ``report.json``, ``report.md`` (the top-k self-influential examples, with their text for LM runs).
With ``--test SPLIT|FILE`` (`apps.test_set`): ``scores`` [n_train, n_test] (Σ_c η_c (P Γ_c g_j)·(P g_t)),
``train_loss``, ``test_loss``, and per test example its top-k proponents and opponents in ``report.md``.
With ``--remove K`` (`apps.edit_run`): the K most harmful (against ``--test``) or most self-influential examples
are dropped and the run's config is trained again with every section (grad_transform, parallel), against K
random ones: ``RUN/attribution/edit.json`` and an editing table in ``report.md``.

Scoring uses the plain model and objective: the rebuild leaves out ``grad_transform:`` (DP layers clip
per-sample gradients in their backward; SAM moves the weights) and ``parallel:``, and turns a recipe's random
augmentation off (each example is scored as it is). Momentum μ: a gradient taken at step s moves the weights by
lr·g·(1 + μ + μ² + …) over the following steps, so each checkpoint's interval is weighted lr·steps/(1 − μ) —
exact for a constant lr when the buffer's tail (~1/(1 − μ) steps) ends inside the run, an approximation across a
schedule's changes and in the last ~1/(1 − μ) steps; ``report.json`` states the rule (``weighting``).

A run whose ``grad_transform:`` holds a private transform (flashdp, dp_flat) is refused unless
``--allow-private-data``: the model is private, but attribution reads the training examples themselves and its
scores are *not* differentially private — they single out individual examples.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from plait.errors import ConfigError, PlaitError

from .projected import PROJECTIONS, Checkpoint, CheckpointTracIn

OPTIONS = {"k": int, "projection": str, "seed": int, "batch_size": int, "params": list, "n": int}


def private_transforms(comps: dict[str, Any]) -> list[str]:
    """Names of private entries in a validated run's ``grad_transform:`` section."""
    gt = comps.get("grad_transform")
    if gt is None:
        return []
    gt = gt if isinstance(gt, list) else [gt]
    return [c.entry.name for c in gt if c.entry.extra.get("private")]


def _rebuild(run_dir: Path, cfg, comps, host):
    from plait.run import Run, _NoCheckpoints, _NullLogger, resolve_device, seed_everything

    seed_everything(cfg.run.seed)
    # scoring reads the plain model and objective: a grad_transform (DP layers that clip per-sample gradients in
    # their backward, SAM) changes how the run moved, not the loss, and a placement (parallel:) how it was spread;
    # retraining (`apps.retrain`, the editing app) rebuilds the run with every section
    comps = {k: v for k, v in comps.items() if k not in ("grad_transform", "parallel")}
    run = Run(cfg, comps, host, run_dir, resolve_device("cpu"), _NullLogger(), _NoCheckpoints(run_dir / "ck"))
    recipe = run.build("recipe", run=run)
    rcfg = getattr(recipe, "cfg", None)
    if getattr(rcfg, "augment", False):  # score each training example as it is, not a random augmentation of it
        rcfg.augment = False
    step = getattr(recipe, "step", None)
    if step is None or not hasattr(recipe, "sample_losses") or not hasattr(step, "lr_at"):
        raise PlaitError(f"attribute: recipe {cfg.recipe.name!r} has no shared first-order step with per-sample "
                         f"losses; tracin over checkpoints needs a first-order recipe (sft, classify, sam_train, …)")
    return recipe


def _checkpoint(recipe, state: dict, step: int, prev: int) -> Checkpoint:
    recipe.load_state_dict(state["task"])
    model, opt = recipe.step.model, recipe.step.optimizer
    kind = {"SGD": "sgd", "Adam": "adam", "AdamW": "adamw"}.get(type(opt).__name__, type(opt).__name__.lower())
    group = opt.param_groups[0]
    names = {id(p): n for n, p in model.named_parameters()}
    sq, t = {}, 0
    for p, st in opt.state.items():
        if "exp_avg_sq" in st and id(p) in names:
            sq[names[id(p)]] = st["exp_avg_sq"].detach().clone()
            t = int(st["step"])
    return Checkpoint(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                      lr=float(recipe.step.lr_at(step + 1)), steps=max(1, step - prev), optimizer=kind,
                      momentum=float(group.get("momentum", 0.0) or 0.0), exp_avg_sq=sq, adam_step=t,
                      betas=tuple(group.get("betas", (0.9, 0.999))), eps=float(group.get("eps", 1e-8)))


def _options(opts: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in opts.items():
        if key not in OPTIONS:
            raise ConfigError(f"attribute: tracin over checkpoints has no option {key!r}; allowed: "
                              f"{', '.join(OPTIONS)}")
        if key == "params":
            value = [value] if isinstance(value, str) else list(value or [])
        elif not isinstance(value, OPTIONS[key]):
            raise ConfigError(f"attribute: {key}={value!r} must be {OPTIONS[key].__name__}")
        out[key] = value
    if out.get("projection", "rademacher") not in PROJECTIONS:
        raise ConfigError(f"attribute: projection={out['projection']!r}; allowed: {', '.join(PROJECTIONS)}")
    return out


def _ekfac_options(opts: dict[str, Any]) -> dict[str, Any]:
    from .apps_ekfac import OPTIONS as EKFAC_OPTIONS

    out = {}
    for key, value in opts.items():
        if key not in EKFAC_OPTIONS:
            raise ConfigError(f"attribute: ekfac on a run of any recipe has no option {key!r}; allowed: "
                              f"{', '.join(EKFAC_OPTIONS)}")
        if key == "params":
            value = [value] if isinstance(value, str) else list(value or [])
        elif EKFAC_OPTIONS[key] is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, EKFAC_OPTIONS[key]):
            raise ConfigError(f"attribute: {key}={value!r} must be {EKFAC_OPTIONS[key].__name__}")
        out[key] = value
    return out


def _text(recipe, i: int) -> str:
    items = getattr(recipe, "train_items", None)
    tok = getattr(recipe, "tokenizer", None)
    if items is None or tok is None:
        return ""
    ids = items[i]["input_ids"] if isinstance(items[i], dict) else items[i]
    ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
    return tok.decode(ids).replace("\n", " ").replace("|", "/")[:120]


def _label(recipe, i: int) -> str:
    y = getattr(getattr(getattr(recipe, "data", None), "train", None), "y", None)
    return str(int(y[i])) if y is not None and i < len(y) else ""


def _edit_md(e: dict[str, Any]) -> list[str]:
    target = e["test"] is not None
    what = (f"the {e['k']} most harmful for `--test {e['test']}` (lowest mean score)" if target else
            f"the {e['k']} most self-influential")
    keys = sorted(e["harmful"]["delta_eval"])
    head = "| removed | " + ("target loss (Δ) | " if target else "") + " | ".join(f"Δ {k}" for k in keys) + " |"
    lines = ["", f"## Editing: remove {what}, retrain from the run's config", "",
             f"Base (the run's final weights): target loss {e['base']['target_loss']}, eval "
             f"{json.dumps(e['base']['final_eval'])}", "", head, "|" + "---|" * (1 + target + len(keys))]
    for label, r in [("most harmful" if target else "most self-influential", e["harmful"])] + [
            (f"random #{i + 1}", r) for i, r in enumerate(e["random"])]:
        cells = [label] + ([f"{r['target_loss']:.4g} ({r['delta_target_loss']:+.4g})"] if target else [])
        cells += [f"{r['delta_eval'][k]:+.4g}" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def attribute_run(run_dir: Path, cfg, comps, host, name: str, opts: dict[str, Any], *, top: int = 10,
                  allow_private_data: bool = False, out: Path | None = None, on_top=None, test: str | None = None,
                  remove: int = 0, random_draws: int = 1, mislabeled: str | None = None) -> dict[str, Any]:
    """Self-influence (``test`` None) or train × test scores (``test``: a split or file, `apps.test_set`) by
    projected TracIn over the run's checkpoints; ``remove`` K > 0: the editing app (`apps.edit_run`)."""
    from safetensors.torch import save_file

    from plait.checkpoint import Checkpointer

    from .apps import edit_run, mislabel_mask, mislabel_report, test_set

    chain = comps.get("grad_transform")
    chain = [c.entry.name for c in (chain if isinstance(chain, list) else [chain] if chain else [])]
    if name in ("sam_hessian", "sam_trajectory") and "sam" not in chain:
        raise PlaitError(f"attribute: estimator {name!r} needs a run trained with SAM and '{run_dir}' "
                         f"({cfg.recipe.name}) has no sam in grad_transform; use estimator=tracin")
    if name not in ("tracin", "ekfac"):
        raise PlaitError(f"attribute: '{run_dir}' is a {cfg.recipe.name!r} run; estimator {name!r} reads sam_train "
                         f"runs only (SAM-aware scores of a {cfg.recipe.name}+sam run are not built yet); use "
                         f"estimator=tracin (TracIn over the run's checkpoints) or estimator=ekfac (EK-FAC at its "
                         f"final weights)")
    private = private_transforms(comps)
    if private and not allow_private_data:
        raise PlaitError(f"attribute: '{run_dir}' trained with private {'+'.join(private)}; attribution scores "
                         f"reveal individual training examples and are not differentially private: pass "
                         f"--allow-private-data to compute them anyway")
    paths = Checkpointer(run_dir / "checkpoints").complete()
    if not paths:
        raise PlaitError(f"attribute: '{run_dir}' has no complete checkpoint under checkpoints/; {name} needs the "
                         f"run's checkpoints (run.ckpt_every > 0, run.keep_checkpoints=0 keeps them all)")
    o = _options(opts) if name == "tracin" else _ekfac_options(opts)
    if remove < 0:
        raise ConfigError(f"attribute --remove: K must be >= 1, got {remove}")
    if name == "tracin":
        est = CheckpointTracIn(params=o.get("params", ["*"]), k=o.get("k", 0), projection=o.get("projection",
                               "rademacher"), seed=o.get("seed", 0), batch_size=o.get("batch_size", 16))
    else:
        from .apps_ekfac import AnyEKFAC

        try:
            est = AnyEKFAC(params=o.get("params", ["*"]), damping=o.get("damping", 1e-3),
                           damping_ratio=o.get("damping_ratio", 0.0))
        except ValueError as exc:
            raise ConfigError(f"attribute: estimator 'ekfac': {exc}") from exc
    recipe = _rebuild(run_dir, cfg, comps, host)
    n_all = int(recipe.step.dataset_size) if hasattr(recipe.step, "dataset_size") else None
    n_all = n_all or len(getattr(recipe, "train_items", []))
    n = min(int(o.get("n", n_all) or n_all), n_all)
    if remove and not remove < n:
        raise ConfigError(f"attribute --remove: K must be in 1..{n - 1} (the run has {n} scored training "
                          f"examples), got {remove}")
    tests = test_set(recipe, test) if test else None
    known = mislabel_mask(recipe, n, mislabeled)
    if mislabeled and tests is not None:
        raise ConfigError("attribute --mislabeled: ranks self-influence; leave out --test")
    cks, prev = [], 0
    for path in paths if name == "tracin" else paths[-1:]:  # ekfac: the final weights
        step, state = Checkpointer.load(path)
        cks.append(_checkpoint(recipe, state, step, prev))
        prev = step
    model = recipe.step.model

    def loss_of(m, i):
        return recipe.sample_losses([i])[0]
    t0 = time.perf_counter()
    try:
        if name == "ekfac":
            if tests is None:
                self_inf = est.scores(model, loss_of, n).detach().double()
            else:
                scores = est.scores(model, loss_of, n, tests.loss_of, tests.n).detach().double()
        elif tests is None:
            self_inf = est.self_influence(model, cks, loss_of, n).detach().double()
        else:
            scores = est.scores(model, cks, loss_of, n, tests.loss_of, tests.n).detach().double()
    except ValueError as exc:
        raise PlaitError(f"attribute: estimator {name!r}: {exc}") from exc
    seconds = time.perf_counter() - t0
    model.eval()  # the losses at the last checkpoint (loaded last)
    with torch.no_grad():
        train_loss = torch.stack([recipe.sample_losses([i])[0].detach() for i in range(n)]).double()
        test_loss = None if tests is None else torch.stack(
            [tests.loss_of(model, i).detach() for i in range(tests.n)]).double()
    out = Path(out) if out is not None else run_dir / "attribution" / name
    out.mkdir(parents=True, exist_ok=True)
    lm = getattr(recipe, "tokenizer", None) is not None
    col = "text" if lm else "label"

    def show(i):
        return _text(recipe, i) if lm else _label(recipe, i)
    report = {"run_dir": str(run_dir), "recipe": cfg.recipe.name, "estimator": name, "options": o,
              "checkpoints": [int(Checkpointer.load(p)[0]) for p in (paths if name == "tracin" else paths[-1:])],
              "n_train": n, "seconds": seconds,
              "info": est.last_info, "private": private, "out_dir": str(out), "lm": lm,
              "weighting": "per checkpoint: lr of the next step × steps since the previous checkpoint, / (1 − μ) "
                           "for SGD momentum μ (the buffer's total weight at constant lr); Adam: 1/(√v̂ + eps)"}
    head = ((f"{len(cks)} checkpoints, {n} training examples, d = {est.last_info['d']}, k = {est.last_info['k']}"
             if name == "tracin" else f"EK-FAC (empirical Fisher) at step {prev} on "
             f"{', '.join(est.last_info['layers'])}, damping {json.dumps(est.last_info['damping'])}, {n} training "
             f"examples")
            + (f"; private run ({'+'.join(private)}): these scores are not private" if private else ""))
    if tests is None:
        save_file({"self_influence": self_inf.contiguous(), "train_loss": train_loss.contiguous()},
                  str(out / "scores.safetensors"))
        order = torch.argsort(self_inf, descending=True, stable=True)[:top].tolist()
        rows = [{"index": i, "self_influence": float(self_inf[i]), "train_loss": float(train_loss[i]),
                 "text": _text(recipe, i), "label": _label(recipe, i)} for i in order]
        report["top"] = rows
        md = [f"# {name} self-influence: {run_dir.name} ({cfg.recipe.name})", "", head, "",
              f"| rank | example | self-influence | train loss | {col} |", "|---|---|---|---|---|"]
        md += [f"| {r + 1} | {row['index']} | {row['self_influence']:.4g} | {row['train_loss']:.4g} | "
               f"{row['text'] if lm else row['label']} |" for r, row in enumerate(rows)]
        if known is not None and bool(known.any()) and not bool(known.all()):
            m = report["mislabel"] = mislabel_report(self_inf, train_loss, known)
            md += ["", f"## Mislabel detection ({m['n_mislabeled']} of {n} known mislabelled)", "",
                   "| ranking | ROC-AUC | recall @ 10 % |", "|---|---|---|",
                   f"| self-influence ({name}) | {m['auc']:.3f} | {m['recall_at_10pct']:.3f} |",
                   f"| training loss | {m['baseline_auc']:.3f} | {m['baseline_recall_at_10pct']:.3f} |"]
    else:
        save_file({"scores": scores.contiguous(), "train_loss": train_loss.contiguous(),
                   "test_loss": test_loss.contiguous()}, str(out / "scores.safetensors"))
        kk = min(top, n)
        per = []
        md = [f"# {name} train × test: {run_dir.name} ({cfg.recipe.name}) against `{tests.name}`", "",
              head + f", {tests.n} test examples; scores [n_train, n_test] in scores.safetensors (> 0: the "
              f"training example lowers the test example's loss)"]
        for t in range(tests.n):
            c = scores[:, t]
            pro = torch.argsort(c, descending=True, stable=True)[:kk].tolist()
            opp = torch.argsort(c, stable=True)[:kk].tolist()
            per.append({"test_index": t, "test_loss": float(test_loss[t]), "test": tests.describe(t),
                        "proponents": [{"index": j, "score": float(c[j])} for j in pro],
                        "opponents": [{"index": j, "score": float(c[j])} for j in opp]})
            md += ["", f"## test {t} (loss {float(test_loss[t]):.4g}): {tests.describe(t)}", "",
                   f"| rank | proponent | score | {col} | opponent | score | {col} |", "|---|---|---|---|---|---|---|"]
            md += [f"| {r + 1} | {a} | {float(c[a]):.4g} | {show(a)} | {b} | {float(c[b]):.4g} | {show(b)} |"
                   for r, (a, b) in enumerate(zip(pro, opp))]
        report.update(test=tests.name, n_test=tests.n, per_test=per)
        # the top table of the section / TensorBoard: the most harmful examples over the whole test set
        mean = scores.mean(1)
        report["top"] = [{"index": i, "mean_score": float(mean[i]), "train_loss": float(train_loss[i]),
                          "text": _text(recipe, i), "label": _label(recipe, i)}
                         for i in torch.argsort(mean, stable=True)[:top].tolist()]
        order = [r["index"] for r in report["top"]]
    if remove:
        priority = -scores.mean(1) if tests is not None else self_inf
        cks.clear()
        edit = edit_run(run_dir, cfg, comps, host, k=remove, priority=priority, base_recipe=recipe, test=test,
                        draws=random_draws, seed=int(cfg.run.seed))
        edit["private"] = private
        report["editing"] = edit
        (run_dir / "attribution").mkdir(parents=True, exist_ok=True)
        (run_dir / "attribution" / "edit.json").write_text(json.dumps(edit, indent=2) + "\n")
        md += _edit_md(edit)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text("\n".join(md) + "\n")
    if on_top is not None:  # the influence: section's TensorBoard images of the top examples (image runs)
        on_top(recipe, order)
    return report
