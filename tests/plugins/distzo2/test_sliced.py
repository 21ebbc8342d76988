"""Sliced block upload (``parallel.sliced_upload`` with the ``zo2`` offload policy).

Multi-process (runs of the ``pair`` / ``four`` launches in ``conftest``): ``pertp`` + sliced upload equals the
unsliced ``pertp`` + ``zo2`` run and the single-process run bit for bit; ``zo_ddp`` (2 ranks) and ``zo_2d`` (4
ranks, k = 4) + sliced upload equal the micro-batch oracle; parameter hashes agree on every rank after every
step (each rank writes its whole updated block back to its own host copy: no write-back traffic); every upload
all-gather runs on the dedicated group and moves exactly one block bucket; the step's loss all-gather is still
the only collective on the default group; each rank reads 1/k of the bytes from its host copy.

In one process: `SlicedUpload` emulating any rank of k = 2 or 3 (uneven slices, padding) with fp32 or fp16 host
copies drives the ZO2 engine to exactly the unsliced engine's numbers, so no perturbation depends on which
rank produced which slice; misuse is a one-line error.
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.plugins.distzo2.conftest import FOUR_RUNS, PAIR_RUNS, STEPS
from tests.plugins.distzo2.distzo2_runs import (
    assert_equals_single,
    assert_params_equal,
    final,
    metric_rows,
    records,
    run_dir,
    step_collectives,
    train_rows,
)


def _block_numel() -> int:
    """Elements of one transformer block of the tests' tiny OPT (all its blocks have the same shape)."""
    from plait.plugins.basics.models import build_causal_lm, find_blocks

    model, _ = build_causal_lm(arch="opt", size="tiny")
    _, layers = find_blocks(model)
    sizes = {sum(p.numel() for p in layer.parameters()) for layer in layers}
    assert len(sizes) == 1
    return sizes.pop()


@pytest.mark.slow
def test_distzo2_sliced_pertp_equals_unsliced_and_single_process(pair, references):
    root, results = pair
    single_dir, _ = references
    assert_equals_single(root, results, "pertp_sliced", single_dir)
    assert_params_equal(final(run_dir(root, "pertp_sliced")), final(run_dir(root, "pertp_zo2")))
    assert train_rows(run_dir(root, "pertp_sliced")) == train_rows(run_dir(root, "pertp_zo2"))


@pytest.mark.slow
def test_distzo2_sliced_zo_ddp_and_2d_equal_the_oracle(pair, four, references):
    _, (oracle_rows, oracle_params) = references
    for (root, results), names, name in ((pair, PAIR_RUNS, "ddp_sliced"), (four, FOUR_RUNS, "twod_sliced")):
        for r in results:
            assert records(r.result, names.index(name)) == oracle_rows, (name, r.rank)
        assert train_rows(run_dir(root, name)) == oracle_rows
        assert_params_equal(final(run_dir(root, name)), oracle_params)


@pytest.mark.slow
def test_distzo2_sliced_host_copies_stay_identical(pair, four):
    """Write-back moves nothing between ranks, yet every rank's parameters hash the same after every step."""
    for (_, results), names, name in ((pair, PAIR_RUNS, "pertp_sliced"), (pair, PAIR_RUNS, "ddp_sliced"),
                                      (four, FOUR_RUNS, "twod_sliced")):
        per_rank = [[s["hash"] for s in r.result["steps"][names.index(name)]] for r in results]
        assert len(per_rank[0]) == STEPS and all(h == per_rank[0] for h in per_rank), name
        assert len(set(per_rank[0])) == STEPS  # the parameters change every step


