"""`plait.distributed.ProcessGroup` in one process (a group of one on a HashStore, gloo): option checks in one line,
the collectives' results against their closed forms at world size 1, a failed collective as a one-line
`DistributedError` (exit 3), ``close`` ending the group; and the ``splits_eval`` capability read by
`plait.run.eval_share` / ``eval_sum`` / ``eval_gather``. The multi-rank behaviour is covered by the strategies'
suites (tests/plugins/parallel, tests/plugins/distzo2), which run on this base."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from plait.distributed import DistributedError, ProcessGroup
from plait.errors import ConfigError
from plait.run import eval_gather, eval_share, eval_sum


@pytest.fixture
def single(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    pg = ProcessGroup(backend="gloo", timeout_s=30)
    yield pg
    pg.close()
    assert not dist.is_initialized()


@pytest.mark.parametrize("kwargs, key", [({"backend": "mpi"}, "parallel.backend"),
                                         ({"timeout_s": 0}, "parallel.timeout_s")])
def test_bad_options_are_one_line_config_errors(kwargs, key):
    with pytest.raises(ConfigError) as exc:
        ProcessGroup(**kwargs)
    text = str(exc.value)
    assert text.startswith(key) and "\n" not in text and exc.value.exit_code == 2
    assert not dist.is_initialized()


def test_bad_world_size_refused_before_the_group_starts(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        ProcessGroup(backend="gloo")
    monkeypatch.setenv("WORLD_SIZE", "0")
    with pytest.raises(ConfigError, match="WORLD_SIZE must be at least 1, got 0"):
        ProcessGroup(backend="gloo")
    assert not dist.is_initialized()


def test_group_of_one(single):
    pg = single
    assert (pg.rank, pg.world_size, pg.backend, pg.device) == (0, 1, "gloo", torch.device("cpu"))
    assert dist.is_initialized() and dist.get_world_size() == 1
    x = torch.tensor([1.5, -2.0])
    torch.testing.assert_close(pg.all_reduce_mean(x), x)  # the mean over one rank is the value
    assert pg.broadcast_object({"dir": "runs/x"}) == {"dir": "runs/x"}
    assert pg._gather_objects("a", "a test gather") == ["a"]
    pg.check_config("run: {seed: 0}\n")  # one rank always agrees with itself
    assert pg.collectives == 4  # every collective went through _collective


def test_failed_collective_is_one_line_distributed_error(single):
    def lost():
        raise RuntimeError("Connection closed by peer [127.0.0.1]:29500\nlong C++ trace …")

    with pytest.raises(DistributedError) as exc:
        single._collective("the step's all-reduce", lost)
    text = str(exc.value)
    assert "\n" not in text and exc.value.exit_code == 3
    assert "rank 0 lost its peers during the step's all-reduce" in text and "parallel.timeout_s=30" in text
    assert text.endswith("Connection closed by peer [127.0.0.1]:29500")


class _Splitting:
    """A strategy that declares it splits evaluation: half the items, sums doubled, values repeated."""

    splits_eval = True

    def eval_share(self, n, align):
        return range(0, n // 2)

    def eval_sum(self, values):
        return [2.0 * v for v in values]

    def eval_gather(self, values):
        return torch.cat([values, values])


class _NotSplitting(_Splitting):
    splits_eval = False  # has the methods (inherited) but declares that it does not split: they must not be used


@pytest.mark.parametrize("parallel", [None, ProcessGroup, _NotSplitting()])
def test_eval_helpers_pass_through_without_splits_eval(parallel):
    run = SimpleNamespace(parallel=parallel)
    v = torch.arange(3.0)
    assert eval_share(run, 5, 2) == range(5)
    assert eval_sum(run, [1, 2.5]) == [1.0, 2.5]
    assert eval_gather(run, v) is v


def test_eval_helpers_use_a_splitting_strategy():
    run = SimpleNamespace(parallel=_Splitting())
    assert eval_share(run, 6) == range(3)
    assert eval_sum(run, [1.0]) == [2.0]
    assert eval_gather(run, torch.ones(2)).shape == (4,)


def test_builtin_strategies_declare_their_eval():
    from plait.plugins.parallel.ddp import DDP
    from plait.plugins.parallel.fsdp import FSDP

    assert DDP.splits_eval is True and FSDP.splits_eval is False  # fsdp: every rank runs every forward
    assert issubclass(DDP, ProcessGroup) and issubclass(FSDP, ProcessGroup)
