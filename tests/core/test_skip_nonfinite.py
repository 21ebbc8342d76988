"""``run.on_nonfinite=skip`` keeps what a step consumed: the undone step's privacy release stays counted, the batch
generator moves on, and the zo recipe (whose engines skip a non-finite projected gradient themselves) keeps no
copy of the model per step. References: the same run without the bad step (its ε, its batches) and the weights
of the step before."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.cli import main
from plait.config import load_config
from plait.run import execute

DP = "grad_transform={name: flashdp, noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-3}"


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _run_dir(runs: Path, name: str) -> Path:
    (d,) = (runs / name).iterdir()
    return d


def test_a_skipped_private_step_stays_counted_by_the_accountant(tiny_config, fresh_host, monkeypatch):
    """sft + flashdp: step 3 reports NaN and is undone (the weights going back: test_run), but the step sampled a
    batch and ran the Gaussian mechanism, so ε is that of 4 steps: the clean run's (before, the undo rolled the
    accountant back to 3 steps and under-reported ε)."""
    from plait.plugins.basics.sft_recipe import SFTRecipe

    fresh_host()
    cfg = str(tiny_config(steps=4))
    runs = Path(cfg).parent / "runs"
    assert main(["run", cfg, "run.name=clean", DP]) == 0
    real = SFTRecipe.train_step

    def train_step(self, step):
        out = real(self, step)
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


CFG_ZO = """
run: {{name: {name}, seed: 1, steps: 4, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false,
      on_nonfinite: skip}}
recipe: {{name: zo, batch_size: 4, eval_batch_size: 32}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 16, n_eval: 8}}
perturbation: {{name: mezo, eps: 1.0e-3, lr: 1.0e-3}}
"""


@pytest.mark.parametrize("engine", [["offload={name: none}"], ["offload={name: zo2, storage_dtype: model}"],
                                    ["offload={name: zo2, storage_dtype: model, disk_dir: run}"]],
                         ids=["in_place", "zo2_host", "zo2_disk"])
def test_zo_skips_a_nonfinite_step_without_copying_the_model(tmp_path, fresh_host, monkeypatch, engine):
    """A NaN loss inside the engine's forward makes the projected gradient NaN; the engine applies no update (the
    shifts ±εz return θ up to rounding), train_loop makes no state copy (it would fail here), and the DP-ZO
    accountant counts the step (ε of 4 steps, as the clean run's)."""
    import plait.plugins.flashdp.dp_zo as dp_zo
    import plait.run as run_mod
    from plait.plugins.zo2 import fused, mezo
    from plait.plugins.zo2.zo_recipe import ZORecipe

    fresh_host()
    dp = "grad_transform={name: dp_zo, noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-3}"
    real_losses, real_step = mezo.chunk_losses, ZORecipe.train_step
    bad, seen = {"on": False}, {}

    def chunk_losses(logits, labels, per_sample):
        loss, per = real_losses(logits, labels, per_sample)
        if bad["on"]:
            return float("nan"), (per * float("nan") if per is not None else None)
        return loss, per

    def weights(self):
        self.engine.flush()  # the fused engine applies its update lazily
        return {k: v.detach().clone() for k, v in self.engine.state_dict().items()}

    def train_step(self, step):
        bad["on"] = self.run.cfg.run.name == "skip" and step == 3
        try:
            out = real_step(self, step)
        finally:
            bad["on"] = False
        seen[self.run.cfg.run.name, step] = weights(self)
        return out

    monkeypatch.setattr(dp_zo.secrets, "randbits", lambda bits: 222)  # the same Poisson batches in both runs
    monkeypatch.setattr(mezo, "chunk_losses", chunk_losses)
    monkeypatch.setattr(fused, "chunk_losses", chunk_losses)
    monkeypatch.setattr(ZORecipe, "train_step", train_step)
    runs = {}
    for name in ("clean", "skip"):
        if name == "skip":
            monkeypatch.setattr(run_mod, "_clone_state", lambda state: pytest.fail("a state copy was made"))
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(CFG_ZO.format(name=name, out=tmp_path / "runs"))
        runs[name] = execute(load_config(cfg, [*engine, dp]))
    s2, s3 = seen["skip", 2], seen["skip", 3]
    moved = max(float((seen["clean", 3][k] - seen["clean", 2][k]).abs().max()) for k in s2)
    stayed = max(float((s3[k] - s2[k]).abs().max()) for k in s2)
    assert stayed < 1e-6 < moved, (stayed, moved)  # the ±εz shifts round; an update moves far more
    assert max(float((seen["skip", 4][k] - s3[k]).abs().max()) for k in s2) > 1e-6  # and training goes on
    skip, clean = runs["skip"].summary, runs["clean"].summary
    assert skip["skipped_steps"] == 1 and skip["privacy/steps"] == clean["privacy/steps"] == 4
    assert skip["privacy/epsilon"] == pytest.approx(clean["privacy/epsilon"], rel=1e-12)
