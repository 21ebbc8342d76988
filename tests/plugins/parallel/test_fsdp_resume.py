"""A 2-rank ``fsdp`` run stopped after 4 steps and resumed on 2 ranks from its sharded checkpoint equals the
uninterrupted 8-step 2-rank run bit for bit (logged losses and the final full parameters and AdamW moments, read
back from the shards with torch's `dcp_to_torch_save`); resuming on 1 process is refused in one line naming both
world sizes (exit 2); a corrupted shard is refused before torch.distributed.checkpoint reads it; with
run.keep_checkpoints=1 only the newest step folder and its shard folder remain."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.plugins.parallel._runs import losses, run_fsdp

ADAM = ["recipe.optimizer=adamw", "recipe.lr=0.01", "recipe.max_grad_norm=1.0", "run.steps=8"]


def full_state(run_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))[-1]
    state = json.loads((ckpt / "state.json").read_text())["state"]
    out = tmp / f"{run_dir.parent.parent.parent.name}.pt"
    dcp_to_torch_save(str(ckpt.parent / state["s:sharded"]["s:dir"]), str(out))
    return torch.load(out, weights_only=True)


@pytest.mark.slow
def test_fsdp_resume_is_exact_and_keeps_the_world_size(tmp_path):
    full = run_fsdp(tmp_path / "full", *ADAM)
    assert full.returncode == 0, full.stderr[-3000:]
    part = run_fsdp(tmp_path / "part", *ADAM, "run.steps=4")
    assert part.returncode == 0, part.stderr[-3000:]
    (full_dir,) = list((tmp_path / "full" / "runs" / "r").iterdir())
    (part_dir,) = list((tmp_path / "part" / "runs" / "r").iterdir())
    shards = part_dir / "checkpoints" / "shards" / "step_00000004"
    assert sorted(p.name for p in shards.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    wrong = run_fsdp(tmp_path / "part", *ADAM, f"run.resume={part_dir}", nproc=1)
    assert wrong.returncode == 2, wrong.stderr[-2000:]
    err = wrong.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert "written by 2 rank(s), this run has 1" in err

    resumed = run_fsdp(tmp_path / "part", *ADAM, f"run.resume={part_dir}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = losses(full_dir), losses(part_dir)
    assert len(a) == len(b) == 8 and a == b
    fa, fb = full_state(full_dir, tmp_path), full_state(part_dir, tmp_path)
    assert fa.keys() == fb.keys()
    assert any("exp_avg_sq" in k for k in fa) and any(k.startswith("task/model/") for k in fa)
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


@pytest.mark.slow
def test_a_corrupted_shard_is_refused(tmp_path):
    part = run_fsdp(tmp_path / "run", "run.steps=2", "run.ckpt_every=1", "run.keep_checkpoints=1")
    assert part.returncode == 0, part.stderr[-3000:]
    (run_dir,) = list((tmp_path / "run" / "runs" / "r").iterdir())
    ckpts = run_dir / "checkpoints"  # pruning removes a shard folder with its step folder
    assert sorted(p.name for p in ckpts.iterdir()) == ["shards", "step_00000002"]
    assert [p.name for p in (ckpts / "shards").iterdir()] == ["step_00000002"]
    shard = run_dir / "checkpoints" / "shards" / "step_00000002" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    out = run_fsdp(tmp_path / "run", "run.steps=3", f"run.resume={run_dir}")
    assert out.returncode != 0
    assert "__1_0.distcp" in out.stderr and "corrupted" in out.stderr, out.stderr[-2000:]
