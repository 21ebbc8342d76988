"""Renamed entries and options (issue 22: snake_case names, one spelling per option) are refused with one
line and a hint to the new name, exit 2: at validate, on resume of an old run directory, and in
``plait attribute`` of an old run. After writing the new name, the old run resumes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from plait.cli import main

REPO = Path(__file__).resolve().parent.parent


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("cfg, override, hint", [
    ("quickstart", "model.name=hf-causal-lm",
     "model.name: 'hf-causal-lm' was renamed to 'hf_causal_lm'; write hf_causal_lm instead"),
    ("basics/sft_quickstart", "data={name: synthetic-sentiment}",
     "data.name: 'synthetic-sentiment' was renamed to 'synthetic_sentiment'"),
    ("basics/sft_quickstart", "grad_transform=[{name: sam}, {name: dp-flat}]",
     "grad_transform[1].name: 'dp-flat' was renamed to 'dp_flat'"),
    ("quickstart", "parallel={name: 2d}", "parallel.name: '2d' was renamed to 'zo_2d'"),
])
def test_validate_refuses_old_names_with_the_hint(fresh_host, capsys, cfg, override, hint):
    fresh_host()
    assert main(["validate", str(REPO / "configs" / f"{cfg}.yaml"), override]) == 2
    assert hint in _one_line(capsys)


@pytest.mark.parametrize("override, hint", [
    ("recipe.lr_schedule=cosine", "recipe.lr_schedule: 'lr_schedule' was renamed to 'schedule' for recipe 'grpo' "
     "(plugin 'infinite_sampling'); write recipe.schedule instead"),
    ("recipe.lr_warmup_steps=5", "recipe.lr_warmup_steps: 'lr_warmup_steps' was renamed to 'warmup_steps'"),
])
def test_validate_refuses_old_option_keys_with_the_hint(fresh_host, capsys, override, hint):
    fresh_host()
    assert main(["validate", str(REPO / "configs/grpo/addition.yaml"), override]) == 2
    assert hint in _one_line(capsys)


def test_new_option_keys_are_the_ones_used(fresh_host, capsys):
    """grpo now spells its schedule as sft does: the same keys validate in both recipes."""
    fresh_host()
    for cfg in ("configs/grpo/addition.yaml", "configs/basics/sft_quickstart.yaml"):
        assert main(["config", str(REPO / cfg), "recipe.schedule=cosine", "recipe.warmup_steps=3"]) == 0
        out = capsys.readouterr().out
        assert "schedule: cosine" in out and "warmup_steps: 3" in out and "lr_schedule" not in out


def test_resume_of_an_old_run_directory_gives_the_hint_then_resumes(tiny_config, fresh_host, capsys):
    fresh_host()
    cfg = str(tiny_config(steps=2, ckpt=1))
    assert main(["run", cfg]) == 0
    (run_dir,) = [p for p in (Path(cfg).parent / "runs" / "t").iterdir() if p.is_dir()]
    saved = run_dir / "config.yaml"
    text = saved.read_text()
    assert "name: hf_causal_lm" in text
    saved.write_text(text.replace("name: hf_causal_lm", "name: hf-causal-lm"))  # as an older plait wrote it
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["run", cfg, f"run.resume={run_dir}", "run.steps=3"]) == 2
    err = _one_line(capsys)
    assert f"'{saved}'" in err and "model.name: 'hf-causal-lm' was renamed to 'hf_causal_lm'" in err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing written
    # the old config itself, given as the run's config: refused at validate with the same hint
    assert main(["run", str(saved), f"run.resume={run_dir}", "run.steps=3"]) == 2
    assert "model.name: 'hf-causal-lm' was renamed to 'hf_causal_lm'" in _one_line(capsys)
    # following the hint resumes the run
    saved.write_text(text)
    assert main(["run", cfg, f"run.resume={run_dir}", "run.steps=3"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


ATTRIBUTE_RUN = """
run: {{name: s, seed: 0, steps: 2, log_every: 1, out_dir: {out}, progress: false, device: cpu}}
recipe: {{name: sam_train, rho: 0.05, lr: 0.5, l2: 1.0e-2}}
model: {{name: tabular_mlp, num_features: 30, num_classes: 2, hidden: []}}
data: {{name: breast_cancer, n_train: 40, n_test: 10, seed: 0}}
"""


@pytest.mark.parametrize("old, new, hint", [
    ("name: tabular_mlp", "name: tabular-mlp", "model.name: 'tabular-mlp' was renamed to 'tabular_mlp'"),
    ("name: breast_cancer", "name: breast-cancer", "data.name: 'breast-cancer' was renamed to 'breast_cancer'"),
    ("num_classes: 2", "n_classes: 2", "model.n_classes: 'n_classes' was renamed to 'num_classes'"),
])
def test_attribute_of_an_old_run_gives_the_hint(tmp_path, fresh_host, capsys, old, new, hint):
    fresh_host()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(ATTRIBUTE_RUN.format(out=tmp_path / "runs"))
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (tmp_path / "runs" / "s").iterdir()
    saved = run_dir / "config.yaml"
    text = saved.read_text()
    assert old in text
    saved.write_text(text.replace(old, new))
    capsys.readouterr()
    assert main(["attribute", str(run_dir), "estimator=if"]) == 2
    err = _one_line(capsys)
    assert hint in err and f"'{saved}'" in err and not (run_dir / "attribution").exists()
