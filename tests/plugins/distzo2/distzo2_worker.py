"""One rank of a DistZO2 test launch (started by ``distzo2_launch.launch`` with RANK / WORLD_SIZE / MASTER_* set).

    python distzo2_worker.py SPEC.json

SPEC: ``{"out": dir, "own_group": bool, "spare_port": int, "runs": [{"argv": [...], "rank_argv": {"1": [...]},
"resume": [out, name], "own_group": false, "kill": {"rank": r, "step": s, "signal": "KILL"}}]}``. Each run is
``plait.cli.main(["run", *argv])``. With ``own_group`` the worker starts the gloo process group itself, so that
several runs share it (the strategy then leaves it alone); a run with ``"own_group": false`` (the last ones)
runs after the worker has closed its group, so the strategy starts its own (on ``spare_port``, with
``parallel.timeout_s``). ``kill`` signals a rank at the start of a step of that run. Every ``torch.distributed``
collective called through the ``torch.distributed`` namespace is logged with the run and step it ran in, its
group (``default`` or ``sub``) and the bytes of each tensor argument, and the parameters' SHA-256 after every
step, and the block uploads each run started; ``out/rank<r>.json`` is rewritten after every run (so a rank killed later keeps its earlier results).
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

COLLECTIVES = ("all_gather", "all_gather_object", "all_gather_into_tensor", "all_gather_single", "all_reduce",
               "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "gather", "scatter",
               "gather_object", "scatter_object_list")


def _nbytes(args) -> list[int]:
    """Bytes of each tensor argument (a list of tensors, e.g. an all-gather's outputs, counts as one)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a.numel() * a.element_size())
        elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            out.append(sum(t.numel() * t.element_size() for t in a))
    return out


def main() -> int:
    spec = json.loads(open(sys.argv[1]).read())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    if spec.get("own_group"):
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))

    from plait.cli import main as plait_main
    from plait.plugins.zo2.store import BlockStore
    from plait.plugins.zo2.zo_recipe import ZORecipe

    log: list[dict] = []
    state = {"step": 0, "run": -1}
    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is None:
            continue

        def wrapped(*args, __fn=fn, __name=name, **kwargs):
            out = __fn(*args, **kwargs)
            # bytes: the tensors handed to the call (an all-gather's output list counts every rank's part)
            sizes = _nbytes(args)
            log.append({"run": state["run"], "step": state["step"], "op": __name, "bytes": sum(sizes),
                        "arg_bytes": sizes, "group": "default" if kwargs.get("group") is None else "sub"})
            return out

        setattr(dist, name, wrapped)

    uploads: list[int] = []  # per run: BlockStore uploads that started a transfer (not already on the device)
    base_upload = BlockStore.upload

    def upload(self, b):
        if self.blocks[b].state not in ("uploading", "resident"):
            uploads[state["run"]] += 1
        return base_upload(self, b)

    BlockStore.upload = upload
    records: list[list[dict]] = []
    base_step = ZORecipe.train_step
    def train_step(self, step):
        state["step"] = step
        kill = spec["runs"][state["run"]].get("kill")
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
    out_path = os.path.join(spec["out"], f"rank{rank}.json")
    for i, run in enumerate(spec["runs"]):
        state["run"] = i
        if run.get("own_group", True) is False and dist.is_initialized():
            dist.destroy_process_group()  # the strategy starts its own group on a fresh port
            os.environ["MASTER_PORT"] = str(spec["spare_port"])
        records.append([])
        uploads.append(0)
        argv = run["argv"] + run.get("rank_argv", {}).get(str(rank), [])
        if "resume" in run:  # [out_dir, name]: continue the newest run directory there
            argv = argv + [f"run.resume={sorted((Path(run['resume'][0]) / run['resume'][1]).iterdir())[-1]}"]
        codes.append(plait_main(["run", *argv]))
        sys.stdout.flush()
        sys.stderr.flush()
        with open(out_path + ".tmp", "w") as f:
            json.dump({"codes": codes, "steps": records, "collectives": list(log), "uploads": uploads}, f)
        os.replace(out_path + ".tmp", out_path)
    if dist.is_initialized():
        dist.destroy_process_group()
    return max(codes) if codes else 0


if __name__ == "__main__":
    sys.exit(main())
