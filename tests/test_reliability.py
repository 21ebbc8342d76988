"""Issue 21: the reliability probes, run as a hostile user would. Every bad input must give one line on stderr,
exit 2 (1 for I/O) and write nothing; docs/reliability.md holds the table this module checks
(``PLAIT_UPDATE_DOCS=1 pytest tests/test_reliability.py -k table`` rewrites it)."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from plait.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"

TINY = """\
run: {{name: t, seed: 0, steps: 2, log_every: 1, eval_every: 0, ckpt_every: 0, out_dir: {out}, progress: false}}
recipe: {{name: sft, lr: 3.0e-3, batch_size: 4, eval_batch_size: 32}}
model: {{name: hf_causal_lm, arch: opt, size: tiny}}
data: {{name: synthetic_sentiment, n_train: 32, n_eval: 8}}
"""
GT = "grad_transform={name: flashdp, noise_multiplier: 1.0, delta: 1.0e-3"

# (probe id, config text or None for TINY, overrides, expected exit, a fragment the one line must hold)
OVERRIDES = [
    ("run.steps=-1", "run.steps: must be a non-negative"),
    ("run.steps=1e23", "run.steps: must be an integer"),
    ("run.steps=2.5", "run.steps: must be an integer"),
    ("run.steps=abc", "run.steps"),
    ("run.steps=99999999999999999999", "run.steps"),
    ("run.log_every=0", "run.log_every: must be at least 1"),
    ("run.log_every=-3", "run.log_every"),
    ("run.eval_every=-1", "run.eval_every"),
    ("run.ckpt_every=-1", "run.ckpt_every"),
    ("run.keep_checkpoints=-1", "run.keep_checkpoints"),
    ("run.seed=-1", "run.seed"),
    ("run.seed=99999999999999999999", "run.seed"),
    ("run.seed=1.5", "run.seed: must be an integer"),
    ("run.device=tpu", "run.device"),
    ("run.device=cuda:x", "run.device"),
    ("run.bogus=1", "run.bogus"),
    ("run.on_nonfinite=ignore", "run.on_nonfinite"),
    ("run.progress=maybe", "run.progress"),
    ("run=3", "run: must be a mapping"),
    ("recipe=[1,2]", "recipe: must be a mapping"),
    ("model=3", "model: must be a mapping"),
    ("data=[]", "data: must be a mapping"),
    ("recipe.lr=inf", "recipe.lr: must be a finite number"),
    ("recipe.lr=nan", "recipe.lr: must be a finite number"),
    ("recipe.lr=1e400", "recipe.lr: must be a finite number"),
    ("recipe.lr=-inf", "recipe.lr: must be a finite number"),
    ("recipe.lr=abc", "recipe.lr"),
    ("recipe.batch_size=1e3", "recipe.batch_size: must be an integer"),
    ("recipe.batch_size=2.5", "recipe.batch_size: must be an integer"),
    ("recipe.batch_size=0", "batch_size"),
    ("recipe.batch_size=-4", "batch_size"),
    ("recipe.weight_decay=nan", "recipe.weight_decay: must be a finite number"),
    ("recipe.weight_decay=-1", "weight_decay"),
    ("recipe.max_grad_norm=inf", "recipe.max_grad_norm: must be a finite number"),
    ("recipe.optimizer=adamx", "optimizer"),
    ("recipe.bogus=1", "recipe.bogus: unknown key"),
    ("recipe.name=nope", "recipe.name: unknown recipe 'nope'"),
    ("model.name=nope", "model.name: unknown model"),
    ("model.arch=gpt9", "gpt9"),
    ("model.bogus=1", "model.bogus: unknown key"),
    ("data.name=nope", "data.name: unknown"),
    ("data.n_train=1e23", "data.n_train: must be an integer"),
    ("data.bogus=1", "data.bogus: unknown key"),
    ("~recipe", "recipe: missing"),
    ("~model", "model: missing"),
    ("~model.nothing", "no such key"),
    ("~run.steps", "cannot be deleted"),
    ("novalue", "key=value"),
    ("=3", "key=value"),
    ("bogus.x=1", "unknown section 'bogus'"),
    ("perturbation={name: mezo}", "does not use a 'perturbation:' section"),
    ("grad_transform={name: nope}", "unknown grad_transform 'nope'"),
    (GT.replace("1.0,", "nan,") + "}", "grad_transform.noise_multiplier: must be a finite number"),
    (GT + ", max_grad_norm: .inf}", "grad_transform.max_grad_norm: must be a finite number"),
    (GT + ", max_grad_norm: 1e400}", "grad_transform.max_grad_norm: must be a finite number"),
    ("grad_transform={name: flashdp, delta: 1.0e-3}", "exactly one of noise_multiplier and target_epsilon"),
    (GT + ", target_epsilon: 8}", "exactly one of"),
    ("grad_transform={name: flashdp, noise_multiplier: 0}", "gives no privacy"),
    ("grad_transform={name: flashdp, noise_multiplier: 1.0, delta: 2}", "delta"),
    (GT + ", delta: 2}", "duplicate key"),
    (GT + ", max_epsilon: .nan}", "grad_transform.max_epsilon: must be a finite number"),
    (GT + ", max_epsilon: -1}", "max_epsilon must be a finite number > 0"),
    (GT + ", conversion: foo}", "conversion"),
    (GT + ", accountant: foo}", "accountant"),
    ("grad_transform={name: flashdp, target_epsilon: .inf}", "target_epsilon: must be a finite number"),
    (GT + ", poisson: false}", "poisson false gives no privacy"),
    (GT + ", max_epsilon: 0.01}", "max_epsilon: run.steps=2 would spend"),
    ("grad_transform={name: flashdp, target_epsilon: 1.0e-9, delta: 1.0e-3}", "unreachable"),
]

FILES = [
    ("duplicate top-level key", TINY + "recipe: {{name: sft}}\n", "duplicate key 'recipe' at line 5"),
    ("duplicate nested key", TINY.replace("lr: 3.0e-3,", "lr: 3.0e-3, lr: 1.0,"), "duplicate key 'lr' at line 2"),
    ("a YAML list", "- a\n- b\n", "must hold a mapping"),
    ("invalid YAML", "run: {{steps: [\n", "not valid YAML at line"),
    ("not UTF-8", None, "not UTF-8"),
    ("base: itself", "base: c.yaml\n" + TINY, "cycle"),
    ("base: a missing file", "base: nope.yaml\n" + TINY, "base 'nope.yaml' not found"),
    ("base: 3", "base: 3\n" + TINY, "'base' must be a file path"),
    ("unknown section", TINY + "bogus: {{a: 1}}\n", "unknown section 'bogus'"),
    ("run: 3", TINY.replace("run: {{name", "old: {{name").replace("old:", "run: 3\n#", 1),
     "run: must be a mapping"),
    ("run.steps 1e23 (YAML string)", TINY.replace("steps: 2,", "steps: 1e23,"), "run.steps: must be an integer"),
    ("run.steps 3.0 in YAML", TINY.replace("steps: 2,", "steps: 3.0,"), "run.steps: must be an integer"),
    ("lr .nan in YAML", TINY.replace("lr: 3.0e-3", "lr: .nan"), "recipe.lr: must be a finite number"),
    ("lr .inf in YAML", TINY.replace("lr: 3.0e-3", "lr: .inf"), "recipe.lr: must be a finite number"),
    ("an empty file", "", "recipe: missing"),
    ("recipe without name", TINY.replace("name: sft, ", ""), "recipe.name: missing"),
    ("a broken interpolation", TINY.replace("lr: 3.0e-3", "lr: '${{nope}}'"), "cannot resolve interpolation"),
    ("recipe: null and model list", TINY.replace("model: {{name: hf_causal_lm, arch: opt, size: tiny}}",
                                                 "model: [1, 2]"), "model: must be a mapping"),
]

PROBES = ([(f"override `{o}`", None, [o], 2, m) for o, m in OVERRIDES]
          + [(f"config: {label}", text, [], 2, m) for label, text, m in FILES]
          + [("config file missing", "<missing>", [], 2, "not found"),
             ("config path is a folder", "<folder>", [], 2, "is not a file")])


def _probe(tmp_path, text, overrides, capsys):
    out = tmp_path / "runs"
    cfg = tmp_path / "c.yaml"
    if text == "<missing>":
        cfg = tmp_path / "absent.yaml"
    elif text == "<folder>":
        cfg = tmp_path / "folder"
        cfg.mkdir()
    elif text is None and overrides and not overrides[0].startswith("~") and False:
        pass
    elif text is None:
        cfg.write_text(TINY.format(out=out))
    elif text is not None and "not UTF-8" == text:
        pass
    else:
        cfg.write_text(text.format(out=out))
    capsys.readouterr()
    code = main(["run", str(cfg), *overrides])
    captured = capsys.readouterr()
    return code, captured.err.strip(), out


@pytest.mark.parametrize("label,text,overrides,code,fragment", PROBES, ids=[p[0] for p in PROBES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, fresh_host, capsys, label, text, overrides,
                                                         code, fragment):
    fresh_host()
    if label == "config: not UTF-8":
        (tmp_path / "c.yaml").write_bytes(b"run: {name: \xff\xfe}\n")
        text = "<keep>"
    if text == "<keep>":
        capsys.readouterr()
        got = main(["run", str(tmp_path / "c.yaml")])
        err, out = capsys.readouterr().err.strip(), tmp_path / "runs"
    else:
        got, err, out = _probe(tmp_path, text, overrides, capsys)
    assert got == code, err
    lines = [l for l in err.splitlines() if not l.startswith("plait: warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    # nothing written (the out_dir itself may be left empty when the build, not validation, refused)
    assert not out.exists() or not any(out.iterdir()), f"{label}: wrote {sorted(map(str, out.rglob('*')))}"


def test_at_least_70_distinct_bad_inputs():
    assert len(PROBES) >= 70 and len({p[0] for p in PROBES}) == len(PROBES)


def _table() -> str:
    rows = ["| # | input tried | expected | observed (checked by the test) |", "|---|---|---|---|"]
    for i, (label, _, _, code, fragment) in enumerate(PROBES, 1):
        cell = label.replace("|", "\\|")
        rows.append(f"| {i} | {cell} | one line, exit {code}, nothing written | `error: …{fragment.replace('|', '/')}…` |")
    return "\n".join(rows)


def test_the_docs_table_is_current():
    text = DOC.read_text() if DOC.exists() else ""
    begin, end = "<!-- probes:begin -->", "<!-- probes:end -->"
    want = f"{begin}\n{len(PROBES)} bad inputs, each: one line on stderr, exit 2, no run directory.\n\n{_table()}\n{end}"
    if os.environ.get("PLAIT_UPDATE_DOCS"):
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        DOC.write_text(head + want + tail)
        text = DOC.read_text()
    assert want in text, "docs/reliability.md is out of date: PLAIT_UPDATE_DOCS=1 pytest tests/test_reliability.py"


# --- lock, concurrent run directories, interrupt, full disk, python reward ----------------------------------

def test_a_second_writer_is_refused_naming_the_holders_pid(tmp_path, fresh_host, capsys):
    from plait.checkpoint import RunLock
    from plait.errors import RunLockedError

    fresh_host()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(out=tmp_path / "runs").replace("ckpt_every: 0", "ckpt_every: 1"))
    assert main(["run", str(cfg)]) == 0
    d = next((tmp_path / "runs" / "t").iterdir())
    assert not (d / ".plait.lock").exists()  # released and removed at the end
    before = {str(p): p.read_bytes() for p in d.rglob("*") if p.is_file()}
    # another process holds it (a real second process: flock is per open file)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from plait.checkpoint import RunLock
        lock = RunLock({str(d)!r}); print("held", flush=True); time.sleep(60)""")], stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert main(["run", str(cfg), f"run.resume={d}", "run.steps=4"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"in use by another plait process (pid {holder.pid})" in err, err
        with pytest.raises(RunLockedError):
            RunLock(d)
    finally:
        holder.kill()
        holder.wait()
    after = {str(p): p.read_bytes() for p in d.rglob("*") if p.is_file() and p.name != ".plait.lock"}
    assert after == before
    assert main(["run", str(cfg), f"run.resume={d}", "run.steps=3"]) == 0  # the holder is gone: resumes


def test_run_directories_created_at_once_are_distinct(tmp_path):
    # before: a check-then-mkdir race; 12 processes in the same second, one failed with "File exists"
    from plait.run import _new_run_dir

    made, errors = [], []

    def make():
        try:
            made.append(_new_run_dir(str(tmp_path), "race"))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=make) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(made)) == 24 and all(p.is_dir() for p in made)


