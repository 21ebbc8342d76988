"""Evaluation split across ranks under ``parallel: {name: ddp}``: each of 2 gloo ranks evaluates its share of the
eval set (shares that partition it, both non-empty, the set's size odd) and the reduced metrics equal the plain
single-process run's (the reference: the same config without ``parallel:``) within 1e-6, before training (step 0)
and after 3 steps, on every rank:

* sft — token-weighted ``eval/loss`` (Σ NLL / Σ completion tokens over ranks) and label-word ``eval/accuracy``
  (Σ correct / Σ examples), in whole eval batches;
* classify — predictions gathered, so ``eval/balanced_accuracy``, ``eval/mcc``, ``eval/macro_f1`` (not sums over
  examples) are computed on the whole set;
* sam_train — summed cross-entropy and correct counts.

Only rank 0 writes: each evaluation appears once in metrics.jsonl."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.plugins.parallel._runs import config_file, launch_ranks, run_overrides

HELPER = Path(__file__).with_name("_eval_rank.py")
RUN = run_overrides(1, 3)
CONFIGS = {
    "sft": ("""recipe: {name: sft, batch_size: 4, optimizer: sgd, lr: 0.5, eval_batch_size: 2}
model: {name: hf_causal_lm, arch: opt, size: tiny, config: {dropout: 0.0, attention_dropout: 0.0}}
data: {name: synthetic_sentiment, n_train: 16, n_eval: 7}
""", []),
    # 3 steps of plain CE without warm-up: the tiny PiT predicts a mix of classes (at init, and with the default
    # inverse-frequency weights, it predicts one class, which would make MCC / balanced accuracy trivial)
    "classify": (None, ["data.num_images=124", "data.min_per_class=3", "recipe.batch_size=8",
                        "model.base_dims=[8,8,8]", "model.heads=[1,1,2]", "recipe.augment=false", "recipe.loss=ce",
                        "recipe.warmup_steps=0", "recipe.lr=3.0e-3"]),
    "sam_train": ("""recipe: {name: sam_train, rho: 0.1, lr: 0.5, l2: 1.0e-2, batch_size: 8}
model: {name: tabular_mlp, num_features: 64, num_classes: 10, hidden: [8]}
data: {name: digits, n_train: 64, n_test: 31, seed: 0}
""", []),
}
METRICS = {"sft": {"eval/loss", "eval/accuracy"}, "sam_train": {"eval/loss", "eval/accuracy"},
           "classify": {"eval/accuracy", "eval/balanced_accuracy", "eval/mcc", "eval/macro_f1"}}


def _launch(root: Path, recipe: str, nproc: int) -> Path:
    text, extra = CONFIGS[recipe]
    cfg = config_file(root, text)
    launch_ranks(HELPER, [str(root), str(cfg), *RUN, *extra, f"run.out_dir={root / 'runs'}"], nproc)
    return root


def _close(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 * max(abs(a), 1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(CONFIGS))
def test_two_rank_evaluation_equals_one_process(tmp_path, recipe):
    one = torch.load(_launch(tmp_path / "one", recipe, 1) / "eval0.pt")
    two = _launch(tmp_path / "two", recipe, 2)
    r0, r1 = torch.load(two / "eval0.pt"), torch.load(two / "eval1.pt")
    # the split: every evaluation call handed the two ranks complementary, non-empty shares of an odd-sized set
    assert one["shares"] == [] and r0["shares"] and len(r0["shares"]) == len(r1["shares"])
    for (n, lo0, hi0), (m, lo1, hi1) in zip(r0["shares"], r1["shares"]):
        assert n == m and lo0 == 0 and hi0 == lo1 and hi1 == n and 0 < hi0 < n, (n, lo0, hi0, lo1, hi1)
    assert any(n % 2 for n, _, _ in r0["shares"])
    for when in ("first_eval", "final_eval"):
        ref = one[when]
        assert METRICS[recipe] <= set(ref) and set(ref) == set(r0[when]) == set(r1[when])
        assert r0[when] == r1[when]  # every rank holds the reduced value
        for k, v in ref.items():
            assert _close(v, r0[when][k]), (when, k, v, r0[when][k])
    assert one["first_eval"] != one["final_eval"]  # it trained between the two evaluations
    if recipe == "classify":
        assert one["final_eval"]["eval/mcc"] != 0.0  # not one class for every image
    (run_dir,) = list((two / "runs" / "r").iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    key = sorted(METRICS[recipe])[0]
    assert [r["step"] for r in rows if key in r] == [0, 3]  # written once (rank 0), not once per rank
