"""Length predictors (`predictor.py`): metrics against hand-computed values and scipy, the baselines against
numpy, the MLP learning a synthetic prompt -> length relation, state round trips, and the ``grpo`` recipe
logging ``predictor/smape`` / ``predictor/kendall_tau`` with a resumable predictor."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau as scipy_kendalltau

from plait.plugins.infinite_sampling.predictor import (
    ConstantPredictor,
    LengthPredictor,
    RunningMeanPredictor,
    build_predictor,
    kendall_tau,
    smape,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --------------------------------------------------------------------------------------------------- metrics
def test_smape_hand_computed():
    # |1-2|*2/3 = 2/3; |4-4| = 0; both zero -> 0; |0-5|*2/5 = 2  -> mean (2/3 + 0 + 0 + 2) / 4
    assert smape([1, 4, 0, 0], [2, 4, 0, 5]) == pytest.approx((2 / 3 + 2) / 4)
    assert smape([3.0], [3.0]) == 0.0
    with pytest.raises(ValueError):
        smape([1, 2], [1])


def test_smape_random_matches_loop():
    rng = np.random.default_rng(0)
    p, t = rng.integers(0, 6, 200).astype(float), rng.integers(0, 6, 200).astype(float)
    ref = sum(0.0 if a == b == 0 else 2 * abs(a - b) / (abs(a) + abs(b)) for a, b in zip(p, t)) / len(p)
    assert smape(p, t) == pytest.approx(ref)


def test_kendall_tau_hand_computed():
    assert kendall_tau([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # x = [1, 2, 2, 3], y = [1, 3, 2, 3]: pairs (01)+ (02)+ (03)+ (12)x-tie (13)y-tie (23)+ -> C=4, D=0;
    # n0 = 6, n1 = 1 (x tie), n2 = 1 (y tie): tau_b = 4 / sqrt(5 * 5) = 0.8
    assert kendall_tau([1, 2, 2, 3], [1, 3, 2, 3]) == pytest.approx(0.8)
    assert math.isnan(kendall_tau([2, 2, 2], [1, 2, 3]))  # constant predictions: undefined, as scipy
    assert math.isnan(kendall_tau([1], [1]))


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    x = rng.integers(0, 5, n).astype(float)  # many ties on both sides
    y = x + rng.integers(-2, 3, n)
    ref = scipy_kendalltau(x, y, variant="b").statistic
    assert kendall_tau(x, y) == pytest.approx(ref, abs=1e-12)


# --------------------------------------------------------------------------------------------------- baselines
def test_constant_and_running_mean():
    c = ConstantPredictor(7)
    assert c.predict([1, 2]) == 7.0 and c(0, 3, [5]) == 7.0
    rm = RunningMeanPredictor(initial=3.0)
    assert rm.predict([1]) == 3.0
    rng = np.random.default_rng(1)
    seen = []
    for _ in range(5):
        batch = rng.integers(1, 30, int(rng.integers(1, 10))).tolist()
        rm.update([[1]] * len(batch), [[]] * len(batch), batch)
        seen += batch
        assert rm.predict([9, 9], [4]) == pytest.approx(np.mean(seen))
    rm2 = RunningMeanPredictor()
    rm2.load_state_dict(rm.state_dict())
    assert rm2.predict([1]) == rm.predict([1])
    assert build_predictor("none") is None
    with pytest.raises(ValueError):
        build_predictor("oracle")


# --------------------------------------------------------------------------------------------------- mlp
def _synthetic(rng, n):
    """Length set by the first prompt token (0..4 -> 2, 4, 8, 16, 32); the rest of the prompt is noise."""
    lengths_of = [2, 4, 8, 16, 32]
    prompts, lengths = [], []
    for _ in range(n):
        k = int(rng.integers(0, 5))
        prompts.append([k] + rng.integers(10, 60, int(rng.integers(1, 5))).tolist())
        lengths.append(lengths_of[k] + int(rng.integers(0, 2)))
    return prompts, lengths


def test_mlp_learns_synthetic_relation_better_than_baselines():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mlp, const, rm = LengthPredictor(seed=0), ConstantPredictor(16.0), RunningMeanPredictor(16.0)
    for _ in range(60):  # online: one batch per "step"
        prompts, lengths = _synthetic(rng, 32)
        for pred in (mlp, rm):
            pred.update(prompts, [[] for _ in prompts], lengths)
    prompts, lengths = _synthetic(rng, 256)
    scores = {name: smape(p.predict_batch(prompts), lengths) for name, p in
              (("mlp", mlp), ("constant", const), ("running_mean", rm))}
    assert scores["mlp"] < 0.25, scores
    assert scores["mlp"] < 0.5 * min(scores["constant"], scores["running_mean"]), scores
    assert kendall_tau(mlp.predict_batch(prompts), lengths) > 0.8


def test_mlp_prefix_is_cut_to_k_and_state_round_trip():
    rng = np.random.default_rng(3)
    a = LengthPredictor(prefix_tokens=2, seed=1)
    prompts, lengths = _synthetic(rng, 16)
    prefixes = [rng.integers(0, 60, 4).tolist() for _ in prompts]
    a.update(prompts, prefixes, lengths)
    # only the first k=2 prefix tokens are seen
    assert a.predict(prompts[0], prefixes[0]) == a.predict(prompts[0], prefixes[0][:2] + [99, 98])
    b = LengthPredictor(prefix_tokens=2, seed=2)
    b.load_state_dict(a.state_dict())
    assert b.predict_batch(prompts, prefixes) == a.predict_batch(prompts, prefixes)
    # the optimizer state travels too: one more identical update keeps them equal
    a.update(prompts, prefixes, lengths)
    b.update(prompts, prefixes, lengths)
    assert b.predict_batch(prompts, prefixes) == a.predict_batch(prompts, prefixes)
    c = LengthPredictor(seed=1)
    assert LengthPredictor(seed=1).predict([1, 2]) == c.predict([1, 2])  # seeded init


# --------------------------------------------------------------------------------------------------- recipe
CFG = """
run: {{name: p, seed: 0, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: 1, out_dir: {out},
      progress: false, keep_checkpoints: 0, device: cpu}}