def test_ctrl_c_during_the_model_build_leaves_no_run_directory(tmp_path, fresh_host, monkeypatch, capsys):
    from plait.plugins.basics import sft_recipe

    fresh_host()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_recipe, "build_lm", interrupted)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(out=tmp_path / "runs"))
    assert main(["run", str(cfg)]) == 130
    assert list((tmp_path / "runs").rglob("*")) == []  # before: a run directory holding only config.yaml


def test_a_write_error_while_checkpointing_is_one_line_exit_1_and_keeps_earlier_checkpoints(
        tmp_path, fresh_host, monkeypatch, capsys):
    import errno

    import plait.checkpoint as ck

    fresh_host()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(out=tmp_path / "runs").replace("ckpt_every: 0", "ckpt_every: 1")
                   .replace("steps: 2", "steps: 3"))
    real = ck.save_file

    def full_disk(tensors, filename, *a, **k):
        if "step_00000002" in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ck, "save_file", full_disk)
    assert main(["run", str(cfg)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write checkpoint" in err[0] and "No space left on device" in err[0], err
    d = next((tmp_path / "runs" / "t").iterdir())
    names = sorted(p.name for p in (d / "checkpoints").iterdir())
    assert names == ["step_00000001"]  # no .tmp-step_* left, the earlier one untouched
    ck.Checkpointer.load(d / "checkpoints" / "step_00000001")
    monkeypatch.setattr(ck, "save_file", real)
    assert main(["run", str(cfg), f"run.resume={d}"]) == 0


@pytest.mark.slow
def test_a_size_limited_process_gets_one_line_exit_1(tmp_path):
    # a real full disk without root: RLIMIT_FSIZE makes writes past the limit fail with EFBIG (SIGXFSZ ignored)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(TINY.format(out=tmp_path / "runs").replace("ckpt_every: 0", "ckpt_every: 1"))

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    proc = subprocess.run([sys.executable, "-m", "plait", "run", str(cfg)], capture_output=True, text=True,
                          preexec_fn=limit, timeout=300)
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:") or "Traceback" in l]
    assert proc.returncode == 1 and len(lines) == 1 and "cannot write" in lines[0], proc.stderr[-2000:]
    d = next((tmp_path / "runs" / "t").iterdir())
    assert not [p for p in (d / "checkpoints").iterdir() if p.name.startswith(".tmp-")]


def test_the_python_reward_does_not_import_from_the_working_folder(tmp_path, monkeypatch):
    from plait.plugins.infinite_sampling.rewards import PythonCallable

    (tmp_path / "dropped_reward.py").write_text("def fn(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # what `python -m plait` does with the working folder
    with pytest.raises(ValueError, match="cannot import module 'dropped_reward'.*not imported from the working"):
        PythonCallable("dropped_reward:fn")
    fn = PythonCallable(f"file:{tmp_path / 'dropped_reward.py'}:fn")  # explicit: the config names the file
    assert fn(["a", "b"], ["x", "y"]) == [1.0, 1.0]
    assert PythonCallable("operator:eq")(1, 1) is True  # an installed module still imports
    with pytest.raises(ValueError, match="not found"):
        PythonCallable(f"file:{tmp_path / 'nope.py'}:fn")
