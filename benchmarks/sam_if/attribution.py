"""Attribution quality and cost of the sam_if estimators on scikit-learn digits trained with SAM.

Prints one JSON object (progress on stderr). Per model (``lr``: logistic regression; ``mlp``: 64-H-10 tanh MLP):

* **Training.** Full-batch SAM with m-sharpness (groups of ``--m`` consecutive examples, one perturbation each),
  plain SGD at a constant lr for ``--steps`` steps from the seeded init (trajectory recorded every
  ``--record-every`` steps for ``tracin`` / ``sam_trajectory``), then polished to SAM's fixed point
  F(ŵ) = 0 (`editing.solve_fixed_point`; the distance from the last SGD iterate is reported). m-sharpness is
  used because full-batch normalised SAM on a strictly convex loss has no fixed point (docs/sam_if.md), so
  "retrain to convergence" would be undefined for it.
* **LOO correlation** (clean labels): ``--loo`` training points drawn uniformly at random (seeded, no selection
  by any score). Ground truth: warm-start retraining from ŵ to the SAM fixed point of the objective with the
  point's weight set to 0 (‖F‖ ≤ 1e-11; i.e. δ = −1/n, the removal influence functions linearise), change of
  the mean test cross-entropy. Predicted: mean_t score[j, t] / n. Pearson and Spearman per estimator. A
  cross-check retrains ``--check`` of the points by actual SAM iterations (heavy-ball SGD, same fixed point)
  and reports the largest weight difference to the fixed-point solve.
* **Mislabel detection** (``--flip`` of the training labels flipped): ROC-AUC and recall at 10 % of the
  self-influence ranking per estimator, against ranking by training loss.
* **Cost**: seconds of ``scores(model, train, test)`` per 1,000 (train, test) pairs, and of ``self_influence``
  per 1,000 training examples, measured side by side in this process (the Hessian estimators' cost is mostly
  the fixed p×p setup, amortised over n_train × n_test pairs).

    .venv/bin/python benchmarks/sam_if/attribution.py                       # ~10-20 min on 2 shared cores
    .venv/bin/python benchmarks/sam_if/attribution.py --n-train 200 --n-test 50 --loo 20 --steps 100 --models lr
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


class NoFixedPoint(RuntimeError):
    pass


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.numpy(), b.numpy()).statistic)


def train(args, hidden, flip):
    from plait.plugins.sam_if.data import TabularMLP, load_tabular
    from plait.plugins.sam_if.editing import sam_descent, sam_options, solve_fixed_point
    from plait.plugins.sam_if.functional import Objective
    from plait.plugins.sam_if.solvers import SolverError

    data = load_tabular("digits", n_train=args.n_train, n_test=args.n_test, flip_fraction=flip, seed=args.seed)
    model = TabularMLP(64, 10, hidden=hidden, seed=args.seed)
    sam = sam_options(rho=args.rho, m=args.m)
    obj = Objective(model, data.train, args.l2)
    t0 = time.perf_counter()
    w_T, traj = sam_descent(obj, obj.fm.flat(), sam, args.lr, args.steps, args.record_every)
    t_train = time.perf_counter() - t0
    res_T = float(obj.sam_field(w_T, **sam).norm())
    info = {"train_seconds": round(t_train, 2), "residual_last_sgd_iterate": res_T}
    try:
        w_hat, fp = solve_fixed_point(obj, w_T, sam)
    except SolverError as exc:  # no SAM fixed point near w_T: score at the last iterate and say so
        log(f"  trained {args.steps} SAM steps in {t_train:.1f}s, ‖F(w_T)‖ {res_T:.2e}; {exc}")
        obj.fm.load(w_T)
        return data, model, obj, sam, traj, {**info, "fixed_point": None, "fixed_point_error": str(exc)}
    obj.fm.load(w_hat)
    log(f"  trained {args.steps} SAM steps in {t_train:.1f}s: ‖F(w_T)‖ {res_T:.2e}, fixed point after "
        f"{fp['iterations']} chord/Newton iterations (‖F‖ {fp['residual']:.1e}), ‖ŵ − w_T‖ "
        f"{float((w_hat - w_T).norm()):.2e}")
    return data, model, obj, sam, traj, {**info, "fixed_point": True, "residual_fixed_point": fp["residual"],
                                         "distance_last_iterate_to_fixed_point": float((w_hat - w_T).norm())}


def estimators(args, traj):
    from plait.plugins.sam_if.influence import IFEstimator, SAMHessianEstimator, TrajectoryEstimator

    return {"if": IFEstimator(l2=args.l2),
            "sam_hessian": SAMHessianEstimator(rho=args.rho, m=args.m, l2=args.l2),
            "tracin": TrajectoryEstimator(trajectory=traj),
            "sam_trajectory": TrajectoryEstimator(trajectory=traj, in_batch=True, coupling=True)}


def loo(args, hidden):
    from plait.plugins.sam_if.editing import mean_loss, retrain_removed
    from plait.plugins.sam_if.sam import train_sam

    data, model, obj, sam, traj, train_info = train(args, hidden, 0.0)
    if not train_info["fixed_point"]:
        raise NoFixedPoint("no SAM fixed point was reached (" + train_info["fixed_point_error"] + "): warm-start "
                           "retraining to convergence is undefined, so no LOO ground truth")
    n, nt = len(data.train), len(data.test)
    w_hat = obj.fm.flat()
    base = mean_loss(obj.fm, w_hat, data.test)
    preds, cost = {}, {}
    for name, est in estimators(args, traj).items():
        t0 = time.perf_counter()
        s = est.scores(model, data.train, data.test)
        dt = time.perf_counter() - t0
        cost[name] = round(dt / (n * nt) * 1000, 6)
        preds[name] = s.mean(1) / n
        log(f"  {name}: scores in {dt:.1f}s")
    g = torch.Generator().manual_seed(args.seed + 17)
    points = torch.randperm(n, generator=g)[:args.loo]
    A = torch.func.jacfwd(lambda u: obj.sam_field(u, **sam))(w_hat)
    actual, worst = [], 0.0
    t0 = time.perf_counter()
    for i, j in enumerate(points.tolist()):
        w_j, info = retrain_removed(obj, w_hat, [j], sam, A=A)
        worst = max(worst, info["residual"])
        actual.append(mean_loss(obj.fm, w_j, data.test) - base)
        if i % 20 == 0:
            log(f"  LOO {i + 1}/{len(points)}")
    t_loo = time.perf_counter() - t0
    actual_t = torch.tensor(actual, dtype=torch.float64)
    check = []
    for j in points[:args.check].tolist():  # independent oracle: actual SAM iterations to the same fixed point
        c = torch.ones(n, dtype=torch.float64)
        c[j] = 0.0
        m2 = copy.deepcopy(model)
        r = train_sam(m2, data.train.X, data.train.y, rho=args.rho, m=args.m, l2=args.l2, lr=args.lr,
                      momentum=0.9, steps=args.check_steps, tol=1e-10, sample_weight=c)
        w_fp, _ = retrain_removed(obj, w_hat, [j], sam, A=A)
        check.append({"index": j, "sam_steps": r["steps"], "final_update_norm": r["update_norm"],
                      "max_abs_weight_diff": float((torch.cat([p.detach().reshape(-1) for p in m2.parameters()])
                                                    - w_fp).abs().max()),
                      "loo_change_sam_iterations": mean_loss(obj.fm, torch.cat(
                          [p.detach().reshape(-1) for p in m2.parameters()]), data.test) - base,
                      "loo_change_fixed_point": mean_loss(obj.fm, w_fp, data.test) - base})
    out = {"n_points": len(points), "retrain_seconds": round(t_loo, 2), "max_retrain_residual": worst,
           "actual_abs_mean": float(actual_t.abs().mean()), "training": train_info, "retrain_check": check,
           "pearson": {}, "spearman": {}, "cost_ms_per_1000_pairs": {k: round(v * 1000, 3) for k, v in cost.items()}}
    for name, p in preds.items():
        out["pearson"][name] = round(pearson(p[points], actual_t), 4)
        out["spearman"][name] = round(spearman(p[points], actual_t), 4)
    return out


def mislabel(args, hidden):
    from plait.plugins.sam_if.attribute import recall_at, roc_auc

    data, model, obj, sam, traj, train_info = train(args, hidden, args.flip)
    flip = data.flip_mask
    with torch.no_grad():
        train_loss = obj.fm.losses(obj.fm.flat(), data.train.X, data.train.y)
    out = {"n_flipped": int(flip.sum()), "training": train_info,
           "auc": {"training_loss": round(roc_auc(train_loss, flip), 4)},
           "recall_at_10pct": {"training_loss": round(recall_at(train_loss, flip), 4)},
           "self_influence_seconds_per_1000": {}}
    for name, est in estimators(args, traj).items():
        t0 = time.perf_counter()
        s = est.self_influence(model, data.train)
        dt = time.perf_counter() - t0
        out["auc"][name] = round(roc_auc(s, flip), 4)
        out["recall_at_10pct"][name] = round(recall_at(s, flip), 4)
        out["self_influence_seconds_per_1000"][name] = round(dt / len(data.train) * 1000, 3)
        log(f"  {name}: self-influence AUC {out['auc'][name]:.3f} ({dt:.1f}s)")
    return out


def lm_case(args) -> dict:
    """Mislabel detection on the bundled tiny OPT: synthetic_sentiment with ``--flip`` of the completions swapped,
    AdamW fine-tuning (sft's loss: mean completion-token NLL per example), checkpoints every quarter of the run,
    then `projected.CheckpointTracIn` self-influence (exact, and projected to ``--lm-k``) vs the final training
    loss as rankings of the flipped examples; seconds and peak RSS per 1,000 scored examples."""
    import random
    import resource

    from plait.plugins.basics.data import SyntheticSentiment, collate, tokenize_example
    from plait.plugins.basics.models import BUNDLED_MODELS, build_causal_lm
    from plait.plugins.basics.sft_recipe import sample_losses
    from plait.plugins.sam_if.attribute import recall_at, roc_auc
    from plait.plugins.sam_if.projected import Checkpoint, CheckpointTracIn

    torch.manual_seed(args.seed)
    n = args.lm_n
    ds = SyntheticSentiment(n_train=n, n_eval=0, seed=args.seed)
    ex = ds.examples("train")
    rng = random.Random(args.seed)
    flipped = torch.zeros(n, dtype=torch.bool)
    for i in rng.sample(range(n), int(round(args.flip * n))):
        flipped[i] = True
        ex[i] = {**ex[i], "completion": ds.label_words[1 - ds.label_words.index(ex[i]["completion"])]}
    model, tok = build_causal_lm(path=BUNDLED_MODELS["tiny-opt-base"])
    items = [tokenize_example(tok, e["prompt"], e["completion"], 64) for e in ex]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    cks, every = [], max(1, args.lm_steps // 4)
    order: list[int] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, args.lm_steps + 1):
        if len(order) < 16:
            order += torch.randperm(n, generator=gen).tolist()
        idx, order = order[:16], order[16:]
        loss = sample_losses(model, collate([items[i] for i in idx], tok.pad_token_id)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % every == 0:
            names = {id(p): nm for nm, p in model.named_parameters()}
            sq = {names[id(p)]: st["exp_avg_sq"].clone() for p, st in opt.state.items()}
            cks.append(Checkpoint(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                                  lr=args.lm_lr, steps=every, optimizer="adamw", exp_avg_sq=sq, adam_step=step))
    train_s = time.perf_counter() - t0
    model.eval()

    def loss_of(m, i):
        return sample_losses(m, collate([items[i]], tok.pad_token_id))[0]
    with torch.no_grad():
        final = torch.stack([loss_of(model, i) for i in range(n)]).double()
    out = {"model": "bundled tiny-opt-base", "params": sum(p.numel() for p in model.parameters()), "n_train": n,
           "flipped": int(flipped.sum()), "steps": args.lm_steps, "checkpoints": len(cks),
           "train_seconds": round(train_s, 1),
           "training_loss": {"auc": roc_auc(final, flipped), "recall_at_10pct": recall_at(final, flipped)}}
    for label, k in (("tracin_exact", 0), (f"tracin_k{args.lm_k}", args.lm_k)):
        est = CheckpointTracIn(k=k, projection="rademacher", seed=args.seed, batch_size=100)
        t0 = time.perf_counter()
        si = est.self_influence(model, cks, loss_of, n).double()
        sec = time.perf_counter() - t0
        out[label] = {"auc": roc_auc(si, flipped), "recall_at_10pct": recall_at(si, flipped), "k": est.last_info["k"],
                      "seconds_per_1000": round(1000 * sec / n, 1)}
        log(f"[lm] {label}: {out[label]}")
    out["peak_rss_mb_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lr,mlp", help="comma list of lr, mlp")
    ap.add_argument("--hidden", type=int, default=8, help="MLP hidden width")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--loo", type=int, default=120, help="randomly drawn leave-one-out points")
    ap.add_argument("--check", type=int, default=2, help="LOO points re-solved by actual SAM iterations")
    ap.add_argument("--check-steps", type=int, default=1500)
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--m", type=int, default=100, help="m-sharpness group size")
    ap.add_argument("--l2", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--record-every", type=int, default=5)
    ap.add_argument("--flip", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--case", default="tabular", help="tabular (digits, the estimators above) | lm (tiny OPT)")
    ap.add_argument("--lm-n", type=int, default=200)
    ap.add_argument("--lm-steps", type=int, default=200)
    ap.add_argument("--lm-lr", type=float, default=1e-3)
    ap.add_argument("--lm-k", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    if args.case == "lm":
        result = {"benchmark": "attribution", "case": "lm", "dataset": "synthetic_sentiment",
                  "torch": torch.__version__, "settings": vars(args), "lm": lm_case(args)}
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(result, indent=2))
        return
    result = {"benchmark": "attribution", "dataset": "digits", "torch": torch.__version__,
              "settings": {k: v for k, v in vars(args).items()}, "models": {}}
    for name in args.models.split(","):
        hidden = [] if name == "lr" else [args.hidden]
        log(f"[{name}] leave-one-out")
        try:
            r_loo = loo(args, hidden)
        except NoFixedPoint as exc:
            r_loo = {"skipped": str(exc)}
        log(f"[{name}] mislabel detection")
        r_mis = mislabel(args, hidden)
        result["models"][name] = {"hidden": hidden, "loo": r_loo, "mislabel": r_mis}
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
