"""`plait.distributed.ProcessGroup` in one process (a group of one on a HashStore, gloo): option checks in one line,
the collectives' results against their closed forms at world size 1, a failed collective as a one-line
`DistributedError` (exit 3), ``close`` ending the group. The multi-rank behaviour is covered by the strategies'
suites (tests/plugins/parallel, tests/plugins/distzo2), which run on this base."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from plait.distributed import DistributedError, ProcessGroup
from plait.errors import ConfigError


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


def test_builtin_first_order_strategies_are_process_groups():
    from plait.plugins.parallel.ddp import DDP
    from plait.plugins.parallel.fsdp import FSDP

    assert issubclass(DDP, ProcessGroup) and issubclass(FSDP, ProcessGroup)
