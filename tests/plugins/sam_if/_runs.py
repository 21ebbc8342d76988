"""Runs and references shared by the sam_if attribution tests (not a test module: no ``test_`` prefix)."""
from __future__ import annotations

from pathlib import Path

import torch

from plait.cli import main

# sft of the tiny OPT, SGD with momentum 0.9 at lr 1e-2 (η = lr/(1 − μ) per one-step checkpoint interval)
SFT_RUN = """
run: {{name: a, seed: 0, steps: 3, log_every: 1, eval_every: 0, ckpt_every: {ckpt}, keep_checkpoints: {keep},
      out_dir: {out}, progress: false, device: cpu}}
recipe: {{name: sft, optimizer: sgd, momentum: 0.9, lr: 1.0e-2, batch_size: 4, eval_batch_size: 8,
          eval_examples: 4}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 12, n_eval: 4}}
{extra}
"""
SFT_ETA = 1e-2 / (1 - 0.9)


def rebuilt(run_dir: Path):
    """(recipe, config, components, host) of a finished run, rebuilt from its folder as ``plait attribute`` does."""
    from plait.config import load_config, validate
    from plait.manager import get_host
    from plait.plugins.sam_if.anyrun import _rebuild

    host = get_host()
    cfg = load_config(run_dir / "config.yaml")
    comps = validate(cfg, host.registries)
    return _rebuild(run_dir, cfg, comps, host), cfg, comps, host


def hand_self_influence(run_dir: Path, n: int, eta: float) -> torch.Tensor:
    """The TracIn reference: Σ_c η ‖∇ℓ_i(w_c)‖² over the run's checkpoint files (`Checkpointer.load`), one example
    at a time by torch.autograd, every parameter, summed in fp64."""
    from plait.checkpoint import Checkpointer

    recipe, *_ = rebuilt(run_dir)
    model = recipe.model
    ref = torch.zeros(n, dtype=torch.float64)
    for path in Checkpointer(run_dir / "checkpoints").complete():
        _, state = Checkpointer.load(path)
        model.load_state_dict(state["task"]["model"])
        model.eval()
        for i in range(n):
            gs = torch.autograd.grad(recipe.sample_losses([i])[0], list(model.parameters()), allow_unused=True)
            ref[i] += eta * sum(float((g.double() ** 2).sum()) for g in gs if g is not None)
    return ref


def train_classify_pit(tmp_path: Path, num_images: int, recipe: str = "", extra: str = "") -> Path:
    """``plait run`` of 2 steps of classify on a tiny PiT over capsule_red_lesions (16 px), a checkpoint a step;
    ``recipe`` adds keys to the recipe section, ``extra`` whole sections. The run folder."""
    cfg = tmp_path / "cls.yaml"
    out = tmp_path / "cls"
    cfg.write_text(
        f"run: {{name: c, seed: 0, steps: 2, log_every: 1, eval_every: 0, ckpt_every: 1, keep_checkpoints: 0, "
        f"out_dir: {out}, progress: false, device: cpu}}\n"
        f"recipe: {{name: classify, lr: 1.0e-3, batch_size: 8{recipe}}}\n"
        "model: {name: pit, image_size: 16, num_classes: 2, patch: 4, stride: 2, base_dims: [16, 16, 16], "
        "depth: [1, 2, 1], heads: [1, 2, 4]}\n"
        f"data: {{name: capsule_red_lesions, num_images: {num_images}, image_size: 16, seed: 0}}\n" + extra)
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (out / "c").iterdir()
    return run_dir
