"""Recipe ``sam_train`` and the ``plait attribute`` verb, end to end on a small digits subset."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plait.cli import main

CONFIG = """
run: {{name: s, seed: 0, steps: {steps}, log_every: 5, out_dir: {out}, progress: false, device: cpu}}
recipe: {{name: sam_train, rho: 0.05, lr: 0.5, l2: 1.0e-2, record_trajectory: {traj}}}
model: {{name: tabular_mlp, num_features: 64, num_classes: 10, hidden: []}}
data: {{name: digits, n_train: 120, n_test: 30, flip_fraction: 0.1, seed: 0}}
"""


def _train(tmp_path: Path, traj: bool = False, steps: int = 10) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(steps=steps, out=tmp_path / "runs", traj=str(traj).lower()))
    assert main(["run", str(cfg)]) == 0
    (run_dir,) = (tmp_path / "runs" / "s").iterdir()
    return run_dir


def test_sam_train_then_attribute_if(tmp_path, fresh_host):
    from safetensors.torch import load_file
    from sklearn.metrics import roc_auc_score

    fresh_host()
    run_dir = _train(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sam_if"]["dataset"] == "digits" and summary["sam_if"]["trajectory"] is None
    assert summary["final_eval"]["eval/accuracy"] > 0.3
    assert main(["attribute", str(run_dir), "estimator=if", "--top", "3"]) == 0
    out = run_dir / "attribution" / "if"
    for name in ("scores.safetensors", "self_influence.safetensors", "report.json", "report.md"):
        assert (out / name).is_file(), name
    assert load_file(str(out / "scores.safetensors"))["scores"].shape == (120, 30)
    saved = load_file(str(out / "self_influence.safetensors"))
    report = json.loads((out / "report.json").read_text())
    mask = saved["flip_mask"].numpy()
    assert mask.sum() == 12 == report["mislabel"]["n_flipped"]
    assert report["mislabel"]["auc"] == pytest.approx(roc_auc_score(mask, saved["self_influence"].numpy()), abs=1e-12)
    assert report["mislabel"]["baseline_auc"] == pytest.approx(roc_auc_score(mask, saved["train_loss"].numpy()),
                                                               abs=1e-12)
    assert len(report["test_examples"]) == 3 and len(report["test_examples"][0]["proponents"]) == 3
    assert "ROC-AUC" in (out / "report.md").read_text()


def test_attribute_trajectory_estimator(tmp_path, fresh_host):
    fresh_host()
    run_dir = _train(tmp_path, traj=True, steps=4)
    assert (run_dir / "trajectory" / "trajectory.safetensors").is_file()
    assert main(["attribute", str(run_dir), "estimator=tracin"]) == 0
    report = json.loads((run_dir / "attribution" / "tracin" / "report.json").read_text())
    assert report["info"]["checkpoints"] == 4


def test_attribute_bad_inputs(tmp_path, fresh_host, capsys):
    fresh_host()
    run_dir = _train(tmp_path, steps=2)
    capsys.readouterr()
    assert main(["attribute", str(run_dir), "estimator=nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown estimator 'nope'" in err and "sam_trajectory" in err and len(err.strip().splitlines()) == 1
    assert main(["attribute", str(run_dir), "estimator=sam_trajectory"]) == 2
    assert "recipe.record_trajectory=true" in capsys.readouterr().err
    assert main(["attribute", str(run_dir), "estimator=if", "solver=nope"]) == 2
    assert "error:" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main(["attribute", str(empty)]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["attribute", str(tmp_path / "missing")]) == 2


def test_sam_train_rejects_mismatched_model(tmp_path, fresh_host, capsys):
    fresh_host()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(steps=2, out=tmp_path / "runs", traj="false").replace("num_classes: 10", "num_classes: 2"))
    assert main(["run", str(cfg)]) == 2
    assert "do not match data 'digits'" in capsys.readouterr().err


def test_digits_config_validates(fresh_host):
    from plait.config import load_config, validate

    host = fresh_host()
    cfg = load_config(Path(__file__).resolve().parents[3] / "configs" / "sam_if" / "digits.yaml")
    comps = validate(cfg, host.registries)
    assert comps["recipe"].entry.name == "sam_train" and cfg.data.flip_fraction == 0.1


def test_roc_auc_ties():
    from sklearn.metrics import roc_auc_score

    from plait.plugins.sam_if.attribute import recall_at, roc_auc

    s = torch.tensor([0.1, 0.4, 0.4, 0.9, 0.2, 0.4])
    pos = torch.tensor([False, True, False, True, False, True])
    assert roc_auc(s, pos) == pytest.approx(roc_auc_score(pos.numpy(), s.numpy()))
    assert recall_at(s, pos, 0.2) == pytest.approx(1 / 3)


def test_resumed_run_keeps_its_trajectory(tmp_path, fresh_host):
    """3 steps, then resume to 6: the trajectory equals an uninterrupted 6-step run's, record for record."""
    from safetensors.torch import load_file

    from plait.config import load_config
    from plait.run import execute

    fresh_host()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(CONFIG.format(steps=6, out=tmp_path / "runs", traj="true"))
    full = execute(load_config(cfg, ["run.name=full"]))
    part = execute(load_config(cfg, ["run.name=part", "run.steps=3"]))
    assert json.loads((part.dir / "trajectory" / "trajectory.json").read_text())["records"] == 3
    resumed = execute(load_config(cfg, ["run.name=part", f"run.resume={part.dir}"]))
    assert resumed.dir == part.dir
    a = load_file(str(full.dir / "trajectory" / "trajectory.safetensors"))
    b = load_file(str(part.dir / "trajectory" / "trajectory.safetensors"))
    assert a["weights"].shape[0] == 6 and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((part.dir / "trajectory" / "trajectory.json").read_text())["records"] == 6


