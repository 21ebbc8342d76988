"""The DistZO2 suite's shared multi-process launches and single-process references.

Starting ranks is what costs time here (each process imports torch and transformers), so the suite starts as
few as it can and checks many properties on each launch:

* ``pair``: one 2-rank launch (one gloo group) running, in order: a config that differs between the ranks
  (both exit 2), ``zo_ddp``, ``pertp``, ``pertp`` + ``zo2``, ``pertp`` + ``zo2`` + sliced upload, ``zo_ddp`` +
  ``zo2`` + sliced upload, ``pertp`` stopped after 4 steps and resumed, and last a run on a
  fresh group with ``parallel.timeout_s: 4`` whose rank 1 is stopped (SIGSTOP) at step 3;
* ``four``: one 4-rank launch running ``zo_2d``, ``zo_2d`` + ``zo2`` + sliced upload (k = 4), and last a ``zo_2d`` run
  whose rank 3 is killed (SIGKILL) at step 3;
* ``references``: the single-process ``zo`` run and the hand-written micro-batch oracle, in this process.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.plugins.distzo2.distzo2_launch import launch

STEPS = 10
HUNG_TIMEOUT_S = 4  # parallel.timeout_s of the run whose peer is stopped
CFG = """
run: {{name: ref, seed: 3, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out},
      progress: false, keep_checkpoints: 0}}
recipe: {{name: zo, batch_size: 4, eval_batch_size: 32, eval_examples: 4}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 16, n_eval: 4}}
perturbation: {{name: mezo, eps: 1.0e-3, lr: 2.0e-3, weight_decay: 0.01}}
parallel: {{name: pertp, timeout_s: 60}}
"""
ZO2 = ["offload.name=zo2", "offload.storage_dtype=fp32"]

# run indices in the launches' results
PAIR_RUNS = ("mismatch", "ddp", "pertp", "pertp_zo2", "pertp_sliced", "ddp_sliced", "part", "resumed", "hung")
FOUR_RUNS = ("twod", "twod_sliced", "killed")


def write_config(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cfg.yaml"
    path.write_text(CFG.format(steps=STEPS, out=root / "runs"))
    return path


def _check_codes(results, runs: tuple[str, ...], failing: dict[str, int]) -> None:
    """Each rank got through each of ``runs`` with exit code 0, or the code ``failing`` names for that run."""
    for r in results:
        assert r.result is not None, f"rank {r.rank} wrote nothing:\n{r.stderr[-3000:]}"
        assert len(r.result["codes"]) == len(runs), f"rank {r.rank}:\n{r.stderr[-3000:]}"
        for name, code in zip(runs, r.result["codes"]):
            assert code == failing.get(name, 0), f"rank {r.rank}, run {name}: exit {code}\n{r.stderr[-3000:]}"


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    cfg = str(write_config(root))
    runs = [
        {"argv": [cfg, "run.name=mismatch"], "rank_argv": {"1": ["perturbation.lr=5e-3"]}},
        {"argv": [cfg, "run.name=ddp", "parallel.name=zo_ddp"]},
        {"argv": [cfg, "run.name=pertp"]},
        {"argv": [cfg, "run.name=pertp_zo2", *ZO2]},
        {"argv": [cfg, "run.name=pertp_sliced", *ZO2, "parallel.sliced_upload=true"]},
        {"argv": [cfg, "run.name=ddp_sliced", "parallel.name=zo_ddp", *ZO2, "parallel.sliced_upload=true"]},
        {"argv": [cfg, "run.name=part", "run.steps=4"]},
        {"argv": [cfg, "run.name=part"], "resume": [str(root / "runs"), "part"]},
        {"argv": [cfg, "run.name=hung", "run.steps=8", f"parallel.timeout_s={HUNG_TIMEOUT_S}"], "own_group": False,
         "kill": {"rank": 1, "step": 3, "signal": "STOP"}},
    ]
    out = root / "launch"
    results = launch(2, {"own_group": True, "runs": runs}, out, timeout=400, wait_ranks=[0])
    _check_codes(results[:1], PAIR_RUNS, {"mismatch": 2, "hung": 3})
    _check_codes(results[1:], PAIR_RUNS[:-1], {"mismatch": 2})  # rank 1 was stopped in the last run
    return root, results


@pytest.fixture(scope="session")
def four(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    cfg = str(write_config(root))
    runs = [
        {"argv": [cfg, "run.name=twod", "parallel.name=zo_2d"]},
        {"argv": [cfg, "run.name=twod_sliced", "parallel.name=zo_2d", *ZO2, "parallel.sliced_upload=true"]},
        {"argv": [cfg, "run.name=killed", "parallel.name=zo_2d", "run.steps=8"],
         "kill": {"rank": 3, "step": 3, "signal": "KILL"}},
    ]
    results = launch(4, {"own_group": True, "runs": runs}, root / "launch", timeout=400)
    _check_codes(results[:3], FOUR_RUNS, {"killed": 3})
    _check_codes(results[3:], FOUR_RUNS[:-1], {})  # rank 3 was killed in the last run
    return root, results


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """The single-process zo run (same config, no parallel section) and the 2-micro-batch oracle."""
    from plait import manager
    from plait.config import load_config
    from plait.run import execute

    root = tmp_path_factory.mktemp("refs")
    cfg = write_config(root)
    manager.reset_host()
    single = execute(load_config(cfg, ["~parallel", "run.name=single"]))
    return single.dir, oracle(cfg, 2, root / "oracle")


def oracle(cfg_path: Path, groups: int, out: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Plain MeZO on one process: +εz, f⁺ of each micro-batch, -2εz, f⁻ of each, +εz; g = Σ_d g_d / groups."""
    from plait import manager
    from plait.config import load_config
    from plait.plugins.basics.data import collate
    from plait.plugins.zo2.mezo import lm_loss, param_table, step_seed
    from plait.run import compose

    manager.reset_host()
    cfg = load_config(cfg_path, ["~parallel", f"run.out_dir={out}", "run.name=oracle"])
    run = compose(cfg)
    rec = run.build("recipe", run=run)
    run.logger.close()
    model, mezo, eps = rec.engine.model, rec.mezo, rec.mezo.eps
    params = param_table(model, mezo.no_decay)

    def shift(seed: int, alpha: float) -> None:
        for p in params:
            p.tensor.data.add_(mezo.z(p.tensor.data, p.index, seed, 0), alpha=alpha)

    def loss(b) -> float:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        return float(lm_loss(logits, b["labels"]))

    rows = []
    with torch.no_grad():
        for step in range(1, STEPS + 1):
            idx = rec.order(step - 1)
            k = len(idx) // groups
            batches = [collate([rec.train_items[i] for i in idx[d * k:(d + 1) * k]], rec.tokenizer.pad_token_id)
                       for d in range(groups)]
            seed, lr = step_seed(cfg.run.seed, step), mezo.lr_at(step, STEPS)
            shift(seed, eps)
            fp = [loss(b) for b in batches]
            shift(seed, -2 * eps)
            fm = [loss(b) for b in batches]
            shift(seed, eps)
            g, lp, lm = 0.0, 0.0, 0.0
            for d in range(groups):
                g += (fp[d] - fm[d]) / (2 * eps)
                lp += fp[d]
                lm += fm[d]
            g, lp, lm = g / groups, lp / groups, lm / groups
            for p in params:
                mezo.update(p, seed, [g], lr)
            rows.append({"train/loss": (lp + lm) / 2, "train/projected_grad": g, "train/lr": lr,
                         "train/skipped_steps": 0.0})
    return rows, {k: v.detach().clone() for k, v in model.state_dict().items()}
