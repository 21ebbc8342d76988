"""Recipe ``grpo`` end to end: the reward rises on the bundled addition task, resume is exact, bad input is one
line with exit 2 (through ``plait.cli.main``)."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plait.cli import main
from plait.config import load_config
from plait.run import execute

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

REPO = Path(__file__).resolve().parents[3]

CFG = """
run: {{name: g, seed: 0, steps: {steps}, log_every: 1, eval_every: 0, ckpt_every: {ckpt}, out_dir: {out},
      progress: false, keep_checkpoints: 0, device: cpu}}
recipe:
  name: grpo
  group_size: 8
  prompts_per_step: 8
  max_new_tokens: 2
  lr: 1.0e-3
  warmup_sft_steps: {warmup}
  warmup_lr: 3.0e-3
  rewards:
    - {{name: exact_match, weight: 1.0}}
    - {{name: regex, pattern: "[0-9]", weight: 0.2}}
model: {{name: hf_causal_lm, path: "bundled:tiny-opt-base"}}
data: {{name: addition}}
sampler: {{name: continuous, g: 8}}
"""


def _cfg(tmp_path, steps=4, ckpt=0, warmup=0, name="c.yaml"):
    p = tmp_path / name
    p.write_text(CFG.format(steps=steps, ckpt=ckpt, warmup=warmup, out=tmp_path / "runs"))
    return p


def _rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(l).items() if not k.startswith(("perf/", "mem/"))}
            for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"))


@pytest.mark.slow
def test_reward_rises_on_addition(tmp_path, fresh_host):
    fresh_host()
    run = execute(load_config(_cfg(tmp_path, steps=150, warmup=200)))
    assert run.status == "completed"
    rewards = [r["train/reward_mean"] for r in _rows(run.dir) if "train/reward_mean" in r]
    assert len(rewards) == 150
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.1, (first, last)
    row = next(r for r in _rows(run.dir) if "train/reward_mean" in r)
    for key in ("train/reward_std", "train/loss", "train/kl", "train/clip_frac"):
        assert key in row
    metrics = [json.loads(l) for l in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert any("perf/decode_steps" in m and "mem/peak_kv_bytes" in m for m in metrics)
    assert any("eval/accuracy" in m for m in metrics) and any("warmup/loss" in m for m in metrics)


def test_resume_mid_run_equals_uninterrupted(tmp_path, fresh_host):
    fresh_host()
    extra = ["recipe.beta=0.04", "recipe.num_iterations=2"]  # the reference and the snapshot are resumed too
    full = execute(load_config(_cfg(tmp_path, steps=4, warmup=3), ["run.name=full", *extra]))
    part = execute(load_config(_cfg(tmp_path, steps=2, warmup=3), ["run.name=part", *extra]))
    resumed = execute(load_config(_cfg(tmp_path, steps=4, warmup=3),
                                  ["run.name=part", f"run.resume={part.dir}", *extra]))
    assert resumed.dir == part.dir
    ta, tb = _final(full.dir), _final(part.dir)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    train = lambda rows: [r for r in rows if "train/loss" in r]  # noqa: E731
    assert train(_rows(full.dir)) == train(_rows(part.dir)) and len(train(_rows(full.dir))) == 4


def _user_rewards(tmp_path, monkeypatch) -> str:
    (tmp_path / "user_rewards_mod.py").write_text(textwrap.dedent("""
        def raises_on_seven(prompts, completions, **fields):
            out = []
            for p in prompts:
                if "7" in p:
                    raise RuntimeError("boom")
                out.append(1.0)
            return out

        def nan_reward(prompts, completions, **fields):
            return [float("nan")] * len(prompts)

        def length_reward(prompts, completions, **fields):
            return [float(len(c)) for c in completions]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_rewards_mod", None)
    return "user_rewards_mod"


def test_python_reward_and_skip_policy(tmp_path, fresh_host, monkeypatch):
    mod = _user_rewards(tmp_path, monkeypatch)
    fresh_host()
    run = execute(load_config(_cfg(tmp_path, steps=2), [
        f"recipe.rewards=[{{name: python, path: '{mod}:length_reward'}}, {{name: python, path: '{mod}:nan_reward'}}]",
        "recipe.reward_on_error=skip"]))
    assert run.status == "completed"
    rows = [r for r in _rows(run.dir) if "train/reward_skipped" in r]
    assert rows and all(r["train/reward_skipped"] == 64 for r in rows)  # every nan skipped, as 0
    assert run.summary["reward_skipped"] == 128


@pytest.mark.parametrize("override,match", [
    ("sampler.g=16", "sampler.g: 16 concurrent rows exceeds recipe.group_size G=8"),
    ("recipe.group_size=1", "recipe.group_size: must be >= 2"),
    ("recipe.max_new_tokens=0", "recipe.max_new_tokens: must be at least 1"),
    ("sampler.cache_capacity=4", "sampler.cache_capacity: 4 positions, but train prompt"),
    ("recipe.aggregation=mean", "recipe.aggregation: 'mean'; allowed: grpo, dapo, dr_grpo, bnpo"),
    ("recipe.advantage_scale=z", "recipe.advantage_scale: 'z'; allowed: group, batch, none"),
    ("recipe.reward_on_error=ignore", "recipe.reward_on_error: 'ignore'; allowed: fail, skip"),
    ("recipe.temperature=0", "recipe.temperature: 0 (greedy)"),
    ("recipe.rewards=[{name: bleu}]", "recipe.rewards[0].name: 'bleu' is not a reward"),
    ("recipe.rewards=[{name: regex}]", "recipe.rewards[0] (regex): needs a 'pattern'"),
    ("recipe.rewards=[{name: regex, pattern: '('}]", "invalid regex '('"),
    ("recipe.rewards=[{name: exact_match, feild: answer}]", "recipe.rewards[0].feild: unknown key"),
    ("recipe.rewards=[{name: python, path: 'no_such_mod_xyz:f'}]", "cannot import module 'no_such_mod_xyz'"),
    ("recipe.rewards=[]", "recipe.rewards: empty"),
    ("recipe.eval_max_new_tokens=100000", "recipe.eval_max_new_tokens: the longest prompt plus eval_max_new_tokens"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, fresh_host, capsys, override, match):
    fresh_host()
    assert main(["run", str(_cfg(tmp_path)), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: HF's weight-loading progress bar)
    assert err.startswith("error: ") and match in err, err
    assert not list((tmp_path / "runs").glob("*/*"))  # nothing left behind


@pytest.mark.parametrize("fn,on_error,match", [
    ("raises_on_seven", "fail", "failed on sample"),
    ("nan_reward", "fail", "returned a non-finite value nan"),
])
def test_failing_reward_names_the_sample(tmp_path, fresh_host, capsys, monkeypatch, fn, on_error, match):
    mod = _user_rewards(tmp_path, monkeypatch)
    fresh_host()
    code = main(["run", str(_cfg(tmp_path)), f"recipe.rewards=[{{name: python, path: '{mod}:{fn}'}}]",
                 f"recipe.reward_on_error={on_error}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: recipe.rewards: ") and match in err, err
    assert "(sample " in err and "prompt '" in err  # the sample's prompt and completion are named


def test_configs_validate(fresh_host):
    from plait.config import validate

    host = fresh_host()
    for path in sorted((REPO / "configs" / "grpo").glob("*.yaml")):
        comps = validate(load_config(path), host.registries)
        assert comps["recipe"].entry.name == "grpo" and "sampler" in comps
