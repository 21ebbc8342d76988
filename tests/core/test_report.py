"""The end-of-run table printed by ``plait run``: eval before/after, the headline training metric, privacy, wall
time and the newest checkpoint — each checked against summary.json / the run directory."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

from plait.checkpoint import Checkpointer
from plait.cli import _print_report, main


def _line(out: str, key: str) -> str:
    return next(ln for ln in out.splitlines() if ln.strip().startswith(key))


def test_report_shows_headline_wall_time_and_checkpoint(tiny_config, fresh_host, capsys, tmp_path):
    fresh_host()
    assert main(["run", str(tiny_config(steps=3))]) == 0
    out = capsys.readouterr().out
    (d,) = [p for p in (tmp_path / "runs" / "t").iterdir() if p.is_dir()]
    summary = json.loads((d / "summary.json").read_text())
    # headline: sft declares none, so train/loss, its last logged value
    last_loss = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if "train/loss" in l][-1]
    assert float(_line(out, "train/loss").split()[-1]) == round(last_loss["train/loss"], 4)
    assert float(_line(out, "wall time").split()[-2]) == round(summary["wall_seconds"], 1)
    ckpt = Path(_line(out, "checkpoint").split()[-1])
    assert ckpt == sorted((d / "checkpoints").glob("step_*"))[-1] and ckpt.name == "step_00000003"
    assert "privacy" not in out  # not a private run


def _fake_run(summary: dict, tmp_path: Path) -> SimpleNamespace:
    return SimpleNamespace(summary=summary, dir=tmp_path, status="completed",
                           checkpointer=Checkpointer(tmp_path / "checkpoints"))


def test_report_privacy_headline_and_void(tmp_path, capsys):
    summary = {"first_eval": {"eval/reward_mean": 0.1}, "final_eval": {"eval/reward_mean": 0.6},
               "final": {"train/loss": 1.0, "train/reward_mean": 0.55}, "headline_metric": "train/reward_mean",
               "privacy/epsilon": 3.25, "privacy/delta": 1e-5, "wall_seconds": 12.34}
    _print_report(_fake_run(summary, tmp_path))
    out = capsys.readouterr().out
    assert _line(out, "train/reward_mean").split()[-1] == "0.5500"
    assert "train/loss" not in out  # the recipe's declared headline replaces the default
    priv = _line(out, "privacy")
    assert "ε 3.2500" in priv and "δ 1e-05" in priv and "void" not in priv
    summary.update({"privacy/epsilon": 2.0, "privacy/guarantee": "void", "privacy/void_reason": "reproducible_noise"})
    _print_report(_fake_run(summary, tmp_path))
    assert "privacy guarantee: VOID (reproducible_noise)" in capsys.readouterr().out
    summary.update({"privacy/epsilon": math.inf, "privacy/guarantee": "holds"})
    _print_report(_fake_run(summary, tmp_path))
    assert "ε inf" in _line(capsys.readouterr().out, "privacy")


def test_progress_false_silences_hugging_face_loading_bar(tmp_path, fresh_host, capfd):
    """A model loaded with from_pretrained (model.path) shows transformers' "Loading weights" bar unless
    run.progress=false; the bar is transformers' own tqdm, so its text on stderr is the reference."""
    from transformers import OPTConfig, OPTForCausalLM
    from transformers.utils import logging as hf_logging

    model_dir = tmp_path / "m"
    OPTForCausalLM(OPTConfig(vocab_size=1024, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             ffn_dim=32, max_position_embeddings=64, word_embed_proj_dim=16)).save_pretrained(model_dir)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run: {{name: t, steps: 1, log_every: 1, eval_every: 0, out_dir: {tmp_path / 'runs'}, "
                   f"progress: false}}\nrecipe: {{name: sft, batch_size: 2}}\n"
                   f"model: {{name: hf_causal_lm, path: {model_dir}}}\n"
                   f"data: {{name: synthetic_sentiment, n_train: 8, n_eval: 4}}\n")
    fresh_host()
    hf_logging.enable_progress_bar()
    try:
        capfd.readouterr()
        assert main(["run", str(cfg)]) == 0
        err = capfd.readouterr().err
        assert "Loading weights" not in err, err[-500:]
    finally:
        hf_logging.enable_progress_bar()