def test_resume_without_recorded_trajectory_is_refused(tmp_path, fresh_host, capsys):
    fresh_host()
    run_dir = _train(tmp_path, traj=False, steps=2)
    cfg = tmp_path / "c.yaml"
    capsys.readouterr()
    assert main(["run", str(cfg), f"run.resume={run_dir}", "recipe.record_trajectory=true", "run.steps=4"]) == 2
    err = capsys.readouterr().err  # the core refuses any changed option on resume, naming it
    assert "run.resume: the config differs" in err and "recipe.record_trajectory (False -> True)" in err


@pytest.mark.slow
def test_attribute_remove_harmful_examples(tmp_path, fresh_host, capsys):
    """``--remove K``: replaying the run reproduces its weights; harmful removal is reported against random."""
    fresh_host()
    run_dir = _train(tmp_path, steps=10)
    capsys.readouterr()
    assert main(["attribute", str(run_dir), "estimator=sam_hessian", "--remove", "3", "--random-draws", "2"]) == 0
    assert "model editing (remove 3)" in capsys.readouterr().out
    e = json.loads((run_dir / "attribution" / "sam_hessian" / "report.json").read_text())["editing"]
    assert e["replay_max_abs_error"] <= 1e-9 and len(e["removed"]) == 3 and len(e["random"]["draws"]) == 2
    assert e["harmful"]["predicted"] < 0 and {"one_step", "retrained"} <= set(e["harmful"])
    assert main(["attribute", str(run_dir), "--remove", "500"]) == 2
    assert "K must be in 1..119" in capsys.readouterr().err


def test_attribute_ekfac_equals_the_estimator_with_l2_as_damping(tmp_path, fresh_host, capsys):
    # the verb fills l2 from the run: EK-FAC's damping then holds the regulariser's exact Hessian l2·I
    from safetensors.torch import load_file

    from plait.manager import get_host
    from plait.plugins.sam_if.attribute import _load
    from plait.plugins.sam_if.ekfac import EKFACEstimator

    fresh_host()
    run_dir = _train(tmp_path, steps=3)
    assert main(["attribute", str(run_dir), "estimator=ekfac", "damping=1e-3"]) == 0
    got = load_file(str(run_dir / "attribution" / "ekfac" / "scores.safetensors"))["scores"]
    _, data, model, _ = _load(run_dir, get_host())
    ref = EKFACEstimator(damping=1e-3 + 1e-2).scores(model, (data.train.X.double(), data.train.y),
                                                     (data.test.X.double(), data.test.y))
    assert torch.allclose(got, ref, rtol=1e-10, atol=0)
    capsys.readouterr()
    assert main(["attribute", str(run_dir), "estimator=ekfac", "params=[decoder.*]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "match no Linear module" in err and len(err.splitlines()) == 1
