"""DistZO2 bad input and failures: one-line errors on every rank, a dead or hung rank ends the others' run.

The multi-process cases are runs of the shared launches in ``conftest`` (``pair``, ``four``).

Also the pieces the launch tests cannot reach cheaply: the chunk split for q > 1 and the loss recombination.
"""
from __future__ import annotations

import pytest
import torch

from tests.plugins.distzo2.conftest import FOUR_RUNS, HUNG_TIMEOUT_S, PAIR_RUNS
from tests.plugins.distzo2.distzo2_runs import pertp_config


def _one_line(err: str) -> str:
    err = err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("world,overrides,match", [
    (3, [], "parallel 'pertp': needs an even world size (rank pairs), got WORLD_SIZE=3"),
    (1, [], "parallel 'pertp': needs an even world size (rank pairs), got WORLD_SIZE=1"),
    (4, [], "parallel 'pertp': one rank pair only, got WORLD_SIZE=4; use parallel.name=zo_2d"),
    (3, ["parallel.name=zo_2d"], "parallel 'zo_2d': the world size must be a multiple of 2"),
    (1, ["parallel.backend=mpi"], "parallel.backend: 'mpi' is not supported; allowed: auto, gloo, nccl"),
    (1, ["parallel.name=zo_ddp", "parallel.timeout_s=0"], "parallel.timeout_s: must be > 0"),
])
def test_distzo2_bad_world_or_options_is_one_line_exit_2(tmp_path, fresh_host, capsys, monkeypatch, world,
                                                          overrides, match):
    from plait.cli import main

    fresh_host()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", str(world))
    assert main(["run", str(pertp_config(tmp_path)), *overrides]) == 2
    assert match in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_distzo2_nccl_without_cuda(tmp_path, fresh_host, capsys):
    from plait.cli import main

    fresh_host()
    assert main(["run", str(pertp_config(tmp_path)), "parallel.name=zo_ddp", "parallel.backend=nccl"]) == 2
    assert "parallel.backend: 'nccl' needs CUDA, which is not available here" in _one_line(capsys.readouterr().err)


@pytest.mark.slow
def test_distzo2_zo_ddp_on_one_process_equals_plain_zo(tmp_path, fresh_host):
    """Without torchrun zo_ddp is a group of one (no network): the run equals the plain zo run bit for bit."""
    from safetensors.torch import load_file

    from plait.config import load_config
    from plait.run import execute

    fresh_host()
    a = execute(load_config(pertp_config(tmp_path), ["run.name=a", "parallel.name=zo_ddp"]))
    b = execute(load_config(pertp_config(tmp_path), ["run.name=b", "~parallel"]))
    ta, tb = (load_file(str(next((r.dir / "checkpoints").glob("step_*")) / "tensors.safetensors")) for r in (a, b))
    model_keys = [k for k in tb if k.startswith("task/model/")]
    assert model_keys and all(torch.equal(ta[k], tb[k]) for k in model_keys)
    assert (a.dir / "metrics.jsonl").read_text().count("train/loss") == 3
    assert a.summary["final"]["train/loss"] == b.summary["final"]["train/loss"]


def _bare(cls, world: int, rank: int):
    """A strategy object with its layout set, without a process group (for the pure parts)."""
    s = object.__new__(cls)
    s.world_size, s.rank = world, rank
    s.dp = world // cls.pert
    s.group, s.member = divmod(rank, cls.pert)
    return s


def _mezo(**kw):
    from plait.plugins.zo2.mezo import MeZO

    opts = dict(eps=1e-3, lr=1e-3, weight_decay=0.0, distribution="gaussian", q=1, one_sided=False,
                no_decay=[], schedule="constant", warmup_steps=0)
    opts.update(kw)
    return MeZO(**opts)


def test_distzo2_batch_and_one_sided_checks():
    from plait.errors import ConfigError
    from plait.plugins.distzo2.strategies import PertP, TwoD, ZoDDP

    s = _bare(ZoDDP, 3, 1)
    assert s.local_batch([5, 6, 7, 8, 9, 10]) == [7, 8]
    with pytest.raises(ConfigError, match="recipe.batch_size: 4 is not divisible by the 3 data-parallel groups"):
        s.local_batch([0, 1, 2, 3])
    assert _bare(TwoD, 4, 3).local_batch([0, 1, 2, 3]) == [2, 3]  # rank 3 = member 1 of group 1
    with pytest.raises(ConfigError, match="perturbation.one_sided: parallel 'pertp' splits"):
        _bare(PertP, 2, 0).wrap_perturbation(_mezo(one_sided=True))
    assert _bare(ZoDDP, 2, 0).wrap_perturbation(_mezo(one_sided=True)).n_chunks == 2  # ddp keeps all chunks


