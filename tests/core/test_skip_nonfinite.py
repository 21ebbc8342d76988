"""``run.on_nonfinite=skip`` keeps what a step consumed: the undone step's privacy release stays counted and the
batch generator moves on. References: the same run without the bad step (its ε, its batches)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.cli import main

DP = "grad_transform={name: flashdp, noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-3}"


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _run_dir(runs: Path, name: str) -> Path:
    (d,) = (runs / name).iterdir()
    return d


def test_a_skipped_private_step_stays_counted_by_the_accountant(tiny_config, fresh_host, monkeypatch):
    """sft + flashdp: step 3 reports NaN and is undone; the weights go back to step 2's, but the step sampled a
    batch and ran the Gaussian mechanism, so ε is that of 4 steps: the clean run's (before, the undo rolled the
    accountant back to 3 steps and under-reported ε)."""
    from plait.plugins.basics.sft_recipe import SFTRecipe

    fresh_host()
    cfg = str(tiny_config(steps=4))
    runs = Path(cfg).parent / "runs"
    assert main(["run", cfg, "run.name=clean", DP]) == 0
    real, seen = SFTRecipe.train_step, {}

    def train_step(self, step):
        out = real(self, step)
        seen[step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {**out, "train/loss": float("nan")} if step == 3 else out

    monkeypatch.setattr(SFTRecipe, "train_step", train_step)
    assert main(["run", cfg, "run.name=skip", "run.on_nonfinite=skip", DP]) == 0
    clean, skip = _summary(_run_dir(runs, "clean")), _summary(_run_dir(runs, "skip"))
    assert skip["skipped_steps"] == 1 and skip["privacy/steps"] == clean["privacy/steps"] == 4
    assert skip["privacy/epsilon"] == pytest.approx(clean["privacy/epsilon"], rel=1e-12)
    assert skip["privacy/epsilon"] > 0 and clean["privacy/epsilon"] < float("inf")


CLASSIFY = """
run: {{name: {name}, seed: 0, steps: 4, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false,
      device: cpu, on_nonfinite: skip}}
recipe: {{name: classify, lr: 1.0e-3, batch_size: 8}}
model: {{name: pit, image_size: 16, num_classes: 2, patch: 4, stride: 2, base_dims: [16, 16, 16], depth: [1, 2, 1],
        heads: [1, 2, 4]}}
data: {{name: capsule_red_lesions, num_images: 48, image_size: 16, seed: 0}}
"""


def test_a_skipped_step_does_not_draw_the_same_batch_again(tmp_path, fresh_host, monkeypatch):
    """classify draws its batches from its own generator; the undo restored it too, so every step after a bad
    batch drew that batch again (and was skipped again). Now the batches of a run with a skipped step are the
    batches of the clean run, step for step, and the step after the bad one trains."""
    from plait.plugins.capsule.classify_recipe import ClassifyRecipe

    fresh_host()
    real_idx, real_step = ClassifyRecipe.batch_indices, ClassifyRecipe.train_step
    drawn: dict[str, list] = {"clean": [], "skip": []}
    current = {"name": "clean"}

    def batch_indices(self, step, micro):
        idx = real_idx(self, step, micro)
        drawn[current["name"]].append(list(idx))
        return idx

    def train_step(self, step):
        out = real_step(self, step)
        return {**out, "train/loss": float("nan")} if current["name"] == "skip" and step == 2 else out

    monkeypatch.setattr(ClassifyRecipe, "batch_indices", batch_indices)
    monkeypatch.setattr(ClassifyRecipe, "train_step", train_step)
    for name in ("clean", "skip"):
        current["name"] = name
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(CLASSIFY.format(name=name, out=tmp_path / "runs"))
        assert main(["run", str(cfg)]) == 0
    assert len(drawn["clean"]) == 4 and drawn["skip"] == drawn["clean"]
    assert drawn["clean"][2] != drawn["clean"][1]  # the check can fail: consecutive batches differ
    summary = _summary(_run_dir(tmp_path / "runs", "skip"))
    assert summary["skipped_steps"] == 1
