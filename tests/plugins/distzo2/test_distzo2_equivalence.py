"""DistZO2 over gloo equals the single-process zo recipe: losses, projected gradients and parameters for 10 steps.

References, computed in this process:
* ``pertp`` (2 ranks) must equal the single-process ``zo`` run on the same batch, bit for bit (both with the
  in-place engine and with the streamed ``zo2`` engine);
* ``zo_ddp`` (2 ranks) and ``2d`` (4 ranks = 2 pairs × 2 groups) must equal a hand-written MeZO loop that
  evaluates the two micro-batches at each perturbed point and averages g over them (``oracle``).
Also: identical parameter hashes on every rank after every step, exactly one collective per step (an
all-gather of the rank's chunk losses, float64), only rank 0 writes, and a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distzo2_launch import launch

STEPS = 10
CFG = """
run: {{name: ref, seed: 3, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out},
      progress: false, keep_checkpoints: 0}}
recipe: {{name: zo, batch_size: 4, eval_batch_size: 32, eval_examples: 4}}
model: {{name: hf-causal-lm, arch: opt, size: tiny}}
data: {{name: synthetic-sentiment, n_train: 16, n_eval: 4}}
perturbation: {{name: mezo, eps: 1.0e-3, lr: 2.0e-3, weight_decay: 0.01}}
parallel: {{name: pertp, timeout_s: 60}}
"""
TRAIN_KEYS = ("train/loss", "train/projected_grad", "train/lr", "train/skipped_steps")


def _config(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "cfg.yaml"
    path.write_text(CFG.format(steps=STEPS, out=root / "runs"))
    return path


def _run_dir(root: Path, name: str) -> Path:
    dirs = sorted((root / "runs" / name).iterdir())
    assert len(dirs) == 1, f"expected one run directory for {name}, found {dirs}"  # ranks > 0 write nothing
    return dirs[0]


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    ck = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"
    return {k[len("task/model/"):]: v for k, v in load_file(str(ck)).items() if k.startswith("task/model/")}


def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in TRAIN_KEYS if k in r} for r in rows if "train/loss" in r]


def _records(result: dict, run: int) -> list[dict]:
    return [{k: r[k] for k in TRAIN_KEYS if k in r} for r in result["steps"][run]]


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


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """One 2-rank launch (one gloo group) running zo_ddp, pertp, pertp + zo2, and pertp stopped then resumed."""
    root = tmp_path_factory.mktemp("pair")
    cfg = str(_config(root))
    runs = [
        {"argv": [cfg, "run.name=ddp", "parallel.name=zo_ddp"]},
        {"argv": [cfg, "run.name=pertp"]},
        {"argv": [cfg, "run.name=pertp_zo2", "offload.name=zo2", "offload.storage_dtype=fp32"]},
        {"argv": [cfg, "run.name=part", "run.steps=4"]},
        {"argv": [cfg, "run.name=part"], "resume": [str(root / "runs"), "part"]},
    ]
    results = launch(2, {"own_group": True, "runs": runs}, root / "launch")
    for r in results:
        assert r.rc == 0, f"rank {r.rank} exited {r.rc}:\n{r.stderr[-3000:]}"
    return root, results


@pytest.fixture(scope="module")
def references(pair):
    """The single-process zo run (same config, no parallel section) and the 2-micro-batch oracle."""
    from plait import manager
    from plait.config import load_config
    from plait.run import execute

    root, _ = pair
    manager.reset_host()
    single = execute(load_config(root / "cfg.yaml", ["~parallel", "run.name=single"]))
    return single.dir, oracle(root / "cfg.yaml", 2, root / "oracle")


@pytest.mark.slow
def test_distzo2_pertp_equals_single_process(pair, references):
    root, results = pair
    single_dir, _ = references
    want_rows, want = _train_rows(single_dir), _final(single_dir)
    assert len(want_rows) == STEPS
    for run, name in ((1, "pertp"), (2, "pertp_zo2")):
        got_dir = _run_dir(root, name)
        assert _train_rows(got_dir) == want_rows, name  # losses, projected gradients, lr: bit for bit
        for r in results:
            assert _records(r.result, run) == want_rows, (name, r.rank)  # every rank computes the same numbers
        got = _final(got_dir)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), name


@pytest.mark.slow
def test_distzo2_zo_ddp_equals_mean_over_micro_batches(pair, references):
    root, results = pair
    _, (oracle_rows, oracle_params) = references
    assert _train_rows(_run_dir(root, "ddp")) == oracle_rows
    for r in results:
        assert _records(r.result, 0) == oracle_rows
    got = _final(_run_dir(root, "ddp"))
    assert all(torch.equal(got[k], oracle_params[k]) for k in oracle_params)
    # and zo_ddp is not pertp: the micro-batch split changes the numbers
    assert _train_rows(_run_dir(root, "ddp")) != _train_rows(_run_dir(root, "pertp"))


@pytest.mark.slow
def test_distzo2_parameter_hashes_identical_across_ranks(pair):
    _, results = pair
    for run in range(5):
        per_rank = [[s["hash"] for s in r.result["steps"][run]] for r in results]
        assert per_rank[0] and all(h == per_rank[0] for h in per_rank)
        assert len(set(per_rank[0])) == len(per_rank[0])  # the parameters change every step


@pytest.mark.slow
def test_distzo2_one_scalar_collective_per_step(pair):
    _, results = pair
    world = 2
    for r in results:
        log = r.result["collectives"]
        for run, n_local in ((0, 2), (1, 1), (2, 1)):  # zo_ddp: f⁺ and f⁻ per rank; pertp: one of them
            in_run = [c for c in log if c["run"] == run]
            steps = [c for c in in_run if c["step"] > 0]
            assert [c["step"] for c in steps] == list(range(1, STEPS + 1))  # exactly one per step
            # an all-gather of n_local float64 scalars: input tensor + world output parts
            assert all(c["op"] == "all_gather" and c["bytes"] == (1 + world) * n_local * 8 for c in steps)
            # outside the steps: start-up only (config digest, run directory, initial-parameter digest)
            assert [c["op"] for c in in_run if c["step"] == 0] == ["all_gather_object", "broadcast_object_list",
                                                                   "all_gather_object"]


@pytest.mark.slow
def test_distzo2_resume_equals_uninterrupted(pair):
    root, results = pair
    full, part = _run_dir(root, "pertp"), _run_dir(root, "part")
    assert _train_rows(part) == _train_rows(full)
    a, b = _final(full), _final(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [s["step"] for s in results[1].result["steps"][4]] == list(range(5, STEPS + 1))


@pytest.mark.slow
def test_distzo2_resume_with_another_world_size_is_one_line(pair, capsys):
    from plait import manager
    from plait.cli import main

    root, _ = pair
    manager.reset_host()
    code = main(["run", str(root / "cfg.yaml"), "~parallel", f"run.resume={_run_dir(root, 'part')}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "written by 2 process(es); resume with the same world size (this run has 1)" in err
    assert "\n" not in err


@pytest.mark.slow
def test_distzo2_2d_four_ranks_equals_oracle(tmp_path, references):
    _, (oracle_rows, oracle_params) = references
    cfg = str(_config(tmp_path))
    results = launch(4, {"own_group": True, "runs": [{"argv": [cfg, "run.name=twod", "parallel.name=2d"]}]},
                     tmp_path / "launch")
    for r in results:
        assert r.rc == 0, f"rank {r.rank} exited {r.rc}:\n{r.stderr[-3000:]}"
        assert _records(r.result, 0) == oracle_rows
        steps = [c for c in r.result["collectives"] if c["step"] > 0]
        assert [c["step"] for c in steps] == list(range(1, STEPS + 1))
        assert all(c["op"] == "all_gather" and c["bytes"] == (1 + 4) * 1 * 8 for c in steps)
    hashes = [[s["hash"] for s in r.result["steps"][0]] for r in results]
    assert all(h == hashes[0] for h in hashes)
    got = _final(_run_dir(tmp_path, "twod"))
    assert all(torch.equal(got[k], oracle_params[k]) for k in oracle_params)