def test_distzo2_chunk_split_and_recombination_q3():
    """q = 3 on zo_2d with 2 groups: member 0 runs the f⁺ chunks, member 1 the f⁻ ones; g_j = mean over groups."""
    from plait.plugins.distzo2.strategies import TwoD

    m = _mezo(q=3)
    wrapped = [_bare(TwoD, 4, r).wrap_perturbation(m) for r in range(4)]
    assert [w.n_chunks for w in wrapped] == [3, 3, 3, 3]
    # sample j, shift 0 → global chunk 2j (f⁺, member 0, local j); shift 1 → 2j+1 (f⁻, member 1, local j)
    assert [wrapped[0].chunk_of(j, 0) for j in range(3)] == [0, 1, 2]
    assert [wrapped[0].chunk_of(j, 1) for j in range(3)] == [None] * 3
    assert [wrapped[1].chunk_of(j, 1) for j in range(3)] == [0, 1, 2]
    assert all(w.chunk_of(j, 2) is None for w in wrapped for j in range(3))  # the restore has no forward
    # each group's full loss list in single-process order: [f⁺_0, f⁻_0, f⁺_1, f⁻_1, f⁺_2, f⁻_2]
    full = [[1.0, 0.5, 2.0, 2.25, 3.0, 2.0], [1.5, 1.0, 2.5, 2.0, 4.0, 4.5]]
    local = {r: [full[r // 2][c] for c in range(6) if c % 2 == r % 2] for r in range(4)}
    for r, w in enumerate(wrapped):
        w.strategy.all_gather_scalars = lambda values, r=r: [local[k] for k in range(4)]
        assert local[r] == full[r // 2][r % 2::2]  # member 0: f⁺ chunks, member 1: f⁻ chunks
        grads = w.estimate(local[r])
        want = [(m.estimate(full[0])[j] + m.estimate(full[1])[j]) / 2 for j in range(3)]
        assert grads == want
        assert w.last_losses == [(full[0][c] + full[1][c]) / 2 for c in range(6)]


@pytest.mark.slow
def test_distzo2_config_mismatch_fails_on_every_rank(pair):
    """The first run of the ``pair`` launch gives rank 1 another learning rate: both ranks exit 2, one line."""
    root, results = pair
    for r in results:
        assert r.result["codes"][PAIR_RUNS.index("mismatch")] == 2
        lines = [line for line in r.stderr.splitlines() if "the resolved config differs between ranks" in line]
        assert len(lines) == 1 and "(rank 1 has sha256" in lines[0], r.stderr[-2000:]
        assert _one_line(lines[0]).startswith("error: parallel 'pertp':")
    assert not (root / "runs" / "mismatch").exists()


def _failed_within_timeout(r, killed_at: float, timeout_s: float, name: str) -> None:
    assert r.rc == 3, r.stderr[-2000:]
    assert r.exit_time - killed_at < timeout_s + 15  # the collective gives up; slack for a busy machine
    assert f"parallel {name!r}: rank {r.rank} lost its peers during the step's loss all-gather" in r.stderr


@pytest.mark.slow
def test_distzo2_hung_rank_ends_the_others_after_the_timeout(pair):
    """Last run of ``pair`` (own group, parallel.timeout_s = 4): rank 1 stopped at step 3; rank 0 waits the
    timeout, then exits 3 with the one-line error."""
    root, results = pair
    killed_at = float((root / "launch" / "killed_at").read_text())
    r0 = results[0]
    _failed_within_timeout(r0, killed_at, HUNG_TIMEOUT_S, "pertp")
    assert r0.exit_time - killed_at >= HUNG_TIMEOUT_S * 0.9  # a hung peer is waited for, up to the timeout
    assert [s["step"] for s in r0.result["steps"][PAIR_RUNS.index("hung")]] == [1, 2]


@pytest.mark.slow
def test_distzo2_dead_rank_ends_the_others(four):
    """Last run of ``four`` (zo_2d): rank 3 killed at step 3; ranks 0-2 exit 3 with the one-line error, promptly."""
    root, results = four
    killed_at = float((root / "launch" / "killed_at").read_text())
    for r in results[:3]:
        _failed_within_timeout(r, killed_at, 60, "zo_2d")
        assert [s["step"] for s in r.result["steps"][FOUR_RUNS.index("killed")]] == [1, 2]
    assert results[3].rc == -9  # SIGKILL
