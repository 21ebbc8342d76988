"""``parallel: {name: fsdp}`` at validate: sft on hf_causal_lm validates; other families, the grpo and zo recipes,
every grad_transform (DP and SAM), model transforms and unknown mixed-precision dtypes are refused in one line
naming what and why (exit 2). Plus the block discovery against the HF model's own layer count, and fsdp at world
size 1 in this process against the plain run (the one-GPU benchmark's case): losses within 1e-6 relative."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from plait.cli import main
from plait.config import load_config
from plait.run import execute
from tests.plugins.parallel._runs import losses

ROOT = Path(__file__).resolve().parents[3]
SFT = """
run: {{name: p, seed: 0, steps: 1, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false, device: cpu}}
recipe: {{name: sft, batch_size: 4}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 8, n_eval: 4}}
"""


def _cfg(tmp_path, text=SFT):
    p = tmp_path / "cfg.yaml"
    p.write_text(text.format(out=tmp_path / "runs"))
    return str(p)


def _refused(capsys, argv: list[str]) -> str:
    code = main(["validate", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_sft_on_hf_causal_lm_validates(tmp_path, capsys):
    assert main(["validate", _cfg(tmp_path), "parallel.name=fsdp", "parallel.mixed_precision.param_dtype=bf16",
                 "parallel.mixed_precision.reduce_dtype=fp32", "parallel.reshard_after_forward=false"]) == 0
    assert main(["ls", "parallel"]) == 0
    assert "fsdp" in capsys.readouterr().out


@pytest.mark.parametrize("config,family", [("capsule/classify_pit.yaml", "pit"),
                                           ("sam_if/digits.yaml", "tabular_mlp")])
def test_other_families_refused(capsys, config, family):
    err = _refused(capsys, [str(ROOT / "configs" / config), "parallel.name=fsdp"])
    assert "'fsdp'" in err and repr(family) in err and "hf_causal_lm" in err and "ddp" in err


def test_grpo_refused_with_the_reason(capsys):
    err = _refused(capsys, [str(ROOT / "configs" / "grpo" / "addition.yaml"), "parallel.name=fsdp"])
    assert "'fsdp'" in err and "'grpo'" in err and "rollouts" in err


def test_wip_recover_refused_even_on_hf_causal_lm(capsys):
    err = _refused(capsys, [str(ROOT / "configs" / "wip" / "recover.yaml"), "parallel.name=fsdp",
                            "model={name: hf_causal_lm, arch: llama, size: tiny}"])
    assert "'fsdp'" in err and "'wip_recover'" in err and "own loop" in err


def test_zeroth_order_recipe_refused(tmp_path, capsys):
    cfg = SFT.replace("recipe: {{name: sft, batch_size: 4}}", "recipe: {{name: zo, batch_size: 4}}\n"
                      "perturbation: {{name: mezo, eps: 1.0e-3, lr: 1.0e-3}}")
    err = _refused(capsys, [_cfg(tmp_path, cfg), "parallel.name=fsdp"])
    assert "'fsdp'" in err and "'zo'" in err and "zeroth-order" in err


@pytest.mark.parametrize("transform,words", [
    ("{name: flashdp, noise_multiplier: 1.0}", ("'flashdp'", "per-sample clipping", "private ddp")),
    ("{name: dp_flat, noise_multiplier: 1.0}", ("'dp_flat'", "global norm across shards")),
    ("{name: sam, rho: 0.05}", ("'sam'", "ascent")),
])
def test_grad_transforms_refused(tmp_path, capsys, transform, words):
    err = _refused(capsys, [_cfg(tmp_path), "parallel.name=fsdp", f"grad_transform={transform}"])
    assert err.startswith("error: grad_transform") and "'fsdp'" in err and "'sft'" in err, err
    for w in words:
        assert w in err, err


def test_model_transform_refused(tmp_path, capsys):
    err = _refused(capsys, [_cfg(tmp_path), "parallel.name=fsdp", "transforms=[{name: freeze, patterns: ['*bias']}]"])
    assert "transforms[0]" in err and "'freeze'" in err and "'fsdp'" in err


@pytest.mark.parametrize("key", ["param_dtype", "reduce_dtype"])
def test_unknown_dtype_refused(tmp_path, capsys, key):
    err = _refused(capsys, [_cfg(tmp_path), "parallel.name=fsdp", f"parallel.mixed_precision.{key}=fp8"])
    assert f"parallel.mixed_precision.{key}" in err and "'fp8'" in err and "bf16" in err


def test_blocks_are_the_decoder_layers():
    from transformers import OPTConfig, OPTForCausalLM

    from plait.plugins.parallel.fsdp import transformer_blocks

    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3, ffn_dim=32,
                                     num_attention_heads=2, max_position_embeddings=32))
    blocks = transformer_blocks(model)
    assert blocks == list(model.model.decoder.layers) and len(blocks) == 3


def test_world_size_one_trains_like_the_plain_run(tmp_path):
    cfg = _cfg(tmp_path)
    run = ["run.steps=4", "recipe.optimizer=sgd", "recipe.lr=0.05", "recipe.max_grad_norm=0",
           "model.config={dropout: 0.0, attention_dropout: 0.0}"]
    plain = execute(load_config(cfg, [*run, f"run.out_dir={tmp_path / 'a'}"]))
    sharded = execute(load_config(cfg, [*run, f"run.out_dir={tmp_path / 'b'}", "parallel.name=fsdp"]))
    a, b = losses(plain.dir), losses(sharded.dir)
    assert len(a) == len(b) == 4 and a[-1] < a[0]
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-6 * abs(x), (a, b)
    assert not torch.distributed.is_initialized()  # the strategy closed its group of one
