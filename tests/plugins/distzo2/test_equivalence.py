"""DistZO2 over gloo equals the single-process zo recipe: losses, projected gradients and parameters for 10 steps.

References, computed in this process (``conftest.references``):
* ``pertp`` (2 ranks) must equal the single-process ``zo`` run on the same batch, bit for bit (both with the
  in-place engine and with the streamed ``zo2`` engine);
* ``zo_ddp`` (2 ranks) and ``zo_2d`` (4 ranks = 2 pairs × 2 groups) must equal a hand-written MeZO loop that
  evaluates the two micro-batches at each perturbed point and averages g over them (``oracle``).
Also: identical parameter hashes on every rank after every step, exactly one collective per step (an
all-gather of the rank's chunk losses, float64), only rank 0 writes, and a resumed run equals an uninterrupted one.
The ranks run in the two launches of ``conftest`` (``pair``: 2 ranks, ``four``: 4 ranks).
"""
from __future__ import annotations

import pytest

from tests.plugins.distzo2.conftest import FOUR_RUNS, PAIR_RUNS, STEPS
from tests.plugins.distzo2.distzo2_runs import (
    assert_equals_single,
    assert_params_equal,
    final,
    records,
    run_dir,
    step_collectives,
    train_rows,
)


@pytest.mark.slow
def test_distzo2_pertp_equals_single_process(pair, references):
    root, results = pair
    single_dir, _ = references
    for name in ("pertp", "pertp_zo2"):
        assert_equals_single(root, results, name, single_dir)


@pytest.mark.slow
def test_distzo2_zo_ddp_equals_mean_over_micro_batches(pair, references):
    root, results = pair
    _, (oracle_rows, oracle_params) = references
    assert train_rows(run_dir(root, "ddp")) == oracle_rows
    for r in results:
        assert records(r.result, PAIR_RUNS.index("ddp")) == oracle_rows
    assert_params_equal(final(run_dir(root, "ddp")), oracle_params)
    # and zo_ddp is not pertp: the micro-batch split changes the numbers
    assert train_rows(run_dir(root, "ddp")) != train_rows(run_dir(root, "pertp"))


@pytest.mark.slow
def test_distzo2_parameter_hashes_identical_across_ranks(pair, four):
    for (_, results), names, runs in ((pair, PAIR_RUNS, ("ddp", "pertp", "pertp_zo2", "part", "resumed")),
                                      (four, FOUR_RUNS, ("twod",))):
        for name in runs:
            per_rank = [[s["hash"] for s in r.result["steps"][names.index(name)]] for r in results]
            assert per_rank[0] and all(h == per_rank[0] for h in per_rank), name
            assert len(set(per_rank[0])) == len(per_rank[0])  # the parameters change every step


@pytest.mark.slow
def test_distzo2_one_scalar_collective_per_step(pair):
    _, results = pair
    world = 2
    for r in results:
        for name, n_local in (("ddp", 2), ("pertp", 1), ("pertp_zo2", 1)):  # zo_ddp: f⁺ and f⁻ per rank
            run = PAIR_RUNS.index(name)
            in_run = [c for c in r.result["collectives"] if c["run"] == run]
            steps = [c for c in in_run if c["step"] > 0]
            assert [c["step"] for c in steps] == list(range(1, STEPS + 1))  # exactly one per step
            # an all-gather of n_local float64 scalars: input tensor + world output parts
            assert all(c["op"] == "all_gather" and c["bytes"] == (1 + world) * n_local * 8 for c in steps)
            # outside the steps: start-up only (config digest, run directory, initial-parameter digest)
            assert [c["op"] for c in in_run if c["step"] == 0] == ["all_gather_object", "broadcast_object_list",
                                                                   "all_gather_object"]


@pytest.mark.slow
def test_distzo2_resume_equals_uninterrupted(pair):
    root, results = pair
    full, part = run_dir(root, "pertp"), run_dir(root, "part")
    assert train_rows(part) == train_rows(full)
    assert_params_equal(final(part), final(full))
    assert [s["step"] for s in results[1].result["steps"][PAIR_RUNS.index("resumed")]] == list(range(5, STEPS + 1))


@pytest.mark.slow
def test_distzo2_resume_with_another_world_size_is_one_line(pair, capsys):
    from plait import manager
    from plait.cli import main

    root, _ = pair
    manager.reset_host()
    code = main(["run", str(root / "cfg.yaml"), "~parallel", f"run.resume={run_dir(root, 'part')}",
                 "run.steps=20"])  # (a run that already reached run.steps is refused before this check)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "written by 2 process(es); resume with the same world size (this run has 1)" in err
    assert "\n" not in err


@pytest.mark.slow
def test_distzo2_2d_four_ranks_equals_oracle(four, references):
    root, results = four
    _, (oracle_rows, oracle_params) = references
    run = FOUR_RUNS.index("twod")
    for r in results:
        assert records(r.result, run) == oracle_rows
        steps = step_collectives(r.result, run)
        assert [c["step"] for c in steps] == list(range(1, STEPS + 1))
        assert all(c["op"] == "all_gather" and c["bytes"] == (1 + 4) * 1 * 8 for c in steps)
    assert train_rows(run_dir(root, "twod")) == oracle_rows
    assert_params_equal(final(run_dir(root, "twod")), oracle_params)
