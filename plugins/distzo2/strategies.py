"""Parallel strategies ``zo_ddp``, ``pertp`` and ``zo_2d``: the ZO step of the ``zo`` recipe on several processes.

The world is laid out as ``dp`` data-parallel groups of ``pert`` consecutive ranks (rank ``r`` is member
``r % pert`` of group ``r // pert``):

=========  ======  ==============  ==================================================================
strategy   pert    dp              what a rank does in a step
=========  ======  ==============  ==================================================================
zo_ddp     1       world           every chunk (f⁺ and f⁻) on its own micro-batch (1/world of the batch)
pertp      2       1               member 0 the f⁺ chunks, member 1 the f⁻ chunks, on the whole batch
zo_2d      2       world / 2       pertp inside a group, on the group's micro-batch (1/dp of the batch)
=========  ======  ==============  ==================================================================

Every rank holds the same parameters and follows the same step seed, and applies *every* in-place shift of the
MeZO step (+εz, -2εz, +εz), but runs only the forwards it owns. Its parameters therefore go through exactly the
floating-point sequence of the single-process step, restore drift included. The step's one collective is an
all-gather of each rank's chunk losses (a few float64 scalars); from it every rank rebuilds each group's
losses, g_d = estimate(losses_d), and g = Σ_d g_d / dp in rank order, so all ranks compute bit-identical g and
apply bit-identical updates. Parameters never travel.

This works with any engine that drives the step through the perturbation object (``n_chunks``, ``shifts``,
``chunk_of``, ``estimate``): `DistMeZO` wraps ``mezo`` and reports only the rank's own chunks, so the plain
in-place engine and the ``zo2`` fused, streamed engine run unchanged.

``sliced_upload`` (``zo2`` only): the ranks of a node share each block upload (`sliced.SlicedUpload`): each
copies 1/k of the block's flat bucket from its host copy and an all-gather on a dedicated process group (so the
step's one loss collective stays alone on the default group) completes it.
"""
from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from plait.distributed import BACKENDS, DistributedError, ProcessGroup, env_int
from plait.errors import ConfigError, PlaitError


