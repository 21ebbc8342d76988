"""sft's logged train/loss: the window mean of the per-step losses of the steps that saw at least one sample."""
from __future__ import annotations

import json

import pytest
import torch

from plait.config import load_config
from plait.plugins.basics import sft_recipe
from plait.plugins.flashdp.transform import FlashDP
from plait.run import execute

CFG = """
run: {{name: e, seed: 1, steps: 4, log_every: 2, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false}}
recipe: {{name: sft, lr: 1.0e-3, batch_size: 1, eval_batch_size: 8}}
model: {{name: hf_causal_lm, arch: gpt2, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 8, n_eval: 2}}
grad_transform: {{name: flashdp, noise_multiplier: 0.0, allow_no_privacy: true, delta: 1.0e-3,
                 reproducible_noise: true}}
"""


def test_empty_poisson_batch_is_left_out_of_the_logged_loss(tmp_path, fresh_host, monkeypatch):
    # Poisson sampling at q = 1/8 over 8 examples: with run.seed 1 (reproducible_noise) step 2 draws no example.
    # Its loss is undefined; logging 0.0 would halve the mean of its window.
    probe = FlashDP("per_layer", 1.0, {}, 0.0, None, 1e-3, [], "freeze", True, True, "opacus",
                    reproducible_noise=True)
    probe.prepare(torch.nn.Linear(2, 2), dataset_size=8, batch_size=1, steps=4, seed=1)
    sizes = {step: len(probe.batch_indices(step)) for step in range(1, 5)}
    windows = [(1, 2), (3, 4)]
    assert any(sizes[s] == 0 for s in sizes) and all(any(sizes[s] for s in w) for w in windows), sizes

    seen = []  # each non-empty step's mean per-sample loss, in step order
    original = sft_recipe.sample_losses

    def recording(model, batch):
        losses = original(model, batch)
        seen.append(float(losses.detach().mean()))
        return losses

    monkeypatch.setattr(sft_recipe, "sample_losses", recording)
    fresh_host()
    (tmp_path / "c.yaml").write_text(CFG.format(out=tmp_path / "runs"))
    run = execute(load_config(tmp_path / "c.yaml"))
    step_loss = dict(zip([s for s in sorted(sizes) if sizes[s]], seen))
    assert len(seen) == len(step_loss)
    rows = {r["step"]: r for r in map(json.loads, (run.dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}
    for w in windows:
        losses = [step_loss[s] for s in w if s in step_loss]
        assert rows[w[-1]]["train/loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-12), (w, sizes)
