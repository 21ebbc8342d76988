"""Attribution quality and cost of the sam_if estimators: digits trained with SAM, an LM and an image run.

Prints one JSON object (progress on stderr). Tabular case (``--case tabular``), per model (``lr``: logistic
regression; ``mlp``: 64-H-10 tanh MLP):

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

Two more cases (``--case``, a comma list; default all three, one JSON):

* ``lm``: the bundled tiny OPT on synthetic_sentiment with ``--flip`` of the completions swapped (`lm_case`):
  TracIn over checkpoints, exact and projected, vs the training loss; seconds per 1,000 examples and RSS.
* ``image``: a small PiT trained by the ``classify`` recipe (``plait run``) on ``capsule_red_lesions`` with
  ``flip_fraction`` = ``--flip`` (`image_case`): ``plait attribute RUN estimator=tracin`` exact and projected,
  EK-FAC on the head and the last block's MLP, the training loss; AUC, recall@10 %, seconds and RSS per 1,000
  scored pairs; then the retraining correlation (LDS over random halves, `image_lds`).

RSS: the peak resident set during each estimator (a 2 ms sampler thread, `PeakRSS`), as the process peak and
as the increase over the RSS before the call. ``--quick`` shrinks every case (`QUICK`) for run_all.py.

    .venv/bin/python benchmarks/sam_if/attribution.py                       # ~25-35 min on 2 shared cores
    .venv/bin/python benchmarks/sam_if/attribution.py --case image           # ~10 min (the LDS retrains 40 PiTs)
    .venv/bin/python benchmarks/sam_if/attribution.py --quick                # smoke test of all three cases
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
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            si = est.self_influence(model, cks, loss_of, n).double()
            sec = time.perf_counter() - t0
        out[label] = {"auc": roc_auc(si, flipped), "recall_at_10pct": recall_at(si, flipped), "k": est.last_info["k"],
                      "seconds_per_1000": round(1000 * sec / n, 1), "peak_rss_mb": mem.peak_mb,
                      "rss_increase_mb": mem.increase_mb}
        log(f"[lm] {label}: {out[label]}")
    out["peak_rss_mb_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out

class PeakRSS:
    """Peak resident set size while the block runs, sampled from /proc/self/statm every 2 ms by a thread: the
    block's own working memory is ``increase_mb`` (peak − RSS at entry); ``peak_mb`` is the process's peak."""

    def __init__(self):
        import os
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._rss())

    def __enter__(self):
        self._base = self._peak = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.peak_mb = round(self._peak / 2**20, 1)
        self.increase_mb = round((self._peak - self._base) / 2**20, 1)


IMAGE_RUN = """run: {{name: mislabel, seed: {seed}, steps: {steps}, log_every: {steps}, eval_every: 0,
      ckpt_every: {every}, keep_checkpoints: 0, out_dir: {out}, progress: false, device: cpu}}
recipe: {{name: classify, lr: {lr}, batch_size: {batch}, loss: ce, warmup_steps: {warmup}, weight_decay: 0.0,
          augment: false}}
model: {{name: pit, image_size: {size}, num_classes: 2, patch: 4, stride: 2, base_dims: {dims}, depth: {depth},
         heads: {heads}, seed: {seed}}}
data: {{name: capsule_red_lesions, num_images: {n}, image_size: {size}, difficulty: {difficulty}, flip_fraction: {flip},
       seed: {seed}}}