@pytest.mark.slow
def test_distzo2_sliced_gather_bytes_and_one_loss_collective(pair, four):
    n = _block_numel()
    n_blocks = 2  # the tiny OPT's
    for (root, results), names, name, k in ((pair, PAIR_RUNS, "pertp_sliced", 2), (pair, PAIR_RUNS, "ddp_sliced", 2),
                                            (four, FOUR_RUNS, "twod_sliced", 4)):
        assert n % k == 0  # so the bucket splits without padding and the bytes are exactly the block's
        run = names.index(name)
        counts = []
        for r in results:
            # the default group: still exactly the step's one loss all-gather per step
            losses = step_collectives(r.result, run)
            assert [c["step"] for c in losses] == list(range(1, STEPS + 1)) and \
                all(c["op"] == "all_gather" for c in losses), (name, r.rank)
            gathers = [c for c in r.result["collectives"] if c["run"] == run and c["group"] == "sub"]
            assert {c["op"] for c in gathers} <= {"all_gather_single", "all_gather_into_tensor"}
            # each upload all-gather: output = the whole fp32 bucket of a block, input = this rank's 1/k of it
            assert all(c["arg_bytes"] == [n * 4, n * 4 // k] for c in gathers), (name, gathers[:2])
            # one gather per block upload (counted at BlockStore.upload), except the engine's first prefetch,
            # made before the strategy installs the sliced fill; a step uploads every streamed block once
            assert len(gathers) == r.result["uploads"][run] - 1, (name, r.rank)
            assert len(gathers) >= STEPS * n_blocks
            counts.append(len(gathers))
        assert len(set(counts)) == 1  # every rank takes part in every gather
        # each rank reads 1/k of the bytes an unsliced upload reads from its host copy
        up = [row["perf/upload_mib"] for row in metric_rows(run_dir(root, name)) if "perf/upload_mib" in row]
        assert len(up) == STEPS and all(u == n_blocks * n * 4 / k / 2**20 for u in up), up


# --- in one process --------------------------------------------------------------------------------------------

def _engine(model, **kw):
    from plait.plugins.zo2.fused import ZO2Engine
    from plait.plugins.zo2.mezo import MeZO

    m = MeZO(eps=1e-3, lr=1e-3, weight_decay=0.1, distribution="gaussian", q=1, one_sided=False,
             no_decay=["bias", "ln_"], schedule="constant", warmup_steps=0)
    args = dict(blocks=None, overlap=True, bucket=True, storage_dtype="fp32", pin_memory=False, disk_dir=None)
    args.update(kw)
    return ZO2Engine(model, torch.device("cpu"), m, **args)


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 1000, (2, 10), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class _EmulatedRanks:
    """A fill for rank ``rank`` of ``k``: its `SlicedUpload`, whose gather takes the other slices from what the
    peers would read — the same host copy, each peer its own ``bounds`` — and checks what crosses the wire."""

    def __init__(self, rank: int, k: int):
        from plait.plugins.distzo2.sliced import SlicedUpload

        self.k, self.src = k, None
        self.inner = SlicedUpload(rank, k, self.gather)
        self.peers = [SlicedUpload(p, k, self.gather) for p in range(k)]
        self.read = self.wire = 0

    def capacity(self, numel: int) -> int:
        return self.inner.capacity(numel)

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        self.src = src
        got = self.inner(src, dst)
        self.read += got
        return got

    def gather(self, out: torch.Tensor, mine: torch.Tensor) -> None:
        n, c = self.src.numel(), out.numel() // self.k
        assert out.numel() == self.capacity(n) and mine.numel() == c and out.dtype == self.src.dtype
        lo, hi = self.inner.bounds(n)
        assert mine.data_ptr() == out[self.inner.rank * c:].data_ptr()  # in place: the rank's own slot
        assert torch.equal(mine[:hi - lo], self.src[lo:hi])  # what it contributes is its share of the host copy
        out.fill_(float("nan"))  # nothing but what the ranks send may survive the gather
        for p, peer in enumerate(self.peers):
            plo, phi = peer.bounds(n)
            out[p * c:p * c + phi - plo].copy_(self.src[plo:phi])
        self.wire += out.numel() * out.element_size()


@pytest.mark.parametrize("k,rank,storage", [(2, 0, "fp32"), (2, 1, "fp32"), (3, 2, "fp32"), (3, 1, "fp16")])
def test_distzo2_sliced_fill_any_rank_equals_plain_upload(k, rank, storage):
    from plait.plugins.basics.models import build_causal_lm
    from plait.plugins.zo2.mezo import step_seed

    torch.manual_seed(0)
    model, _ = build_causal_lm(arch="opt", size="tiny")
    model.eval()
    ref, eng = _engine(copy.deepcopy(model), storage_dtype=storage), _engine(model, storage_dtype=storage)
    fill = _EmulatedRanks(rank, k)
    eng.set_block_fill(fill)
    n = next(iter(eng.store.blocks.values())).numel
    assert (n % k != 0) == (k == 3)  # k = 3 exercises the padded last slice
    for t in range(3):
        b, seed = _batch(t), step_seed(0, t)
        assert ref.step(b, seed, 1e-3) == eng.step(b, seed, 1e-3), t  # losses and projected gradients
        # each upload read only this rank's share of the bucket from the host
        lo, hi = fill.inner.bounds(n)
        assert eng.stats.bytes_up == eng.stats.uploads * (hi - lo) * (2 if storage == "fp16" else 4)
    sa, sb = ref.state_dict(), eng.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)
    elem = 2 if storage == "fp16" else 4
    assert fill.wire % (fill.capacity(n) * elem) == 0 and fill.wire > 0  # whole (padded) buckets only
    ref.close()
    eng.close()


def test_distzo2_sliced_upload_misuse_is_one_line(tmp_path, fresh_host, capsys):
    from plait.cli import main
    from tests.plugins.distzo2.distzo2_runs import pertp_config

    fresh_host()
    cfg = str(pertp_config(tmp_path))
    assert main(["run", cfg, "parallel.name=zo_ddp", "parallel.sliced_upload=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "parallel.sliced_upload: slices the uploads of streamed blocks; it needs the zo2 " \
                               "offload policy (offload.name: zo2), this run uses InPlaceMeZO" in err
    fresh_host()
    assert main(["run", cfg, "parallel.name=zo_ddp", "parallel.sliced_upload=true", "offload.name=zo2",
                 "offload.bucket=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "parallel.sliced_upload: slices a block's flat bucket; set offload.bucket: true" in err
