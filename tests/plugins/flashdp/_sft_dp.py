"""The flashdp sft run shared by the recipe and budget tests (not a test module: no ``test_`` prefix)."""
from __future__ import annotations

from pathlib import Path

CFG = """
run: {{name: d, seed: 2, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false,
      keep_checkpoints: 0}}
recipe: {{name: sft, optimizer: adamw, lr: 3.0e-3, batch_size: 8, eval_batch_size: 32}}
model: {{name: hf_causal_lm, arch: gpt2, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 64, n_eval: 8}}
grad_transform: {{name: flashdp, max_grad_norm: 1.0, noise_multiplier: 1.0, delta: 1.0e-3}}
"""


def sft_dp_config(tmp_path: Path, steps: int = 4) -> Path:
    """tmp_path/c.yaml: flashdp (σ=1, C=1, δ=1e-3) on sft, tiny gpt2, batch 8 of 64, runs under tmp_path/runs."""
    p = tmp_path / "c.yaml"
    p.write_text(CFG.format(steps=steps, out=tmp_path / "runs"))
    return p
