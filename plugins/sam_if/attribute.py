"""CLI verb ``plait attribute RUN_DIR [estimator=NAME] [key=value …] [--top K]``: score a finished ``sam_train``
run's eval split against its train split with a registered influence estimator.

Writes ``RUN_DIR/attribution/<estimator>/``: ``scores.safetensors`` (``scores`` [n_train, n_test]),
``self_influence.safetensors`` (``self_influence``, ``train_loss``, ``flip_mask`` [n_train]), ``report.json`` and
``report.md`` (top-K proponents / opponents of the first test examples, the most self-influential training
examples, and with flipped labels the mislabel-detection ROC-AUC and recall at 10 % against the training-loss
ranking).

Runs of other first-order recipes (sft, classify, …) go to `anyrun.attribute_run`: ``estimator=tracin|ekfac``,
``--test SPLIT|FILE`` (train × test scores), ``--remove K`` (editing by retraining the run's config, `apps`),
``--mislabeled FILE`` (mislabel-detection AUC).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from plait.errors import ConfigError, PlaitError

DEFAULT_ESTIMATOR = "if"
TRAJECTORY_ESTIMATOR_FIELD = "trajectory"


def add_parser(cli) -> None:
    p = cli.add_parser("attribute", help="score training examples of a finished run (influence)")
    p.add_argument("run_dir", help="a run directory written by `plait run` (sam_train: every estimator; any other "
                                   "first-order recipe: estimator=tracin over its checkpoints)")
    p.add_argument("options", nargs="*", metavar="key=value",
                   help="estimator=if|sam_hessian|tracin|sam_trajectory, then that estimator's options")
    p.add_argument("--top", type=int, default=5, help="proponents / opponents / self-influential rows listed")
    p.add_argument("--examples", type=int, default=3, help="test examples whose proponents are listed")
    p.add_argument("--remove", type=int, default=0, metavar="K",
                   help="model editing: remove the K most harmful training examples (sam_train: one-step influence "
                        "update and same-schedule retraining; any other run: the most harmful for --test, else the "
                        "most self-influential, retrained from the run's config) against K random ones")
    p.add_argument("--random-draws", type=int, default=3, help="random K-subsets retrained for --remove")
    p.add_argument("--test", default=None, metavar="SPLIT|FILE",
                   help="train x test scores against eval | train | a .jsonl (LM runs) or .safetensors x/y file "
                        "(image runs); runs other than sam_train (which scores its test split)")
    p.add_argument("--mislabeled", default=None, metavar="FILE",
                   help="known mislabelled training indices (JSON list or one per line): mislabel-detection AUC "
                        "of the self-influence ranking vs the training loss (runs other than sam_train)")
    p.add_argument("--allow-private-data", action="store_true",
                   help="score a DP run anyway (the scores reveal training examples and are not private)")
    p.set_defaults(func=cmd_attribute)


def cmd_attribute(args) -> int:
    report = attribute(args.run_dir, args.options, top=args.top, examples=args.examples, remove=args.remove,
                       random_draws=args.random_draws, allow_private_data=args.allow_private_data, test=args.test,
                       mislabeled=args.mislabeled)
    print(f"wrote {report['out_dir']}")
    e = report.get("editing")
    if e and "base" in e:  # any run: retrained from its config (`apps.edit_run`)
        h = e["harmful"]
        if e["test"]:
            print(f"editing (remove {e['k']}): target loss {e['base']['target_loss']:.4g}; harmful retrained "
                  f"{h['delta_target_loss']:+.4g}; random retrained {e['random_mean_delta_target_loss']:+.4g}")
        else:
            print(f"editing (remove {e['k']} most self-influential): Δ eval {json.dumps(h['delta_eval'])}; random "
                  f"{json.dumps(e['random'][0]['delta_eval'])}")
    elif e:
        one = f", one-step update {e['harmful']['one_step']:+.4g}" if "one_step" in e["harmful"] else ""
        print(f"model editing (remove {e['k']}): test loss {e['test_loss']:.4g}; harmful retrained "
              f"{e['harmful']['retrained']:+.4g} (predicted {e['harmful']['predicted']:+.4g}{one}); random retrained "
              f"{e['random']['retrained_mean']:+.4g}")
    m = report.get("mislabel")
    if m:
        print(f"mislabel detection ({m.get('n_flipped', m.get('n_mislabeled'))} known): ROC-AUC {m['auc']:.3f} "
              f"(training loss {m['baseline_auc']:.3f}), recall@10% {m['recall_at_10pct']:.3f} "
              f"(training loss {m['baseline_recall_at_10pct']:.3f})")
    return 0


def _parse_options(options: list[str]) -> tuple[str, dict[str, Any]]:
    import yaml

    est, opts = DEFAULT_ESTIMATOR, {}
    for item in options:
        if "=" not in item:
            raise ConfigError(f"attribute: expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        parsed = yaml.safe_load(value) if value else ""
        if key == "estimator":
            est = str(value)
        else:
            opts[key] = parsed
    return est, opts


def roc_auc(score: torch.Tensor, positive: torch.Tensor) -> float:
    """ROC-AUC of ``score`` ranking the ``positive`` rows first (ties count half)."""
    s = score.double()
    pos, neg = s[positive], s[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[positive].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def _average_ranks(s: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    i, n = 0, len(s)
    while i < n:
        j = i
        while j + 1 < n and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def recall_at(score: torch.Tensor, positive: torch.Tensor, fraction: float = 0.1) -> float:
    k = max(1, int(round(fraction * len(score))))
    top = torch.argsort(score, descending=True, stable=True)[:k]
    return float(positive[top].sum()) / max(1, int(positive.sum()))


class _OtherRecipe(Exception):
    """Not a sam_train run: `anyrun` scores it from its checkpoints."""

    def __init__(self, cfg, comps):
        super().__init__(cfg.recipe.name)
        self.cfg, self.comps = cfg, comps


def _load(run_dir: Path, host):
    from plait.checkpoint import Checkpointer
    from plait.config import find_renamed, load_config, validate

    if not run_dir.is_dir():
        raise PlaitError(f"attribute: '{run_dir}' is not a run directory")
    if not (run_dir / "config.yaml").is_file():
        raise PlaitError(f"attribute: '{run_dir}' has no config.yaml; is it a run directory written by plait run?")
    latest = Checkpointer(run_dir / "checkpoints").latest()
    if latest is None:
        raise PlaitError(f"attribute: '{run_dir}' has no complete checkpoint under checkpoints/ (did the run "
                         f"finish? a sam_train run saves one at its last step)")
    cfg = load_config(run_dir / "config.yaml")
    renamed = find_renamed(cfg, host.registries)
    if renamed is not None:  # a run written before an entry or option was renamed
        raise ConfigError(f"attribute: '{run_dir / 'config.yaml'}' is older than a rename ({renamed}); write the "
                          f"new name there to attribute this run")
    comps = validate(cfg, host.registries)
    if cfg.recipe.name != "sam_train":
        raise _OtherRecipe(cfg, comps)
    _, state = Checkpointer.load(latest)

    def build(section):
        comp = comps[section]
        try:
            return comp.entry.factory(**comp.kwargs())
        except (ValueError, FileNotFoundError) as exc:
            raise ConfigError(f"{section} {comp.entry.name!r}: {exc}") from exc
    data, model = build("data"), build("model")
    init = copy.deepcopy(model)  # the factories are seeded: these are the run's initial weights
    model.load_state_dict(state["task"]["model"])
    model.eval()
    return cfg, data, model, init


def _replay_options(cfg) -> dict[str, Any]:
    """`sam.train_sam` keyword arguments that replay a full-batch sam_train run."""
    rc = cfg.recipe
    if rc.batch_size:
        raise PlaitError(f"attribute --remove: retraining replays full-batch runs only; this run has "
                         f"recipe.batch_size={rc.batch_size}")
    return dict(rho=rc.rho, adaptive=rc.adaptive, eta=rc.eta, eps=rc.eps, l2=rc.l2, lr=rc.lr, steps=cfg.run.steps,
                m=rc.m, schedule=rc.schedule, min_lr_ratio=rc.min_lr_ratio, momentum=rc.momentum)


def _estimator(host, name: str, opts: dict[str, Any], cfg, run_dir: Path):
    from omegaconf import OmegaConf

    from plait.config import validate_section

    registry = host.registries.for_section("influence")
    if name not in registry:
        raise ConfigError(f"attribute: unknown estimator {name!r}; available: {registry.describe_available()}")
    fields = {f.name for f in dataclasses.fields(registry.get(name).config)}
    rc = cfg.recipe
    filled = dict(opts)
    training = {"l2": rc.l2, "rho": rc.rho, "adaptive": rc.adaptive, "eta": rc.eta, "eps": rc.eps, "m": rc.m}
    for key, value in training.items():  # the estimator must match training unless told otherwise
        if key in fields and key not in filled:
            filled[key] = value
    if TRAJECTORY_ESTIMATOR_FIELD in fields and not filled.get(TRAJECTORY_ESTIMATOR_FIELD):
        traj = run_dir / "trajectory"
        if not (traj / "trajectory.safetensors").is_file():
            raise PlaitError(f"attribute: estimator {name!r} needs a recorded trajectory and '{run_dir}' has none; "
                             f"train with recipe.record_trajectory=true (plait run CONFIG "
                             f"recipe.record_trajectory=true), or use estimator=if or sam_hessian")
        filled[TRAJECTORY_ESTIMATOR_FIELD] = str(traj)
    if TRAJECTORY_ESTIMATOR_FIELD in fields and "l2" in filled and "l2" not in opts:
        filled.pop("l2")  # trajectory estimators read l2 from the trajectory's metadata
    comp, _ = validate_section("influence", OmegaConf.create({"name": name, **filled}), host.registries,
                             "attribute")
    try:
        return comp.entry.factory(**comp.kwargs()), comp.kwargs()
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"attribute: estimator {name!r}: {exc}") from exc


def validate_cfg(cfg, host):
    from plait.config import validate

    return validate(cfg, host.registries)


def attribute(run_dir: str | Path, options: list[str] = (), top: int = 5, examples: int = 3,
              host=None, remove: int = 0, random_draws: int = 3, allow_private_data: bool = False,
              test: str | None = None, mislabeled: str | None = None) -> dict[str, Any]:
    from safetensors.torch import save_file

    from plait.manager import get_host

    host = host or get_host()
    run_dir = Path(run_dir)
    name, opts = _parse_options(list(options))
    try:
        cfg, data, model, init = _load(run_dir, host)
    except _OtherRecipe as other:
        from .anyrun import attribute_run

        return attribute_run(run_dir, other.cfg, other.comps, host, name, opts, top=top,
                             allow_private_data=allow_private_data, test=test, remove=remove,
                             random_draws=random_draws, mislabeled=mislabeled)
    if mislabeled:
        raise ConfigError("attribute --mislabeled: a sam_train run reads its dataset's own flips (data.flip_fraction)")
    if test not in (None, "test", "eval"):
        raise ConfigError(f"attribute --test {test!r}: a sam_train run is scored against its data's test split; "
                          f"allowed: test (or leave --test out)")
    from .anyrun import private_transforms

    private = private_transforms(validate_cfg(cfg, host))
    if private and not allow_private_data:
        raise PlaitError(f"attribute: '{run_dir}' trained with private {'+'.join(private)}; attribution scores "
                         f"reveal individual training examples and are not differentially private: pass "
                         f"--allow-private-data to compute them anyway")
    replay = _replay_options(cfg) if remove else None
    est, est_opts = _estimator(host, name, opts, cfg, run_dir)
    dtype = next(model.parameters()).dtype
    train = (data.train.X.to(dtype), data.train.y)
    test = (data.test.X.to(dtype), data.test.y)
    t0 = time.perf_counter()
    try:
        scores = est.scores(model, train, test).detach()
        self_inf = est.self_influence(model, train).detach()
    except ValueError as exc:
        raise PlaitError(f"attribute: estimator {name!r}: {exc}") from exc
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        train_loss = torch.nn.functional.cross_entropy(model(train[0]), train[1], reduction="none")
    flip = data.flip_mask
    out = run_dir / "attribution" / name
    out.mkdir(parents=True, exist_ok=True)
    save_file({"scores": scores.contiguous()}, str(out / "scores.safetensors"))
    save_file({"self_influence": self_inf.contiguous(), "train_loss": train_loss.contiguous(),
               "flip_mask": flip.contiguous()}, str(out / "self_influence.safetensors"))

    def row(j: int, value: float) -> dict[str, Any]:
        return {"train_index": j, "score": value, "label": int(data.train.y[j]), "flipped": bool(flip[j])}

    k = max(0, min(top, scores.shape[0]))
    per_test = []
    for t in range(min(examples, scores.shape[1])):
        col = scores[:, t]
        pro = torch.argsort(col, descending=True, stable=True)[:k]
        opp = torch.argsort(col, stable=True)[:k]
        per_test.append({"test_index": t, "label": int(data.test.y[t]),
                         "proponents": [row(int(j), float(col[j])) for j in pro],
                         "opponents": [row(int(j), float(col[j])) for j in opp]})
    most_self = torch.argsort(self_inf, descending=True, stable=True)[:k]
    report: dict[str, Any] = {
        "run_dir": str(run_dir), "out_dir": str(out), "estimator": name, "options": est_opts,
        "n_train": int(scores.shape[0]), "n_test": int(scores.shape[1]), "seconds": round(seconds, 3),
        "info": {k2: v for k2, v in getattr(est, "last_info", {}).items() if isinstance(v, (int, float, str))},
        "test_examples": per_test,
        "self_influence_top": [dict(row(int(j), float(self_inf[j])), train_loss=float(train_loss[j]))
                               for j in most_self],
    }
    if bool(flip.any()):
        report["mislabel"] = {
            "n_flipped": int(flip.sum()), "auc": roc_auc(self_inf, flip), "recall_at_10pct": recall_at(self_inf, flip),
            "baseline": "training loss", "baseline_auc": roc_auc(train_loss, flip),
            "baseline_recall_at_10pct": recall_at(train_loss, flip)}
    if remove:
        report["editing"] = _edit(model, init, train, test, scores, est, remove, replay, random_draws,
                                  cfg.run.seed)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    return report


def _edit(model, init, train, test, scores, est, k, replay, draws, seed) -> dict[str, Any]:
    from .editing import edit, replay_training
    from .functional import FlatModel

    w = FlatModel(model).flat()
    err = float((replay_training(init, train, replay) - w).abs().max())
    if not err <= 1e-9 * max(1.0, float(w.abs().max())):
        raise PlaitError(f"attribute --remove: replaying the run's training does not reproduce its weights (max abs "
                         f"difference {err:.3e}); retraining would not be comparable")
    if not 0 < k < scores.shape[0]:
        raise ConfigError(f"attribute --remove: K must be in 1..{scores.shape[0] - 1}, got {k}")
    out = edit(model, train, test, scores, k, lambda rows: replay_training(init, train, replay, rows),
               estimator=est, random_draws=draws, seed=seed)
    out["retraining"] = "same schedule from the run's initial weights, removed rows weighted 0"
    out["replay_max_abs_error"] = err
    return out


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"# Attribution: `{r['estimator']}` on `{r['run_dir']}`", "",
             f"{r['n_train']} training × {r['n_test']} test examples, {r['seconds']} s. Score > 0: the training "
             f"example helps (lowers the loss of) the test example.", ""]
    m = r.get("mislabel")
    if m:
        lines += ["## Mislabel detection (self-influence ranking)", "",
                  "| ranking | ROC-AUC | recall @ 10 % |", "|---|---|---|",
                  f"| self-influence ({r['estimator']}) | {m['auc']:.3f} | {m['recall_at_10pct']:.3f} |",
                  f"| training loss | {m['baseline_auc']:.3f} | {m['baseline_recall_at_10pct']:.3f} |", "",
                  f"{m['n_flipped']} of {r['n_train']} training labels flipped.", ""]
    lines += ["## Most self-influential training examples (likely mislabelled)", "",
              "| train index | self-influence | label | flipped | training loss |", "|---|---|---|---|---|"]
    lines += [f"| {x['train_index']} | {x['score']:.4g} | {x['label']} | {x['flipped']} | {x['train_loss']:.3f} |"
              for x in r["self_influence_top"]]
    e = r.get("editing")
    if e:
        lines += ["", f"## Model editing: remove {e['k']} examples (test loss {e['test_loss']:.4g})", "",
                  "| removed | predicted Δ | one-step update Δ | retrained Δ |", "|---|---|---|---|",
                  f"| {e['k']} most harmful | {e['harmful']['predicted']:+.4g} | "
                  f"{e['harmful'].get('one_step', float('nan')):+.4g} | {e['harmful']['retrained']:+.4g} |",
                  f"| {e['k']} random (mean of {len(e['random']['draws'])}) | {e['random']['predicted_mean']:+.4g} "
                  f"| | {e['random']['retrained_mean']:+.4g} |"]
    for t in r["test_examples"]:
        lines += ["", f"## Test example {t['test_index']} (label {t['label']})", "",
                  "proponents: " + ", ".join(f"{x['train_index']} ({x['score']:.3g})" for x in t["proponents"]),
                  "", "opponents: " + ", ".join(f"{x['train_index']} ({x['score']:.3g})" for x in t["opponents"])]
    return "\n".join(lines) + "\n"
