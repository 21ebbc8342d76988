"""The ``influence:`` section: an sft run of the tiny OPT computes TracIn self-influence over its checkpoints at
the end of training and writes ``attribution/``.

References: ``plait attribute RUN estimator=tracin`` on the same run (the verb), and a hand sum from the
checkpoint files (`Checkpointer.load`, per-example torch.autograd, η = lr/(1 − μ) per one-step interval, constant
schedule). Refusals at validate: exit 2, one line, no run directory.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plait.cli import main
from tests.plugins.sam_if._runs import SFT_ETA, SFT_RUN, hand_self_influence, rebuilt, train_classify_pit

DP = "grad_transform: {name: flashdp, noise_multiplier: 0.5, max_grad_norm: 1.0, delta: 1.0e-3}\n"


def _write(tmp_path: Path, extra: str, ckpt: int = 1, keep: int = 0, name: str = "c.yaml") -> tuple[Path, Path]:
    cfg = tmp_path / name
    out = tmp_path / name.replace(".yaml", "")
    cfg.write_text(SFT_RUN.format(ckpt=ckpt, keep=keep, out=out, extra=extra))
    return cfg, out


def _tb_text(run_dir: Path, tag: str) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors(tag)
    return event.tensor_proto.string_val[0].decode()


def test_sft_influence_section_equals_attribute_verb_and_hand_sum(tmp_path, fresh_host):
    from safetensors.torch import load_file

    fresh_host()
    cfg, out = _write(tmp_path, "influence: {name: tracin, top: 3}")
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (out / "a").iterdir()
    att = run_dir / "attribution"
    got = load_file(str(att / "scores.safetensors"))["self_influence"]
    assert got.shape == (12,)
    md = (att / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    top = summary["attribution"]["top"]
    assert summary["status"] == "completed" and summary["attribution"]["checkpoints"] == [1, 2, 3]
    assert top == torch.argsort(got, descending=True)[:3].tolist()
    assert table[0].split("|")[2].strip() == str(top[0])
    # TensorBoard text: the top example's text, as decoded from the run's tokenizer
    text = _tb_text(run_dir, "attribution/top/text_summary")
    report = json.loads((att / "report.json").read_text())
    assert report["top"][0]["text"] and report["top"][0]["text"] in text

    # the independent path: the verb over the same run directory
    assert main(["attribute", str(run_dir), "estimator=tracin"]) == 0
    verb = load_file(str(att / "tracin" / "scores.safetensors"))["self_influence"]
    assert torch.allclose(got, verb, rtol=1e-6, atol=0)

    # a hand sum from the checkpoint files
    ref = hand_self_influence(run_dir, 12, SFT_ETA)
    assert torch.allclose(got, ref, rtol=1e-4, atol=0)  # fp32 model: gradients to ~1e-6 relative


@pytest.mark.parametrize("extra, ckpt, keep, match", [
    ("influence: {name: tracin}", 0, 0, "keeps 1"),
    ("influence: {name: tracin}", 1, 1, "run.keep_checkpoints=0"),
    ("influence: {name: if}", 1, 0, "cannot run at the end of training"),
    ("influence: {name: ekfac}", 1, 0, "name: tracin"),
    ("influence: {name: tracin, projection: sparse}", 1, 0, "allowed: rademacher"),
    ("influence: {name: tracin, trajectory: somewhere}", 1, 0, "influence.trajectory"),
    ("influence: {name: tracin}\n" + DP, 1, 0, "influence.allow_private_data=true"),
])
def test_refusals_exit_2_one_line_nothing_written(tmp_path, fresh_host, capsys, extra, ckpt, keep, match):
    fresh_host()
    cfg, out = _write(tmp_path, extra, ckpt=ckpt, keep=keep)
    for verb in ("validate", "run"):
        capsys.readouterr()
        assert main([verb, str(cfg)]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_zeroth_order_recipe_is_refused(tmp_path, fresh_host, capsys):
    fresh_host()
    cfg = tmp_path / "zo.yaml"
    cfg.write_text(f"run: {{name: z, steps: 2, ckpt_every: 1, keep_checkpoints: 0, out_dir: {tmp_path / 'z'}}}\n"
                   "recipe: {name: zo}\nmodel: {name: hf_causal_lm, arch: opt, size: tiny}\n"
                   "data: {name: synthetic_sentiment}\nperturbation: {name: mezo}\ninfluence: {name: tracin}\n")
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "first-order recipes" in err and "'zo'" in err and len(err.splitlines()) == 1, err


def test_private_run_with_allow_private_data(tmp_path, fresh_host):
    from safetensors.torch import load_file

    fresh_host()
    cfg, out = _write(tmp_path, "influence: {name: tracin, k: 64, allow_private_data: true, "
                                "params: [model.decoder.layers.1.*]}\n" + DP, ckpt=2)
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (out / "a").iterdir()
    att = run_dir / "attribution"
    scores = load_file(str(att / "scores.safetensors"))["self_influence"]
    assert scores.shape == (12,) and bool((scores > 0).all())  # a sum of η‖P g‖² over checkpoints
    report = json.loads((att / "report.json").read_text())
    assert report["checkpoints"] == [2, 3] and report["private"] == ["flashdp"] and report["info"]["k"] == 64
    assert "not private" in (att / "report.md").read_text()


def test_classify_image_run_writes_labels_and_images(tmp_path, fresh_host):
    from safetensors.torch import load_file
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fresh_host()
    run_dir = train_classify_pit(tmp_path, 32, extra="influence: {name: tracin, n: 8, top: 3}\n")
    att = run_dir / "attribution"
    got = load_file(str(att / "scores.safetensors"))["self_influence"]
    assert got.shape == (8,)
    assert main(["attribute", str(run_dir), "estimator=tracin", "n=8"]) == 0
    assert torch.allclose(got, load_file(str(att / "tracin" / "scores.safetensors"))["self_influence"],
                          rtol=1e-6, atol=0)
    labels = rebuilt(run_dir)[0].data.train.y
    report = json.loads((att / "report.json").read_text())
    assert [r["index"] for r in report["top"]] == torch.argsort(got, descending=True)[:3].tolist()
    assert [r["label"] for r in report["top"]] == [str(int(labels[r["index"]])) for r in report["top"]]
    assert "| label |" in (att / "report.md").read_text()
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    acc.Reload()
    assert len(acc.Images("attribution/top_images")) == 1


def test_failure_at_end_of_run_keeps_the_trained_run(tmp_path, fresh_host, capsys):
    fresh_host()
    cfg, out = _write(tmp_path, "influence: {name: tracin, params: [nothing.*]}")
    assert main(["run", str(cfg)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("influence:")]
    assert len(err) == 1 and "match no parameter" in err[0]
    (run_dir,) = (out / "a").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and "match no parameter" in summary["attribution"]["error"]
    assert not (run_dir / "attribution" / "scores.safetensors").exists()
    assert len(list((run_dir / "checkpoints").iterdir())) >= 3


def test_any_exception_at_end_of_run_keeps_summary(tmp_path, fresh_host, monkeypatch, capsys):
    from plait.plugins.sam_if import anyrun

    def boom(*args, **kwargs):
        raise RuntimeError("estimator crashed\nsecond line")
    monkeypatch.setattr(anyrun, "attribute_run", boom)
    fresh_host()
    cfg, out = _write(tmp_path, "influence: {name: tracin}")
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (out / "a").iterdir()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("influence:")]
    assert err == ["influence: RuntimeError: estimator crashed"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["attribution"]["error"] == "RuntimeError: estimator crashed"
