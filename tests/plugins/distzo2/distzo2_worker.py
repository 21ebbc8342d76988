"""One rank of a DistZO2 test launch (started by ``distzo2_launch.launch`` with RANK / WORLD_SIZE / MASTER_* set).

    python distzo2_worker.py SPEC.json

SPEC: ``{"out": dir, "own_group": bool, "runs": [{"argv": [...], "rank_argv": {"1": [...]}, "resume": [out, name]}],
"kill": {"rank": r, "step": s, "signal": "KILL"}}``. Each run is ``plait.cli.main(["run", *argv])``. With
``own_group`` the worker starts the gloo process group itself, so that several runs share it (the strategy
then leaves it alone). Every ``torch.distributed`` collective called through the ``torch.distributed``
namespace is logged with the step it ran in, and the parameters' SHA-256 after every step, into
``out/rank<r>.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

COLLECTIVES = ("all_gather", "all_gather_object", "all_gather_into_tensor", "all_reduce", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "gather", "scatter",
               "gather_object", "scatter_object_list")


def _nbytes(args) -> int:
    total = 0
    for a in args:
        if isinstance(a, torch.Tensor):
            total += a.numel() * a.element_size()
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            total += sum(t.numel() * t.element_size() for t in a)
    return total


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    if spec.get("own_group"):
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))

    from plait.cli import main as plait_main
    from plait.plugins.zo2.recipe import ZORecipe

    log: list[dict] = []
    state = {"step": 0, "run": -1}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, __fn=fn, __name=name, **kwargs):
            out = __fn(*args, **kwargs)
            # bytes: the tensors handed to the call (an all-gather's output list counts every rank's part)
            log.append({"run": state["run"], "step": state["step"], "op": __name, "bytes": _nbytes(args)})
            return out

        setattr(dist, name, wrapped)

    records: list[list[dict]] = []
    base_step = ZORecipe.train_step
    kill = spec.get("kill")

    def train_step(self, step):
        state["step"] = step
        if kill and kill["rank"] == rank and kill["step"] == step:
            with open(os.path.join(spec["out"], "killed_at"), "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), getattr(signal, f"SIG{kill.get('signal', 'KILL')}"))
        metrics = base_step(self, step)
        h = hashlib.sha256()
        for p in self.engine.model.parameters():
            h.update(p.detach().to("cpu", torch.float64).numpy().tobytes())
        records[-1].append({"step": step, "hash": h.hexdigest(),
                            **{k: v for k, v in metrics.items() if k.startswith("train/")}})
        state["step"] = 0  # collectives outside train_step are logged at step 0
        return metrics

    ZORecipe.train_step = train_step
    codes = []
    for i, run in enumerate(spec["runs"]):
        state["run"] = i
        records.append([])
        argv = run["argv"] + run.get("rank_argv", {}).get(str(rank), [])
        if "resume" in run:  # [out_dir, name]: continue the newest run directory there
            argv = argv + [f"run.resume={sorted((Path(run['resume'][0]) / run['resume'][1]).iterdir())[-1]}"]
        codes.append(plait_main(["run", *argv]))
        sys.stdout.flush()
        sys.stderr.flush()
    with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
        json.dump({"codes": codes, "steps": records, "collectives": log}, f)
    if spec.get("own_group"):
        dist.destroy_process_group()
    return max(codes) if codes else 0


if __name__ == "__main__":
    sys.exit(main())