"""


def _pit_args(args) -> dict:
    return {"image_size": args.img_size, "num_classes": 2, "patch": 4, "stride": 2, "base_dims": [8, 8, 8],
            "depth": [1, 1, 1], "heads": [1, 2, 2], "seed": args.seed}


def _last_block(model) -> str:
    return f"stages.{len(model.stages) - 1}.{len(model.stages[-1]) - 1}.mlp.*"


def image_case(args) -> dict:
    """Mislabel detection on capsule_red_lesions (``--flip`` of the training labels flipped, seeded) with a small
    PiT trained by the ``classify`` recipe through ``plait run`` (checkpoints every ``--img-steps``/``--img-ckpts``
    steps, all kept), then ``plait attribute RUN estimator=tracin`` exact (k = 0) and projected (k =
    ``--img-k``), and EK-FAC self-influence on the head and the last block's MLP at the final checkpoint, against
    the final training loss; seconds and RSS per estimator. Then the retraining correlation (`image_lds`)."""
    import contextlib
    import tempfile
    from pathlib import Path

    from safetensors.torch import load_file

    from plait.checkpoint import Checkpointer
    from plait.cli import main as plait_main
    from plait.plugins.capsule.lesions import make_red_lesions
    from plait.plugins.capsule.pit import build_pit, count_parameters
    from plait.plugins.sam_if.attribute import recall_at, roc_auc
    from plait.plugins.sam_if.ekfac import EKFACEstimator

    tmp = Path(tempfile.mkdtemp(prefix="plait-attr-img-"))
    pit = _pit_args(args)
    cfg = tmp / "run.yaml"
    every = max(1, args.img_steps // args.img_ckpts)
    cfg.write_text(IMAGE_RUN.format(seed=args.seed, steps=args.img_steps, every=every,
                                    out=tmp / "runs", lr=args.img_lr, batch=32, warmup=max(1, args.img_steps // 10),
                                    size=args.img_size, dims=pit["base_dims"], depth=pit["depth"],
                                    heads=pit["heads"], n=args.img_n, flip=args.flip,
                                    difficulty=args.img_difficulty))
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # plait run's summary table: progress, not the JSON
        if plait_main(["run", str(cfg)]) != 0:
            raise RuntimeError("plait run of the image case failed")
    train_s = time.perf_counter() - t0
    (run_dir,) = (tmp / "runs" / "mislabel").iterdir()
    data = make_red_lesions(num_images=args.img_n, image_size=args.img_size, difficulty=args.img_difficulty,
                            flip_fraction=args.flip, seed=args.seed)
    n = len(data.train.y)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[data.flipped] = True
    out = {"model": "pit", "pit": pit, "run_dir": str(run_dir), "n_train": n, "flipped": int(flipped.sum()),
           "image_size": args.img_size, "difficulty": args.img_difficulty, "steps": args.img_steps,
           "train_seconds": round(train_s, 1),
           "estimators": {}}
    summary = json.loads((run_dir / "summary.json").read_text())
    out["eval_balanced_accuracy"] = summary.get("final_eval", {}).get("eval/balanced_accuracy")

    def entry(score, seconds, mem, pairs, extra=None):
        return {"auc": round(roc_auc(score, flipped), 4), "recall_at_10pct": round(recall_at(score, flipped), 4),
                "seconds": round(seconds, 3), "seconds_per_1000_pairs": round(1000 * seconds / pairs, 3),
                "peak_rss_mb": mem.peak_mb, "rss_increase_mb": mem.increase_mb,
                "rss_increase_mb_per_1000_pairs": round(1000 * mem.increase_mb / pairs, 2), **(extra or {})}
    train_loss = None
    block = _last_block(build_pit(**pit))
    # the whole model (exact, projected) and EK-FAC's subset (the head and the last block's MLP), exact
    for label, k, params in (("tracin_exact", 0, []), (f"tracin_k{args.img_k}", args.img_k, []),
                             ("tracin_head_block", 0, [f"params=[head.*,{block}]"])):
        with contextlib.redirect_stdout(sys.stderr), PeakRSS() as mem:
            if plait_main(["attribute", str(run_dir), "estimator=tracin", f"k={k}", f"seed={args.seed}",
                           *params]) != 0:
                raise RuntimeError(f"plait attribute ({label}) failed")
        att = run_dir / "attribution" / "tracin"
        report = json.loads((att / "report.json").read_text())
        scores = load_file(str(att / "scores.safetensors"))
        train_loss = scores["train_loss"]
        out["estimators"][label] = entry(scores["self_influence"], report["seconds"], mem, n,
                                         {"k": report["info"]["k"], "d": report["info"]["d"],
                                          "checkpoints": len(report["checkpoints"])})
        log(f"[image] {label}: {out['estimators'][label]}")
    out["estimators"]["training_loss"] = {"auc": round(roc_auc(train_loss, flipped), 4),
                                          "recall_at_10pct": round(recall_at(train_loss, flipped), 4)}
    # EK-FAC on the final weights: the head and the last transformer block's MLP
    model = build_pit(**pit)
    out["params"] = count_parameters(model)
    model.load_state_dict(Checkpointer.load(Checkpointer(run_dir / "checkpoints").complete()[-1])[1]["task"]["model"])
    model.eval()
    mean = data.train.x.mean((0, 2, 3), keepdim=True)
    std = data.train.x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    X = (data.train.x - mean) / std
    params = ["head", _last_block(model)]
    est = EKFACEstimator(params=params, damping_ratio=0.1, loss="ce", batch_size=64)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        si = est.self_influence(model, (X, data.train.y)).detach()
        sec = time.perf_counter() - t0
    out["estimators"]["ekfac"] = entry(si, sec, mem, n, {"params": params, "damping_ratio": 0.1})
    log(f"[image] ekfac: {out['estimators']['ekfac']}")
    Xt = (data.test.x - mean) / std
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        s = est.scores(model, (X, data.train.y), (Xt, data.test.y))
        sec = time.perf_counter() - t0
    out["ekfac_train_x_test"] = {"pairs": int(s.numel()), "seconds": round(sec, 3),
                                 "seconds_per_1000_pairs": round(1000 * sec / s.numel(), 4),
                                 "rss_increase_mb": mem.increase_mb}
    out["lds"] = image_lds(args, data) if args.lds_subsets > 0 else {"skipped": "--lds-subsets 0"}
    return out


def image_lds(args, data) -> dict:
    """Retraining correlation (the linear datamodeling score of TRAK, Park et al. 2023) on the image case:
    ``--lds-subsets`` random halves S of the training set (seeded; no selection by any score), a PiT retrained
    on each by the same hand loop (init, batch generator, AdamW at a constant lr, standardised inputs, CE; the
    loop mirrors the classify recipe's objective without its warm-up/cosine schedule) as the full model whose
    checkpoints are scored. Per test example t: Spearman over the subsets between Σ_{j∈S} τ(j, t) (τ > 0: j
    lowers t's loss) and −loss_t(model trained on S); the LDS is the mean over test examples."""
    from scipy.stats import spearmanr

    from plait.plugins.capsule.pit import build_pit
    from plait.plugins.sam_if.ekfac import EKFACEstimator
    from plait.plugins.sam_if.projected import Checkpoint, CheckpointTracIn

    pit = _pit_args(args)
    n_all = len(data.train.y)
    n = min(args.lds_n or n_all, n_all)
    mean = data.train.x.mean((0, 2, 3), keepdim=True)
    std = data.train.x.std((0, 2, 3), keepdim=True).clamp_min(1e-6)
    X, y = ((data.train.x - mean) / std)[:n], data.train.y[:n]
    nt = min(args.lds_test, len(data.test.y))
    Xt, yt = ((data.test.x - mean) / std)[:nt], data.test.y[:nt]
    steps, every = args.lds_steps, max(1, args.lds_steps // args.img_ckpts)

    def train(keep, record=False):
        model = build_pit(**pit)
        opt = torch.optim.AdamW(model.parameters(), lr=args.img_lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(args.seed)
        keep_t = torch.as_tensor(keep, dtype=torch.long)
        cks = []
        for step in range(1, steps + 1):
            idx = keep_t[torch.randint(len(keep_t), (32,), generator=gen)]
            loss = torch.nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if record and step % every == 0:
                names = {id(p): nm for nm, p in model.named_parameters()}
                sq = {names[id(p)]: st["exp_avg_sq"].clone() for p, st in opt.state.items()}
                cks.append(Checkpoint(state={k: v.detach().clone() for k, v in model.state_dict().items()},
                                      lr=args.img_lr, steps=every, optimizer="adamw", exp_avg_sq=sq,
                                      adam_step=step))
        model.eval()
        return model, cks

    def test_losses(model):
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(model(Xt), yt, reduction="none").double()
    t0 = time.perf_counter()
    model, cks = train(list(range(n)), record=True)
    full_s = time.perf_counter() - t0
    preds = {}
    est = CheckpointTracIn(k=args.img_k, projection="rademacher", seed=args.seed, batch_size=64)
    t0 = time.perf_counter()
    preds[f"tracin_k{args.img_k}"] = est.scores(
        model, cks, lambda m, i: torch.nn.functional.cross_entropy(m(X[i:i + 1]), y[i:i + 1]), n,
        lambda m, i: torch.nn.functional.cross_entropy(m(Xt[i:i + 1]), yt[i:i + 1]), nt).double()
    tracin_s = time.perf_counter() - t0
    model.load_state_dict(cks[-1].state)
    model.eval()
    t0 = time.perf_counter()
    # EK-FAC scores are −Δloss-like with Koh & Liang's sign (> 0: proponent), the same orientation as TracIn
    preds["ekfac"] = EKFACEstimator(params=["head", _last_block(model)], damping_ratio=0.1).scores(
        model, (X, y), (Xt, yt)).detach().double()
    ekfac_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(args.seed + 31)
    subsets = [torch.randperm(n, generator=g)[:n // 2].sort().values for _ in range(args.lds_subsets)]
    actual = []
    t0 = time.perf_counter()
    for i, S in enumerate(subsets):
        actual.append(test_losses(train(S.tolist())[0]))
        if i % 5 == 0:
            log(f"[image lds] retrain {i + 1}/{len(subsets)}")
    retrain_s = time.perf_counter() - t0
    actual_t = torch.stack(actual)  # [M, nt]
    out = {"n_train": n, "n_test": nt, "subsets": len(subsets), "subset_fraction": 0.5, "steps": steps,
           "full_train_seconds": round(full_s, 1), "retrain_seconds": round(retrain_s, 1),
           "score_seconds": {f"tracin_k{args.img_k}": round(tracin_s, 2), "ekfac": round(ekfac_s, 2)},
           "test_loss_std_across_subsets": round(float(actual_t.std(0).mean()), 4), "lds": {}}
    for name, tau in preds.items():
        pred = torch.stack([tau[S].sum(0) for S in subsets])  # [M, nt]
        rhos = [spearmanr(pred[:, t].numpy(), (-actual_t[:, t]).numpy()).statistic for t in range(nt)]
        rhos = [r for r in rhos if r == r]  # a constant column gives nan
        out["lds"][name] = round(float(sum(rhos) / max(1, len(rhos))), 4)
    log(f"[image lds] {out['lds']}")
    return out


# --quick (benchmarks/run_all.py): a smoke test of every case, not a measurement
QUICK = {"models": "lr", "n_train": 200, "n_test": 50, "loo": 20, "steps": 100, "check": 1, "check_steps": 300,
         "lm_n": 24, "lm_steps": 8, "lm_k": 256, "img_n": 60, "img_size": 16, "img_steps": 20, "img_k": 256,
         "lds_subsets": 4, "lds_steps": 20, "lds_test": 8}


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
    ap.add_argument("--case", default="tabular,lm,image",
                    help="comma list: tabular (digits, the SAM estimators), lm (tiny OPT), image (PiT, red lesions)")
    ap.add_argument("--quick", action="store_true", help="small sizes for every case (benchmarks/run_all.py)")
    ap.add_argument("--lm-n", type=int, default=200)
    ap.add_argument("--lm-steps", type=int, default=200)
    ap.add_argument("--lm-lr", type=float, default=1e-3)
    ap.add_argument("--lm-k", type=int, default=1024)
    ap.add_argument("--img-n", type=int, default=400, help="red-lesion images (train + test, 30 %% test)")
    ap.add_argument("--img-size", type=int, default=16)
    ap.add_argument("--img-difficulty", type=float, default=0.0, help="capsule_red_lesions difficulty (0: easy)")
    ap.add_argument("--img-steps", type=int, default=300)
    ap.add_argument("--img-ckpts", type=int, default=5, help="checkpoints over the run (all kept)")
    ap.add_argument("--img-lr", type=float, default=3e-3)
    ap.add_argument("--img-k", type=int, default=512)
    ap.add_argument("--lds-subsets", type=int, default=40, help="retrained random halves (0: no LDS)")
    ap.add_argument("--lds-n", type=int, default=0, help="training images of the LDS part (0: all)")
    ap.add_argument("--lds-steps", type=int, default=150)
    ap.add_argument("--lds-test", type=int, default=50)
    args = ap.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cases = args.case.split(",")
    unknown = sorted(set(cases) - {"tabular", "lm", "image"})
    if unknown:
        ap.error(f"--case: {', '.join(unknown)} unknown; allowed: tabular, lm, image")
    result = {"benchmark": "attribution", "torch": torch.__version__, "settings": vars(args),
              "load_average": list(__import__("os").getloadavg())}
    if "tabular" in cases:
        result["dataset"] = "digits"
        result["models"] = {}
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
    if "lm" in cases:
        result["lm"] = {"dataset": "synthetic_sentiment", **lm_case(args)}
    if "image" in cases:
        result["image"] = {"dataset": "capsule_red_lesions", **image_case(args)}
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
