"""Run every CPU benchmark script in ``benchmarks/<method>/`` and write one JSON summary (``make bench``).

Each script runs as its own subprocess (``sys.executable benchmarks/<method>/<stem>.py ARGS``, cwd = the repository root),
by default in a *quick mode*: the small flags in ``QUICK_ARGS`` below, chosen from each script's own argparse
flags so that the whole set finishes in a few minutes on 2 CPU cores. The figures of a quick run are a smoke
test of the scripts, not measurements: the sizes are too small for the goals in benchmarks/README.md to mean
anything. ``--full`` runs every script with its own defaults instead (tens of minutes; raise ``--timeout``).

Every script prints one JSON object on stdout (progress on stderr). The summary holds, per script: the command
line, the exit status, the wall seconds and the parsed JSON object, or, when the script failed (non-zero exit,
timeout, no JSON on stdout), the tail of its stderr; ``inner_errors`` lists any ``"error"`` entries inside a
parsed JSON (a variant that failed while the script still exited 0). It is written atomically (tmp file +
``os.replace``) after every script, so an interrupted run leaves the results so far, and printed on stdout at
the end; one progress line per script goes to stderr. Exit status 0 if every script succeeded, 1 otherwise.

    .venv/bin/python benchmarks/run_all.py                          # quick mode, runs/bench/summary.json
    .venv/bin/python benchmarks/run_all.py --only zo_speed,dp_speed --out /tmp/bench.json
    .venv/bin/python benchmarks/run_all.py --full --timeout 3600     # every script with its defaults

Not run: ``zo_larger_than_ram.py`` and the GPU scripts (see ``SKIPPED``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Quick-mode arguments per script (stem -> argv), in the order the scripts run; each comment says what the flags
# shrink and the wall time of two quick runs on a shared 2-core machine (2026-12-04, torch 2.13 CPU; the second
# with another job's test suite running, load average 2-4). All nine in one run: 308 s (~200 s when quieter).
QUICK_ARGS: dict[str, list[str]] = {
    # Attribution, `--quick` (benchmarks/sam_if/attribution.py QUICK): SAM influence on digits (logistic regression only,
    # 200 train / 50 test, 20 LOO points, 100 SGD steps, one cross-check point; defaults: lr+mlp, 600/200, 120
    # LOO), the tiny-OPT LM case at 24 examples / 8 steps and the PiT image case at 60 images / 20 steps with 4
    # retrained subsets (defaults: 200 / 200 and 400 / 150 with 40 subsets). 18 s of CPU; 99 s wall
    # at load average 12-14 (2026-12-05), 9-10 s before the two new cases.
    "attribution": ["--quick"],
    # Capsule: one seed, 10 training steps per depth/classify run, 2 worker processes, then the fps part
    # (always at its fixed sizes; defaults: 3 seeds, 300 steps, 3 jobs). 11-14 s.
    "capsule": ["--seeds", "1", "--depth-steps", "10", "--cls-steps", "10", "--jobs", "2"],
    # Composition: every configs/compose/ first-order preset and each of its components alone, 6 steps per run,
    # then the five plain recipes on this tree vs the tree before the shared step (git archive 03ef209), 2
    # interleaved rounds of 8 steps (defaults: the presets' own steps, 4 rounds of 30 steps). 165 s (2026-12-05, load
    # average < 1); expect more under load. 2026-12-05 at load average 11 -> 3 it hit the 300 s timeout and the
    # whole quick run took 581 s, so quick mode now compares old/new trees on the sft recipe only (4 children
    # instead of 20; `compose.py --quick` alone still runs all five).
    "compose": ["--quick", "--recipes", "sft"],
    # DistZO2: OPT "tiny", batch 8, seq 32, 10 steps in windows of 5 (one window after the warm-up one is left),
    # single + pertp + zo_ddp through `plait run` / torchrun on gloo (defaults: "small", batch 16, 25 steps). 28-30 s.
    "dist_zo": ["--size", "tiny", "--batch", "8", "--seq", "32", "--steps", "10", "--window", "5"],
    # FlashDP vs Opacus peak RSS: every variant's child, GPT-2 shrunk to vocab 512, n_embd 64, 1 layer, batch 4,
    # seq 32, 2 steps (defaults: 2048/256/2 layers, batch 8, seq 128, 3 steps); ~5 s of imports per child. 35-77 s.
    "dp_memory": ["--vocab", "512", "--d-model", "64", "--layers", "1", "--heads", "2", "--batch", "4",
                  "--seq", "32", "--steps", "2"],
    # FlashDP vs Opacus step time: same shrunk GPT-2, 1 warm-up + 3 timed rounds (defaults: 2 + 8). 8-18 s.
    "dp_speed": ["--vocab", "512", "--d-model", "64", "--layers", "1", "--heads", "2", "--batch", "4",
                 "--seq", "32", "--warmup", "1", "--steps", "3", "--max-rounds", "8", "--max-seconds", "30"],
    # DP-ZO vs ZO vs DP-SGD on the bundled OPT: 20 steps per variant, one repeat (defaults: 300 steps). 60-70 s.
    "dp_zo": ["--quick"],
    # Infinite-Sampling schedulers: Qwen3 "tiny", G 8 completions, g 4 rows, max 64 new tokens, 1 repeat, 5
    # predictor steps (defaults: "small", G 32, g 8, 256 new, 2 repeats, 30 steps). 5-10 s.
    "sampling": ["--size", "tiny", "--G", "8", "--g", "4", "--max-new", "64", "--repeats", "1",
                 "--predictor-steps", "5"],
    # WiP attention on the bundled LM: 16 calibration and 16 eval blocks, 5 fine-tune steps, every operator
    # (defaults: 192 calib blocks, the whole eval split, 100 steps); the slowest quick run (the emulated mitchell
    # forward alone is ~40x exact on CPU). 45-77 s.
    "wip": ["--calib-blocks", "16", "--eval-blocks", "16", "--steps", "5"],
    # ZO peak RSS: OPT "small" instead of "100m", 2 steps, every variant's child (disk variant included). 35-67 s.
    "zo_memory": ["--size", "small", "--steps", "2"],
    # ZO2 vs MeZO step time: OPT "tiny", 1 warm-up + 3 timed rounds, every variant (defaults: "small", 2 + 15).
    # 6-7 s.
    "zo_speed": ["--size", "tiny", "--steps", "3", "--warmup", "1", "--max-rounds", "8", "--max-seconds", "30"],
}

# Scripts in benchmarks/ that this runner never starts, with the reason (reported in the summary).
SKIPPED: dict[str, str] = {
    "zo_larger_than_ram": "writes ~25 GB of fp16 shards to disk and runs for about an hour; run it by hand "
                          "(see its docstring; --layers 4 --steps 2 for a quick look)",
    "gpu/": "the GPU scripts (benchmarks/<method>/*_gpu.py, benchmarks/gpu/) need a CUDA GPU; run "
            "`OUT=<dir> bash benchmarks/gpu/run_all.sh` on a GPU machine",
}

STDERR_TAIL_CHARS = 4000


def log(msg: str, end: str = "\n") -> None:
    print(msg, file=sys.stderr, end=end, flush=True)


def last_json_object(text: str):
    """The last JSON object printed on ``text``: the last line starting with '{' that decodes to a dict
    (the scripts print either one compact line or an indented object whose nested lines are indented)."""
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch == "{" and (i == 0 or text[i - 1] == "\n")]
    for i in reversed(starts):
        try:
            obj, _ = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def inner_errors(obj, path: str = "") -> list[str]:
    """Every ``"error"`` entry inside a script's JSON (a variant that failed while the script itself exited 0)."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == "error" and isinstance(v, str):
                found.append(f"{path or '.'}: {v[:300]}")
            else:
                found += inner_errors(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += inner_errors(v, f"{path}[{i}]")
    return found


def _tail(text: str, n: int = STDERR_TAIL_CHARS) -> str:
    text = text.rstrip()
    return text if len(text) <= n else "..." + text[-n:]


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the fields after "(comm) state"
        children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill the script and everything it started: its process group, plus descendants that made their own
    session (torchrun starts its workers with ``start_new_session``), found before anything dies."""
    for _ in range(3):
        pids = _descendants(proc.pid)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if not pids:
            break


def script_path(stem: str) -> Path:
    """``benchmarks/<method>/<stem>.py``: the one script of that name (stems are unique across the folders)."""
    found = sorted(HERE.glob(f"*/{stem}.py"))
    if len(found) != 1:
        raise SystemExit(f"run_all: {len(found)} scripts named {stem}.py in {HERE}/*/ (want exactly one)")
    return found[0]


def run_script(stem: str, args: list[str], timeout: float) -> dict:
    rel = str(script_path(stem).relative_to(REPO))
    cmd = [sys.executable, rel, *args]
    entry: dict = {"cmd": cmd, "cmd_line": shlex.join(cmd)}
    # The script's temp files (shard dirs, run dirs) go to a private TMPDIR removed afterwards, so a script killed
    # by the timeout leaves nothing behind in the system temp directory.
    tmpdir = tempfile.mkdtemp(prefix=f"run_all-{stem}-")
    env = dict(os.environ, TMPDIR=tmpdir)
    t0 = time.perf_counter()
    try:
        # Own session/process group, so a timeout or Ctrl-C kills the script's children too (see _kill_tree).
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:  # a grandchild escaped and holds the pipes open
                proc.kill()
                out, err = "", ""
        except BaseException:  # Ctrl-C / SIGTERM: do not leave the benchmark running
            _kill_tree(proc)
            proc.wait()
            raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    entry["returncode"] = proc.returncode
    entry["wall_s"] = round(time.perf_counter() - t0, 1)
    entry["timed_out"] = timed_out
    result = last_json_object(out or "")
    if timed_out:
        entry["ok"] = False
        entry["error"] = f"timed out after {timeout:g} s (killed); stderr tail:\n{_tail(err or '')}"
    elif proc.returncode != 0:
        entry["ok"] = False
        entry["error"] = f"exit status {proc.returncode}; stderr tail:\n{_tail(err or '')}"
    elif result is None:
        entry["ok"] = False
        entry["error"] = (f"exit status 0 but no JSON object on stdout; stdout tail:\n{_tail(out or '', 1000)}\n"
                          f"stderr tail:\n{_tail(err or '')}")
    else:
        entry["ok"] = True
        entry["inner_errors"] = inner_errors(result)
        entry["result"] = result
    return entry


def write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600; give the summary the usual mode
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="scripts: " + ", ".join(QUICK_ARGS)
                                 + "; skipped: " + ", ".join(SKIPPED))
    ap.add_argument("--only", default=None, help="comma-separated subset of script stems (e.g. zo_speed,dp_speed)")
    ap.add_argument("--full", action="store_true", help="run each script with its own defaults, not the quick flags "
                    "(tens of minutes in all; attribution alone takes 10-20 min, so raise --timeout)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per script before it is killed (default 300)")
    ap.add_argument("--out", default="runs/bench/summary.json",
                    help="summary JSON path, relative to the repository root unless absolute "
                         "(default runs/bench/summary.json)")
    return ap.parse_args(argv)


def _on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_script, which kills the running script's tree


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    stems = list(QUICK_ARGS)
    if args.only:
        wanted = [s.strip().removesuffix(".py") for s in args.only.split(",") if s.strip()]
        for s in wanted:
            if s in SKIPPED:
                raise SystemExit(f"run_all: {s} is not run by this script ({SKIPPED[s]})")
            if s not in QUICK_ARGS:
                raise SystemExit(f"run_all: unknown script {s!r}; known: {', '.join(QUICK_ARGS)}")
        stems = [s for s in stems if s in wanted]
    out_path = Path(args.out)
    if not out_path.is_absolute():
        out_path = REPO / out_path
    mode = "full" if args.full else "quick"
    summary: dict = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mode": mode,
        "timeout_s": args.timeout,
        "python": sys.executable,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min_start": round(os.getloadavg()[0], 2),
        "ok": None,
        "n_ok": 0,
        "n_failed": 0,
        "total_wall_s": None,
        "scripts": {},
        "skipped": dict(SKIPPED),
    }
    log(f"[run_all] {len(stems)} script(s), {mode} mode, timeout {args.timeout:g} s each -> {out_path}")
    t0 = time.perf_counter()
    for k, stem in enumerate(stems, 1):
        log(f"[run_all {k}/{len(stems)}] {stem} ... ", end="")
        entry = run_script(stem, [] if args.full else QUICK_ARGS[stem], args.timeout)
        summary["scripts"][stem] = entry
        summary["n_ok" if entry["ok"] else "n_failed"] += 1
        summary["total_wall_s"] = round(time.perf_counter() - t0, 1)
        write_atomic(out_path, summary)
        if entry["ok"]:
            n_inner = len(entry["inner_errors"])
            status = f"ok ({n_inner} variant error(s) inside its JSON)" if n_inner else "ok"
        else:
            status = "TIMEOUT" if entry["timed_out"] else f"FAILED (exit {entry['returncode']})"
        log(f"{status} in {entry['wall_s']:.1f} s")
    summary["ok"] = summary["n_failed"] == 0
    summary["total_wall_s"] = round(time.perf_counter() - t0, 1)
    summary["load_avg_1min_end"] = round(os.getloadavg()[0], 2)
    write_atomic(out_path, summary)
    print(json.dumps(summary, indent=2), flush=True)
    log(f"[run_all] {summary['n_ok']}/{len(stems)} ok in {summary['total_wall_s']:.1f} s; summary: {out_path}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
