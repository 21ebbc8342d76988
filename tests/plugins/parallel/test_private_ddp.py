"""Private DDP: a DP transform (flashdp per-layer, dp_flat) under ``parallel: {name: ddp}`` on 2 gloo ranks.

Each rank clips its own samples (the clipped sum, no noise), the sums are all-reduced, and the noise is added
once per step after the reduce from the run's (broadcast) seed; the Poisson draw is over the whole dataset at
the global rate, each rank keeping the drawn examples of its dataset slice. The reference is the plain
single-process run of the same config (no ``parallel:``): with ``reproducible_noise`` the 2-rank run's losses
(10 steps) and final parameters equal it within 1e-6 and ε is the same; with the secret seed (not
reproducible) both ranks still end bit-identical, which needs the seed broadcast from rank 0."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.plugins.parallel._runs import SFT_TINY as CFG
from tests.plugins.parallel._runs import (
    config_file,
    final_tensors,
    launch_ranks,
    losses_by_step,
    only_run,
    run_overrides,
)

STEPS = 10
HELPER = Path(__file__).with_name("_capture_rank.py")
CASES = {  # id: (transform, extra overrides)
    "flashdp": ("flashdp", []),
    "dp_flat": ("dp_flat", []),
    # GPT-2: Conv1D layers and a tied wte = lm_head (two clip groups, one tensor); its dropout keys are its own
    "flashdp-gpt2": ("flashdp", ["model.arch=gpt2", "~model.config",
                                 "model.config={resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}"]),
    # fixed-size batches (no guarantee): each rank its slice of the single-process batch
    "flashdp-no-poisson": ("flashdp", ["grad_transform.poisson=false", "grad_transform.allow_no_privacy=true"]),
}
RUN = run_overrides(3, STEPS)


def _launch(root: Path, transform: str, reproducible: bool, nproc: int, extra: list[str] = ()) -> Path:
    cfg = config_file(root, CFG)
    launch_ranks(HELPER, [str(root), str(cfg), *RUN, f"run.out_dir={root / 'runs'}",
                          f"grad_transform={{name: {transform}, noise_multiplier: 0.8, max_grad_norm: 0.5, "
                          f"reproducible_noise: {str(reproducible).lower()}}}", *extra], nproc)
    return root


def _rank(root: Path, r: int) -> dict:
    return torch.load(root / f"rank{r}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process_with_reproducible_noise(tmp_path, case):
    transform, extra = CASES[case]
    one = _launch(tmp_path / "one", transform, True, 1, extra)
    two = _launch(tmp_path / "two", transform, True, 2, extra)
    ref, got = losses_by_step(only_run(one)), losses_by_step(only_run(two))
    assert len(ref) >= STEPS - 2 and ref.keys() == got.keys()  # (a Poisson draw may be empty: no loss logged)
    assert len(set(ref.values())) > 1  # it trained
    for s in ref:
        assert abs(ref[s] - got[s]) <= 1e-6 * abs(ref[s]), (s, ref, got)
    a, r0, r1 = _rank(one, 0), _rank(two, 0), _rank(two, 1)
    assert a["params"].keys() == r0["params"].keys() == r1["params"].keys() and a["params"]
    for k, x in a["params"].items():
        torch.testing.assert_close(r0["params"][k], x, rtol=1e-6, atol=1e-6, msg=k)
        assert torch.equal(r0["params"][k], r1["params"][k]), k  # every rank applies the identical update
    eps1, eps2 = a["summary"]["privacy/epsilon"], r0["summary"]["privacy/epsilon"]
    if case == "flashdp-no-poisson":
        assert eps1 == eps2 == float("inf")  # no Poisson sampling: no guarantee, on either
    else:
        assert 0 < eps1 < float("inf") and eps2 == pytest.approx(eps1, rel=1e-12)
    assert r0["summary"]["privacy/sample_rate"] == a["summary"]["privacy/sample_rate"] == 6 / 24


@pytest.mark.slow
def test_secret_seed_ranks_end_bit_identical(tmp_path):
    """Without reproducible_noise each rank would draw its own secret seed; rank 0's is broadcast, so both ranks
    sample the same batches and add the same noise: their parameters are equal bit for bit (without the broadcast
    the Poisson draws and the noise would differ per rank)."""
    two = _launch(tmp_path / "two", "flashdp", False, 2)
    r0, r1 = _rank(two, 0), _rank(two, 1)
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    assert r0["summary"]["privacy/guarantee"] == "holds"


def _plait2(root: Path, *extra: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "plait", "run", "--nproc", "2", str(root / "cfg.yaml"), *RUN,
                          f"run.out_dir={root / 'runs'}", "parallel.name=ddp", "parallel.timeout_s=120",
                          "grad_transform={name: flashdp, noise_multiplier: 0.8, max_grad_norm: 0.5, "
                          "reproducible_noise: true}", *extra],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_private_two_rank_resume_is_exact(tmp_path):
    """6 steps then a resume to 10 on 2 ranks equals the uninterrupted 10-step 2-rank run bit for bit: losses,
    final parameters (rank 0's checkpoint) and ε (the accountant's state travels in the checkpoint)."""
    for name in ("full", "part"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cfg.yaml").write_text(CFG)
    _plait2(tmp_path / "full")
    _plait2(tmp_path / "part", "run.steps=6")
    full_dir, part_dir = only_run(tmp_path / "full"), only_run(tmp_path / "part")
    _plait2(tmp_path / "part", f"run.resume={part_dir}")
    assert losses_by_step(only_run(tmp_path / "full")) == losses_by_step(only_run(tmp_path / "part"))
    fa, fb = final_tensors(full_dir), final_tensors(part_dir)
    assert fa.keys() == fb.keys() and fa
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    sa, sb = [json.loads((d / "summary.json").read_text()) for d in (full_dir, part_dir)]
    assert sa["privacy/steps"] == sb["privacy/steps"] == STEPS
    assert sa["privacy/epsilon"] == sb["privacy/epsilon"]
