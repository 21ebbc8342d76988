"""`ProcessGroup`: the torch.distributed process group that every multi-process ``parallel:`` strategy starts from.

Every multi-process strategy plugin (first-order or zeroth-order, builtin or third-party) subclasses it for the
machinery they all need, so no strategy plugin depends on another:

* the backend (``auto``: NCCL with CUDA, else gloo), the collective timeout, the rank layout read from torchrun's
  environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and this rank's device;
* starting the default process group (or joining one already started) and destroying it in `close`;
* `_collective`: every collective runs through it, so a peer that died or a collective that timed out ends the run
  with one line (`DistributedError`, exit 3) instead of a traceback;
* what the core asks of a strategy (`plait.protocols.ParallelStrategy`): ``all_reduce_mean``,
  ``broadcast_object`` (rank 0's run directory), ``check_config`` (the ranks' resolved configs must agree),
  ``close``; and ``splits_eval``, read by `plait.run.eval_share` / ``eval_sum`` / ``eval_gather``.

A subclass sets ``name`` (its registry name, used in messages) and may override ``_check_world(world)`` to refuse
world sizes it cannot lay out (called before the group starts, and again if an existing group differs).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, PlaitError

BACKENDS = ("auto", "gloo", "nccl")


class DistributedError(PlaitError):
    """A collective failed: a peer died, hung past the timeout, or the rendezvous never completed."""

    exit_code = 3


def env_int(name: str, default: int) -> int:
    """An integer environment variable (torchrun's ``RANK``, ``WORLD_SIZE``, …); ``default`` when unset or empty."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ProcessGroup:
    """The process group of a multi-process strategy: backend, timeout, rank, world size, device, collectives."""

    name = "process_group"
    # True: evaluation is split across the ranks (the strategy then defines eval_share / eval_sum / eval_gather);
    # False: every rank evaluates the whole set, as one process does, and the eval helpers pass values through
    splits_eval = False

    def __init__(self, backend: str = "auto", timeout_s: float = 300.0):
        if backend not in BACKENDS:
            raise ConfigError(f"parallel.backend: {backend!r} is not supported; allowed: {', '.join(BACKENDS)}")
        if not timeout_s > 0:
            raise ConfigError(f"parallel.timeout_s: must be > 0, got {timeout_s}")
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl" and not torch.cuda.is_available():
            raise ConfigError("parallel.backend: 'nccl' needs CUDA, which is not available here; use gloo (CPU) "
                              "or auto")
        self.backend, self.timeout_s = backend, float(timeout_s)
        self.rank = env_int("RANK", 0)
        self.world_size = env_int("WORLD_SIZE", 1)
        self.local_rank = env_int("LOCAL_RANK", self.rank)
        self._check_world(self.world_size)
        if backend == "nccl":
            torch.cuda.set_device(self.local_rank)  # "cuda" then means this rank's GPU
        self.device = torch.device("cuda", self.local_rank) if backend == "nccl" else torch.device("cpu")
        self.collectives = 0  # collectives issued since start (start-up and per step)
        self.step_bytes = 0  # bytes this rank sent and received in the last step's collectives
        self._owned_pg = not dist.is_initialized()
        if self._owned_pg:
            timeout = timedelta(seconds=self.timeout_s)
            try:
                if "MASTER_ADDR" in os.environ or self.world_size > 1:
                    dist.init_process_group(backend, rank=self.rank, world_size=self.world_size, timeout=timeout)
                else:  # a plain `plait run` without torchrun: a group of one, no network
                    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                            timeout=timeout)
            except ValueError as exc:  # missing MASTER_ADDR / MASTER_PORT
                raise ConfigError(f"parallel {self.name!r}: cannot start torch.distributed ({exc}); launch with "
                                  f"torchrun --nproc-per-node N -m plait run CONFIG") from None
            except (RuntimeError, dist.DistError) as exc:
                raise DistributedError(f"parallel {self.name!r}: rank {self.rank} could not join the process "
                                       f"group within {self.timeout_s:g} s: {first_line(exc)}") from None
        elif dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
            self._check_world(self.world_size)

    # --- checks ----------------------------------------------------------------------------------------
    def _check_world(self, world: int) -> None:
        if world < 1:
            raise ConfigError(f"parallel {self.name!r}: WORLD_SIZE must be at least 1, got {world}")

    # --- collectives (every one goes through `_collective`, which turns failures into one-line errors) ----
    def _collective(self, what: str, fn: Callable[[], Any], count: bool = True) -> Any:
        if count:  # (collectives on a helper thread, e.g. DistZO2's sliced uploads, pass count=False)
            self.collectives += 1
        try:
            return fn()
        except (RuntimeError, dist.DistError) as exc:
            raise DistributedError(f"parallel {self.name!r}: rank {self.rank} lost its peers during {what} (a rank "
                                   f"died or did not answer within parallel.timeout_s={self.timeout_s:g}): "
                                   f"{first_line(exc)}") from None

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        out = value.detach().clone()
        self._collective("all_reduce", lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM))
        return out / self.world_size

    def _gather_objects(self, obj: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the core uses it for the run directory)."""
        box = [obj]
        self._collective("the start-up broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def agree_stop(self, key: str, proposal: int) -> int:
        """After a Ctrl-C: the step after which every rank stops, the same on all of them.

        A terminal's Ctrl-C reaches every rank at once, but a rank may already be past the end of the step in
        which it arrived (its stop check) while another is not: stopping at "this step" would leave one rank
        waiting in the next step's collective for a rank that has gone (and the checkpoint unwritten when the
        gone one is not rank 0). So each rank proposes the step after the one it just finished and the first
        proposal wins (compare-and-set on the group's rendezvous store under ``key``: not a collective, so a
        step without a Ctrl-C pays nothing). Ranks are never a whole step apart (every step has a collective),
        so no rank has finished the winning step yet.
        """
        try:
            store = dist.distributed_c10d._get_default_store()
            return int(self._collective("the Ctrl-C stop agreement",
                                        lambda: store.compare_set(key, "", str(int(proposal))), count=False))
        except (AttributeError, ValueError):  # no store (or no group) to agree through: stop where it is
            return proposal

    def check_config(self, text: str) -> None:
        """Every rank must run the same resolved config: compare SHA-256 digests, fail on every rank if not."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        digests = self._gather_objects(digest, "the start-up config check")
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            self.close()
            raise ConfigError(f"parallel {self.name!r}: the resolved config differs between ranks (rank {bad[0]} "
                              f"has sha256 {digests[bad[0]][:12]}, rank 0 has {digests[0][:12]}); launch every "
                              f"rank with the same config file and overrides")

    def close(self) -> None:
        if self._owned_pg and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["BACKENDS", "DistributedError", "ProcessGroup", "env_int", "first_line"]