recipe:
  name: grpo
  group_size: 4
  prompts_per_step: 4
  max_new_tokens: 3
  predictor: {predictor}
model: {{name: hf_causal_lm, path: "bundled:tiny-opt-base"}}
data: {{name: addition}}
sampler: {{name: length_aware, g: 4}}
"""


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("predictor,options", [
    ("mlp", ()), ("running_mean", ()),
    # partial decode (probe 1 token, predict the rest) + loss micro-batches + cosine LR, resumed exactly
    ("mlp", ("sampler.prefix_tokens=1", "recipe.micro_batch_size=5", "recipe.schedule=cosine")),
], ids=["mlp", "running_mean", "mlp-prefix-microbatch"])
def test_recipe_logs_predictor_metrics_and_resumes(tmp_path, fresh_host, one_thread, predictor, options):
    from plait.config import load_config
    from plait.run import execute

    fresh_host()

    def cfg(steps, name, extra=()):
        p = tmp_path / f"{name}-{steps}.yaml"
        p.write_text(CFG.format(steps=steps, out=tmp_path / "runs", predictor=predictor))
        return load_config(p, [f"run.name={name}", *options, *extra])

    full = execute(cfg(3, "full"))
    rows = [r for r in _rows(full.dir) if "train/loss" in r]
    assert len(rows) == 3
    for r in rows:
        assert 0.0 <= r["predictor/smape"] <= 2.0
        assert "predictor/kendall_tau" in r
        assert ("perf/probe_steps" in r) == bool(options)
    part = execute(cfg(2, "part"))
    resumed = execute(cfg(3, "part", [f"run.resume={part.dir}"]))
    key = lambda rows: [(r["predictor/smape"], r["train/loss"]) for r in rows if "train/loss" in r]  # noqa: E731
    assert key(_rows(resumed.dir)) == key(_rows(full.dir))


def test_recipe_rejects_unknown_predictor(tmp_path, fresh_host, capsys):
    from plait.cli import main

    fresh_host()
    p = tmp_path / "c.yaml"
    p.write_text(CFG.format(steps=1, out=tmp_path / "runs", predictor="oracle"))
    assert main(["run", str(p)]) == 2
    assert "recipe.predictor" in capsys.readouterr().err
