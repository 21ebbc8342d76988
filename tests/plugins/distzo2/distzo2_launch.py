"""Launching DistZO2 test ranks as separate processes (gloo on CPU, a free TCP port per launch)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("distzo2_worker.py")
REPO = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RankResult:
    rank: int
    rc: int | None  # None: still running when the launch gave up
    stderr: str
    result: dict | None  # what the worker wrote (codes, per-step records, collectives)
    exit_time: float | None  # time.time() when the process was seen to exit


def launch(world: int, spec: dict, out: Path, timeout: float = 240.0, env: dict | None = None,
           wait_ranks: list[int] | None = None) -> list[RankResult]:
    """Start ``world`` worker ranks with ``spec`` and wait for ``wait_ranks`` (default: all) to exit; kill
    whatever is left then, or after ``timeout``."""
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, out=str(out), spare_port=free_port())
    spec_path = out / "spec.json"
    spec_path.write_text(json.dumps(spec))
    port = free_port()
    procs = []
    for rank in range(world):
        e = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                 LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                 HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
        err = open(out / f"stderr{rank}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(spec_path)], env=e, cwd=REPO,
                                       stdout=subprocess.DEVNULL, stderr=err), err))
    deadline = time.time() + timeout
    exit_times: list[float | None] = [None] * world
    waited = range(world) if wait_ranks is None else wait_ranks
    while time.time() < deadline and any(exit_times[i] is None for i in waited):
        for i, (p, _) in enumerate(procs):
            if exit_times[i] is None and p.poll() is not None:
                exit_times[i] = time.time()
        time.sleep(0.05)
    results = []
    for rank, (p, err) in enumerate(procs):
        if p.poll() is None:
            p.kill()
            p.wait()
            rc = None
        else:
            rc = p.returncode
        err.close()
        path = out / f"rank{rank}.json"
        results.append(RankResult(rank, rc, (out / f"stderr{rank}.txt").read_text(),
                                  json.loads(path.read_text()) if path.exists() else None, exit_times[rank]))
    return results
