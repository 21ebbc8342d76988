"""Runs end to end: run directory, TensorBoard read-back, determinism, SIGKILL + resume, Ctrl-C, hook calls."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from plait.cli import main
from plait.config import load_config
from plait.run import execute


def _run_dir(out: Path) -> Path:
    (d,) = [p for p in (out / "t").iterdir() if p.is_dir()]
    return d


def _metrics(run_dir: Path, drop_prefix=("perf/",)) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(drop_prefix)} for r in rows]


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    return load_file(str(last / "tensors.safetensors"))


def test_run_directory_and_tensorboard_readback(tiny_config, tmp_path, fresh_host):
    fresh_host()
    run = execute(load_config(tiny_config(steps=4, ckpt=2)))
    d = run.dir
    assert d.parent == tmp_path / "runs" / "t" and run.status == "completed"
    assert (d / "config.yaml").read_text().startswith("run:")
    assert load_config(d / "config.yaml").recipe.lr == pytest.approx(3e-3)  # resolved config reloads
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "completed" and set(summary["final_eval"]) == {"eval/loss", "eval/accuracy"}
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    rows = _metrics(d, drop_prefix=())
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert rows[0]["step"] == 0 and "eval/accuracy" in rows[0]  # evaluation before training
    # TensorBoard's own reader sees the same scalars under /-namespaced tags
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(d))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "eval/loss", "eval/accuracy", "perf/steps_per_sec"} <= tags
    tb = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    js = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert [s for s, _ in tb] == [s for s, _ in js]
    assert all(abs(a - b) < 1e-5 * max(1, abs(b)) for (_, a), (_, b) in zip(tb, js))


def test_same_seed_same_result(tiny_config, fresh_host):
    fresh_host()
    a = execute(load_config(tiny_config(steps=3), ["run.name=a"]))
    b = execute(load_config(tiny_config(steps=3), ["run.name=a"]))
    ta, tb = _final_tensors(a.dir), _final_tensors(b.dir)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    c = execute(load_config(tiny_config(steps=3), ["run.name=a", "run.seed=1"]))
    tc = _final_tensors(c.dir)
    assert not all(torch.equal(ta[k], tc[k]) for k in ta)


KILLER = """
import os, signal
from plait import hookimpl

