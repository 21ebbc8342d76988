"""What TensorBoard shows of a run, read back with tensorboard's own EventAccumulator: the resolved config as
text, an hparams summary (config keys × final metrics), images at the training step of their evaluation, GRPO
eval completions with rewards as text, the classify prediction grid, and no ``|`` in any tag."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from plait.config import load_config
from plait.run import execute

ROOT = Path(__file__).resolve().parents[2]


def _acc(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _text(acc, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def _hparams(run_dir: Path):
    """The hparams plugin's session-start info (config values) and experiment (metric names)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    data = {tag: plugin_data_pb2.HParamsPluginData.FromString(c) for tag, c in content.items()}
    ssi = data["_hparams_/session_start_info"].session_start_info
    exp = data["_hparams_/experiment"].experiment
    hp = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in ssi.hparams.items()}
    return hp, {m.name.tag for m in exp.metric_infos}


def _all_tags(acc) -> set[str]:
    return {t for kind in ("scalars", "images", "tensors") for t in acc.Tags()[kind]}


def test_config_text_and_hparams(tiny_config, fresh_host):
    fresh_host()
    run = execute(load_config(tiny_config(steps=2)))
    acc = _acc(run.dir)
    ((step, text),) = _text(acc, "config/text_summary")
    assert step == 0
    # the text is the resolved config (as written to config.yaml), indented as a markdown code block
    assert OmegaConf.create("\n".join(l[4:] for l in text.splitlines())) == OmegaConf.load(run.dir / "config.yaml")
    hp, metric_tags = _hparams(run.dir)
    assert hp["run.seed"] == run.cfg.run.seed and hp["run.steps"] == 2 and hp["recipe.name"] == run.cfg.recipe.name
    assert {"eval/loss", "eval/accuracy", "train/loss"} <= metric_tags
    assert not any("|" in t for t in _all_tags(acc))


@pytest.mark.slow
def test_classify_images_at_training_steps_with_prediction_grid(tmp_path, fresh_host):
    cfg = load_config(ROOT / "configs" / "capsule" / "classify_pit.yaml", [
        f"run.out_dir={tmp_path}", "run.steps=4", "run.eval_every=2", "run.progress=false",
        "data.num_images=120", "data.min_per_class=3", "recipe.batch_size=8",
        "model.base_dims=[8,8,8]", "model.heads=[1,1,2]"])
    run = execute(cfg, fresh_host())
    acc = _acc(run.dir)
    eval_steps = [e.step for e in acc.Scalars("eval/accuracy")]
    assert eval_steps == [0, 2, 4]  # scalars: the training step
    assert [e.step for e in acc.Images("eval/confusion_matrix")] == eval_steps
    grid = acc.Images("eval/predictions")
    assert [e.step for e in grid] == eval_steps and grid[0].width > 0 and grid[0].height > 0
    pred_text = _text(acc, "eval/predictions/text_summary")
    assert [s for s, _ in pred_text] == eval_steps and "| label | predicted |" in pred_text[-1][1]
    assert not any("|" in t for t in _all_tags(acc))


@pytest.mark.slow
def test_grpo_eval_completions_as_text_at_eval_steps(tmp_path, fresh_host):
    cfg = load_config(ROOT / "configs" / "grpo" / "addition.yaml", [
        f"run.out_dir={tmp_path}", "run.steps=2", "run.eval_every=1", "run.log_every=1", "run.progress=false",
        "run.ckpt_every=0", "recipe.warmup_sft_steps=0", "recipe.prompts_per_step=2"])
    run = execute(cfg, fresh_host())
    acc = _acc(run.dir)
    samples = _text(acc, "eval/samples/text_summary")
    assert [s for s, _ in samples] == [e.step for e in acc.Scalars("eval/reward_mean")] == [0, 1, 2]
    table = samples[-1][1]
    assert table.startswith("| prompt | completion | reward |") and "=" in table  # addition prompts "a+b="
    assert run.summary["headline_metric"] == "train/reward_mean"