class DistZO(ProcessGroup):
    """Base of the DistZO2 strategies: the rank layout (``pert`` × ``dp``) and the ZO step adapters on top of the
    core's process group (`plait.distributed.ProcessGroup`: backend, timeout, start-up, one-line errors)."""

    name = "dist"
    pert = 1  # ranks sharing one perturbation group (the two sides of the difference split across them)

    def __init__(self, backend: str = "auto", timeout_s: float = 300.0, sliced_upload: bool = False):
        self.sliced_upload = bool(sliced_upload)
        self.upload_group: Any = None  # the sliced upload's process group (the ranks of this node)
        super().__init__(backend=backend, timeout_s=timeout_s)
        self.dp = self.world_size // self.pert
        self.group, self.member = divmod(self.rank, self.pert)

    # --- collectives of the ZO step --------------------------------------------------------------------
    def all_gather_scalars(self, values: list[float]) -> list[list[float]]:
        """Every rank's ``values`` (same length everywhere), as float64, in rank order."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        self._collective("the step's loss all-gather", lambda: dist.all_gather(parts, t))
        self.step_bytes = t.numel() * t.element_size() * self.world_size  # own part out, the others' in
        return [p.tolist() for p in parts]

    def close(self) -> None:
        if self.upload_group is not None and dist.is_initialized():
            dist.destroy_process_group(self.upload_group)
        self.upload_group = None
        super().close()

    # --- the zo recipe's adapters ----------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Per-step metrics the zo recipe logs: the bytes of the step's collective (sent + received)."""
        return {"perf/comm_bytes": float(self.step_bytes)}

    def local_batch(self, indices: list[int], uneven: bool = False) -> list[int]:
        """This rank's share of the step's global batch: its data-parallel group's contiguous slice. ``uneven``
        (a Poisson batch of any size): groups ``d < n % dp`` take one example more; a share may be empty."""
        n = len(indices)
        if uneven:
            k, extra = divmod(n, self.dp)
            start = self.group * k + min(self.group, extra)
            return list(indices[start:start + k + (1 if self.group < extra else 0)])
        if n % self.dp:
            raise ConfigError(f"recipe.batch_size: {n} is not divisible by the {self.dp} data-parallel groups of "
                              f"parallel {self.name!r} (world size {self.world_size}); choose a multiple of "
                              f"{self.dp}")
        k = n // self.dp
        return list(indices[self.group * k:(self.group + 1) * k])

    def wrap_perturbation(self, mezo: Any) -> DistMeZO:
        if self.pert > 1:
            if getattr(mezo, "one_sided", False):
                raise ConfigError(f"perturbation.one_sided: parallel {self.name!r} splits f(θ+εz) and f(θ-εz) "
                                  f"across a rank pair; use the central difference (one_sided: false) or zo_ddp")
            if mezo.n_chunks % self.pert:
                raise ConfigError(f"parallel {self.name!r}: {mezo.n_chunks} forward chunks per step cannot be "
                                  f"split across {self.pert} ranks")
        return DistMeZO(mezo, self)

    def wrap_engine(self, engine: Any, mezo: DistMeZO) -> DistEngine:
        if self.sliced_upload:
            self._slice_uploads(engine)
        self._check_same_parameters(engine)
        return DistEngine(engine, mezo)

    def _slice_uploads(self, engine: Any) -> None:
        """Share each streamed block's upload among the ranks of this node (`sliced.SlicedUpload`)."""
        from .sliced import SlicedUpload

        if not hasattr(engine, "set_block_fill"):
            raise ConfigError(f"parallel.sliced_upload: slices the uploads of streamed blocks; it needs the zo2 "
                              f"offload policy (offload.name: zo2), this run uses {type(engine).__name__}")
        if not engine.store.bucket:
            raise ConfigError("parallel.sliced_upload: slices a block's flat bucket; set offload.bucket: true")
        # slices never cross nodes: the gather belongs on the device interconnect, not the network
        local = env_int("LOCAL_WORLD_SIZE", self.world_size)
        if local < 1 or self.world_size % local:
            raise ConfigError(f"parallel.sliced_upload: LOCAL_WORLD_SIZE={local} does not divide the world size "
                              f"{self.world_size}; launch the same number of processes on every node")
        timeout = timedelta(seconds=self.timeout_s)
        if local == self.world_size:
            self.upload_group = dist.new_group(backend=self.backend, timeout=timeout)
        else:
            self.upload_group, _ = dist.new_subgroups(group_size=local, backend=self.backend, timeout=timeout)
        k, rank = dist.get_world_size(self.upload_group), dist.get_rank(self.upload_group)
        gather_fn = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"

        def gather(out: torch.Tensor, mine: torch.Tensor) -> None:
            # looked up per call (not bound once) so that a wrapper of torch.distributed sees it
            self._collective("a sliced block upload's all-gather",
                             lambda: getattr(dist, gather_fn)(out, mine, group=self.upload_group), count=False)

        engine.set_block_fill(SlicedUpload(rank, k, gather))

    def _check_same_parameters(self, engine: Any) -> None:
        """Ranks must start from identical parameters (same seed, deterministic init): compare digests once."""
        digest = state_digest(engine.state_dict())
        digests = self._gather_objects(digest, "the start-up parameter check")
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise PlaitError(f"parallel {self.name!r}: rank {bad[0]} built different initial parameters than rank "
                             f"0 (model initialisation is not deterministic here); load a checkpoint "
                             f"(model.path) instead of a random init")

    def combine(self, local: list[float]) -> tuple[list[float], list[list[float]]]:
        """One all-gather of the local chunk losses → (per-chunk losses averaged over groups, per-group losses).

        Member ``m`` of a group of ``pert`` holds chunks ``m, m + pert, …`` of the single-process order.
        """
        parts = self.all_gather_scalars(local)
        per_group = []
        for d in range(self.dp):
            members = parts[d * self.pert:(d + 1) * self.pert]
            n = sum(len(m) for m in members)
            per_group.append([members[c % self.pert][c // self.pert] for c in range(n)])
        mean = []
        for c in range(len(per_group[0])):
            total = 0.0
            for d in range(self.dp):
                total += per_group[d][c]
            mean.append(total / self.dp)
        return mean, per_group


class ZoDDP(DistZO):
    """``zo_ddp``: same z everywhere, both losses on each rank's micro-batch, g averaged over ranks."""

    name = "zo_ddp"
    pert = 1


class PertP(DistZO):
    """``pertp``: a rank pair shares θ and the seed; one evaluates f(θ+εz), the other f(θ-εz)."""

    name = "pertp"
    pert = 2

    def _check_world(self, world: int) -> None:
        if world < 2 or world % 2:
            raise ConfigError(f"parallel 'pertp': needs an even world size (rank pairs), got WORLD_SIZE={world}; "
                              f"use torchrun --nproc-per-node 2, or zo_2d / zo_ddp for other sizes")
        if world > 2:
            raise ConfigError(f"parallel 'pertp': one rank pair only, got WORLD_SIZE={world}; use parallel.name=zo_2d "
                              f"to add data parallelism across {world // 2} pairs")


class TwoD(DistZO):
    """``zo_2d``: PertP pairs × data-parallel groups (world = 2 × dp)."""

    name = "zo_2d"
    pert = 2

    def _check_world(self, world: int) -> None:
        if world < 2 or world % 2:
            raise ConfigError(f"parallel 'zo_2d': the world size must be a multiple of 2 (PertP pairs × data-parallel "
                              f"groups), got WORLD_SIZE={world}")


class DistMeZO:
    """A perturbation that reports only this rank's forward chunks and estimates g across all ranks.

    Everything else (z, shifts, update, schedule, counters) is the wrapped ``mezo``'s, so every rank perturbs and
    updates exactly as the single-process step does.
    """

    def __init__(self, inner: Any, strategy: DistZO):
        self.inner, self.strategy = inner, strategy
        pert, member = strategy.pert, strategy.member
        self._local = {c: c // pert for c in range(inner.n_chunks) if c % pert == member}
        self.last_losses: list[float] = []
        self.last_group_losses: list[list[float]] = []
        self.exclude_local_samples = False  # dp_zo: this rank's forward ran a stand-in example (empty share)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    @property
    def n_chunks(self) -> int:
        return len(self._local)

    def chunk_of(self, sample: int, shift_index: int) -> int | None:
        c = self.inner.chunk_of(sample, shift_index)
        return None if c is None else self._local.get(c)

    def estimate(self, losses: list[float], sample_losses: list[torch.Tensor] | None = None) -> list[float]:
        """g from every rank's losses: one all-gather, then Σ_d g_d / dp in rank order (identical everywhere).
        With per-example losses (dp_zo) the gather carries them, and the inner estimate sees the global batch."""
        if sample_losses is not None:
            return self._estimate_private(losses, sample_losses)
        self.last_losses, self.last_group_losses = self.strategy.combine([float(x) for x in losses])
        per_group = [self.inner.estimate(ls) for ls in self.last_group_losses]
        grads = []
        for j in range(len(per_group[0])):
            total = 0.0
            for g in per_group:
                total += g[j]
            grads.append(total / self.strategy.dp)
        return grads


    def _estimate_private(self, losses: list[float], sample_losses: list[torch.Tensor]) -> list[float]:
        """dp_zo: gather every rank's per-example losses of its own chunks (shares may differ in size), rebuild
        each chunk's losses over the global batch in rank order, and let the private estimate clip and noise
        them; the noise comes from the shared secret seed, so every rank computes the identical update."""
        mine = [] if self.exclude_local_samples else [s.tolist() for s in sample_losses]
        st = self.strategy
        parts = st._gather_objects(mine, "the step's per-example loss all-gather")
        st.step_bytes = 8 * sum(len(c) for p in parts for c in p) * 2
        per_group = []
        for d in range(st.dp):
            members = parts[d * st.pert:(d + 1) * st.pert]
            if not any(members):
                continue  # a group whose share was empty
            n = sum(len(m) for m in members)
            per_group.append([members[c % st.pert][c // st.pert] for c in range(n)])
        chunks = len(per_group[0]) if per_group else self.inner.n_chunks
        glob = [torch.tensor([v for g in per_group for v in g[c]], dtype=torch.float64) for c in range(chunks)]
        self.last_losses = [float(t.mean()) if t.numel() else float("nan") for t in glob]
        self.last_group_losses = [[float(torch.tensor(g[c]).mean()) for c in range(chunks)] for g in per_group]
        return self.inner.estimate(self.last_losses, glob)


class DistEngine:
    """The engine of the zo recipe, returning the step's global losses (mean over groups) instead of local ones."""

    def __init__(self, inner: Any, mezo: DistMeZO):
        self.inner, self.mezo = inner, mezo

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["inner"], name)

    def step(self, batch: dict[str, torch.Tensor], seed: int, lr: float) -> tuple[list[float], list[float]]:
        _, grads = self.inner.step(batch, seed, lr)
        return list(self.mezo.last_losses), grads


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's names, dtypes, shapes and bytes (order-independent of dict order)."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().to("cpu").contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = ["BACKENDS", "DistZO", "ZoDDP", "PertP", "TwoD", "DistMeZO", "DistEngine", "DistributedError", "state_digest"]