@hookimpl
def on_log(run, step, metrics):
    if step == int(os.environ.get("KILL_AT", "-1")):
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, plugin_site):
    site = plugin_site("killer", KILLER)
    env = dict(os.environ, PYTHONPATH=str(site))
    cfg_a = tmp_path / "a.yaml"
    cfg_a.write_text(_cfg(tmp_path / "a"))
    cfg_b = tmp_path / "b.yaml"
    cfg_b.write_text(_cfg(tmp_path / "b"))
    cmd = [sys.executable, "-m", "plait.cli", "run"]
    ok = subprocess.run(cmd + [str(cfg_a)], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    killed = subprocess.run(cmd + [str(cfg_b)], env=dict(env, KILL_AT="7"), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    run_b = _run_dir(tmp_path / "b")
    assert sorted(p.name for p in (run_b / "checkpoints").glob("step_*"))[-1] == "step_00000006"
    resumed = subprocess.run(cmd + [str(cfg_b), f"run.resume={run_b}"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    run_a = _run_dir(tmp_path / "a")
    ta, tb = _final_tensors(run_a), _final_tensors(run_b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k  # bit for bit on CPU
    assert _metrics(run_a) == _metrics(run_b)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_b))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))  # purged the steps after 6


def _cfg(out: Path) -> str:
    return (f"run: {{name: t, seed: 3, steps: 10, log_every: 1, eval_every: 4, ckpt_every: 3, out_dir: {out}, "
            f"progress: false, keep_checkpoints: 0}}\n"
            "recipe: {name: sft, lr: 3.0e-3, batch_size: 4, eval_batch_size: 32}\n"
            "model: {name: hf_causal_lm, arch: opt, size: tiny}\n"
            "data: {name: synthetic_sentiment, n_train: 12, n_eval: 8}\n")


class _Interrupter:
    def __init__(self, at):
        self.at, self.logged = at, []

    from plait import hookimpl

    @hookimpl
    def on_log(self, run, step, metrics):
        self.logged.append(step)
        if step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_checkpoints_and_stops(tiny_config, fresh_host, capsys):
    host = fresh_host()
    plugin = _Interrupter(at=3)
    host.pm.register(plugin, name="interrupter")
    calls = []
    undo = host.pm.add_hookcall_monitoring(lambda name, impls, kw: calls.append(name), lambda *a: None)
    try:
        code = main(["run", str(tiny_config(steps=8)), "run.log_every=1"])
    finally:
        undo()
        host.pm.unregister(name="interrupter")
    assert code == 130
    out = capsys.readouterr().out
    assert "interrupted at step 3" in out and "run.resume=" in out
    d = _run_dir(tiny_config().parent / "runs")
    assert json.loads((d / "summary.json").read_text())["status"] == "interrupted"
    assert [p.name for p in (d / "checkpoints").glob("step_*")] == ["step_00000003"]
    # pluggy is called at run boundaries only: observers run as plain functions inside the loop
    assert calls == ["on_run_start", "on_run_end"]
    assert plugin.logged == [0, 1, 2, 3]


def test_resume_errors_are_one_line_and_write_nothing(tiny_config, fresh_host, capsys, tmp_path):
    fresh_host()
    cfg = str(tiny_config(steps=2, ckpt=1))
    assert main(["run", cfg, f"run.resume={tmp_path / 'nowhere'}"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", cfg, f"run.resume={empty}"]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err
    assert list(empty.iterdir()) == []
    assert main(["run", cfg]) == 0
    d = _run_dir(tmp_path / "runs")
    ck = sorted((d / "checkpoints").glob("step_*"))[-1] / "tensors.safetensors"
    blob = bytearray(ck.read_bytes())
    blob[len(blob) // 2] ^= 0x55
    ck.write_bytes(bytes(blob))
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["run", cfg, f"run.resume={d}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "corrupted" in err and "refusing to resume" in err
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()} == before


def test_bad_config_writes_no_run_directory(tiny_config, fresh_host, capsys, tmp_path):
    fresh_host()
    assert main(["run", str(tiny_config()), "model.arch=gpt9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model 'hf_causal_lm': ") and "gpt9" in err and "\n" not in err
    assert not (tmp_path / "runs" / "t").exists()  # neither the run directory nor its <name>/ folder
    assert main(["run", str(tiny_config()), "model.bogus=1"]) == 2
    assert "model.bogus: unknown key" in capsys.readouterr().err


def test_resume_refuses_a_changed_config_and_a_finished_run_keeping_its_record(tiny_config, fresh_host, capsys):
    fresh_host()
    cfg = str(tiny_config(steps=2, ckpt=1))
    assert main(["run", cfg]) == 0
    d = _run_dir(Path(cfg).parent / "runs")
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    capsys.readouterr()
    # a finished run: nothing to do, and its summary/metrics must survive the attempt
    assert main(["run", cfg, f"run.resume={d}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "already finished step 2 of run.steps=2; raise run.steps" in err
    # a changed model/optimizer would load a state that does not fit, or train something else
    assert main(["run", cfg, f"run.resume={d}", "run.steps=4", "recipe.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "run.resume: the config differs from" in err and "at recipe.lr (" in err
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before
    # more steps is what a resume is for
    assert main(["run", cfg, f"run.resume={d}", "run.steps=3"]) == 0
    assert json.loads((d / "summary.json").read_text())["steps"] == 3


def test_a_checkpoint_state_that_does_not_load_is_one_line_and_keeps_the_summary(tiny_config, fresh_host, capsys):
    fresh_host()
    cfg = str(tiny_config(steps=2, ckpt=1))
    assert main(["run", cfg]) == 0
    d = _run_dir(Path(cfg).parent / "runs")
    summary = (d / "summary.json").read_bytes()
    state = sorted((d / "checkpoints").glob("step_*"))[-1] / "state.json"
    data = json.loads(state.read_text())
    data["state"]["s:loop"] = None  # valid JSON with a matching manifest, but not a loop state
    state.write_text(json.dumps(data))
    from plait.checkpoint import _write_manifest
    _write_manifest(state.parent)
    before = _tree(d)
    capsys.readouterr()
    assert main(["run", cfg, f"run.resume={d}", "run.steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not fit this run (TypeError" in err
    assert (d / "summary.json").read_bytes() == summary
    assert _tree(d) == before  # metrics.jsonl not truncated, no purging events file added


def test_a_resume_refused_for_unfit_shapes_leaves_the_run_directory_byte_identical(tiny_config, fresh_host,
                                                                                   capsys):
    # issue 21 item 2: the refusal came after metrics.jsonl was truncated and a purging events file was added
    fresh_host()
    cfg = str(tiny_config(steps=3, ckpt=1))
    assert main(["run", cfg]) == 0
    d = _run_dir(Path(cfg).parent / "runs")
    for old in sorted((d / "checkpoints").glob("step_*"))[:-1]:
        import shutil
        shutil.rmtree(old)
    ck = sorted((d / "checkpoints").glob("step_*"))[-1]
    from safetensors.torch import load_file, save_file

    from plait.checkpoint import _write_manifest
    tensors = load_file(str(ck / "tensors.safetensors"))
    name = next(k for k, v in tensors.items() if k.startswith("task/") and v.dim() == 2)
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
    save_file(tensors, str(ck / "tensors.safetensors"))
    _write_manifest(ck)  # a valid checksum: only the shapes are wrong
    # pretend the run was killed after step 3's metrics but its last checkpoint is step 2's folder name
    ck.rename(ck.with_name("step_00000002"))
    data = json.loads((ck.with_name("step_00000002") / "state.json").read_text())
    data["step"] = 2
    (ck.with_name("step_00000002") / "state.json").write_text(json.dumps(data))
    _write_manifest(ck.with_name("step_00000002"))
    before = _tree(d)
    capsys.readouterr()
    assert main(["run", cfg, f"run.resume={d}", "run.steps=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not fit this run" in err, err
    assert _tree(d) == before


def _tree(d):
    """Every file and folder of a run directory with its bytes: a refused resume must change none."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(d.rglob("*"))}


def test_an_out_dir_that_cannot_be_created_is_one_line(tiny_config, fresh_host, capsys, tmp_path):
    fresh_host()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["run", str(tiny_config()), f"run.out_dir={blocker}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: run.out_dir: cannot create the run directory")


def _nan_at(monkeypatch, bad_step, seen):
    """Make the sft recipe report a NaN loss at ``bad_step`` (after its real update, as a diverging run would),
    recording the weights at the end of each step."""
    from plait.plugins.basics.sft_recipe import SFTRecipe

    real = SFTRecipe.train_step

    def train_step(self, step):
        seen[f"start{step}"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        out = real(self, step)
        seen[step] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return {**out, "train/loss": float("nan")} if step == bad_step else out

    monkeypatch.setattr(SFTRecipe, "train_step", train_step)


def test_a_nonfinite_loss_stops_the_run_as_diverged_keeping_the_last_good_checkpoint(
        tiny_config, fresh_host, capsys, monkeypatch):
    # issue 21 item 7: a NaN loss was logged and training went on
    fresh_host()
    seen = {}
    _nan_at(monkeypatch, 3, seen)
    cfg = str(tiny_config(steps=5, ckpt=1))
    assert main(["run", cfg]) == 1
    err = capsys.readouterr().err.strip()
    assert "step 3: train/loss is nan; stopping (status diverged" in err and err.count("\n") == 0, err
    d = _run_dir(Path(cfg).parent / "runs")
    summary = json.loads((d / "summary.json").read_text())  # strict JSON: a bare NaN would raise here
    assert summary["status"] == "diverged" and summary["diverged_at"] == 3
    assert [p.name for p in sorted((d / "checkpoints").glob("step_*"))][-1] == "step_00000002"
    for line in (d / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert 4 not in seen  # no step after the divergence


def test_on_nonfinite_skip_undoes_that_step_and_counts_it(tiny_config, fresh_host, monkeypatch):
    fresh_host()
    seen = {}
    _nan_at(monkeypatch, 3, seen)
    cfg = str(tiny_config(steps=4, ckpt=0))
    assert main(["run", cfg, "run.on_nonfinite=skip"]) == 0
    # step 4 started from the weights step 2 ended with: step 3's update was undone
    assert all(torch.equal(seen["start4"][k], seen[2][k]) for k in seen[2])
    assert not all(torch.equal(seen[3][k], seen[2][k]) for k in seen[2])  # step 3 had changed them
    d = _run_dir(Path(cfg).parent / "runs")
    summary = json.loads((d / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["skipped_steps"] == 1
    rows = {}
    for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()):
        rows.setdefault(r["step"], {}).update(r)
    assert rows[3]["train/skipped_nonfinite"] == 1.0 and rows[4]["train/skipped_nonfinite"] == 0.0
