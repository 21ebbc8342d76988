"""``parallel: {name: ddp}`` on 2 gloo ranks (``plait run --nproc 2``) equals 1 process at the same global batch:
the logged losses within 1e-6 relative over 20 steps and the final parameters (rank 0's checkpoint) within 1e-6,
for sft (token-mean loss: the ranks' shares weighted by labelled tokens; grad_accum 2 and clipping), classify and
sam_train (SAM's ascent recomputed through the step's closure on both ranks). The reference is the plain
single-process run of the same config.

sft uses SGD: the attention key bias has an exactly-zero true gradient (softmax is shift-invariant), so its
gradient is pure rounding noise that Adam would normalise into ±lr steps on either side; SGD keeps it noise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from plait.config import load_config
from plait.run import execute
from tests.plugins.parallel._runs import CLASSIFY_PIT, final_tensors, losses, run_overrides

STEPS = 20
RUN = run_overrides(1, STEPS)
CONFIGS = {
    "sft": """recipe: {name: sft, batch_size: 4, grad_accum: 2, optimizer: sgd, momentum: 0.9, lr: 0.05, max_grad_norm: 1.0}
model: {name: hf_causal_lm, arch: opt, size: tiny, config: {dropout: 0.0, attention_dropout: 0.0}}
data: {name: synthetic_sentiment, n_train: 32, n_eval: 4}
""",
    "sam_train": """recipe: {name: sam_train, rho: 0.1, lr: 0.5, l2: 1.0e-2, batch_size: 8}
model: {name: tabular_mlp, num_features: 64, num_classes: 10, hidden: [8]}
data: {name: digits, n_train: 64, n_test: 30, seed: 0}
""",
}
CLASSIFY = ["data.num_images=120", "data.min_per_class=3", "recipe.batch_size=8", "model.base_dims=[8,8,8]",
            "model.heads=[1,1,2]",
            "recipe.augment=false"]  # augmentation draws per example from the recipe's generator: per rank


def _argv(root: Path, recipe: str) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    if recipe == "classify":
        path, extra = CLASSIFY_PIT, CLASSIFY
    else:
        path, extra = root / "cfg.yaml", []
        path.write_text(CONFIGS[recipe])
    return [str(path), *extra, *RUN, f"run.out_dir={root / 'runs'}"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sft", "classify", "sam_train"])
def test_two_ranks_equal_one_process(tmp_path, recipe):
    one_argv = _argv(tmp_path / "one", recipe)
    one = execute(load_config(one_argv[0], one_argv[1:]))
    two_argv = _argv(tmp_path / "two", recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "plait", "run", "--nproc", "2", *two_argv, "parallel.name=ddp",
                          "parallel.timeout_s=120"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (two_dir,) = list((tmp_path / "two" / "runs" / "r").iterdir())
    ref, got = losses(one.dir), losses(two_dir)
    assert len(ref) == len(got) == STEPS
    assert ref[0] != ref[-1]  # it trained
    for a, b in zip(ref, got):
        assert abs(a - b) <= 1e-6 * abs(a), (ref, got)
    a, b = final_tensors(one.dir), final_tensors(two_dir)
    assert a.keys() == b.keys() and a
    for k in a:
        if not a[k].is_floating_point():
            continue
        x, y = a[k], b[k]
        if k.endswith("in_proj_bias"):  # [q | k | v]: the key third's gradient is rounding noise (see top), and
            d = x.numel() // 3  # classify's AdamW turns noise into steps of at most ~lr each
            assert (x[d:2 * d] - y[d:2 * d]).abs().max() <= 2 * STEPS * 1e-3, k
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6, msg=k)
