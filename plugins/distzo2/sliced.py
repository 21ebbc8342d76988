"""Sliced block upload: each of k ranks uploads 1/k of a streamed block, an all-gather completes it.

With the ``zo2`` offload policy every rank streams every transformer block from its own host copy (or memory-
mapped shard) into its device. `SlicedUpload` is a `BlockStore` bucket fill (``plugins/zo2/store.py``): rank
``r`` copies only slice ``r`` of the block's flat bucket (``c = ceil(n / k)`` elements, the last slice padded)
host → device, and one all-gather over the k ranks assembles the whole bucket in every rank's device buffer.
Host → device traffic per rank drops to 1/k; the rest crosses the device interconnect (NVLink), which is the
point on GPUs. The gather moves the storage dtype (an fp16 host copy travels as fp16) and the cast to the
compute dtype happens after it, on the device, exactly as the plain upload casts.

Why the numbers do not change: the gathered bucket is bit-identical to the plain upload (every rank's host copy
is identical, see below), and z is drawn per parameter from ``param_seed(step, index)`` after the block is
complete, never per slice or per rank, so no perturbation depends on which rank produced which slice.

Write-back stays whole and local: every rank applies the same update to the whole block (same g from the step's
loss all-gather, same z, same arithmetic) and copies it back into its own host copy, so the host copies stay
bit-identical without any traffic, and each rank's checkpoint state is current.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

Gather = Callable[[torch.Tensor, torch.Tensor], None]  # (output: k slices, input: this rank's slice)


class SlicedUpload:
    """A `BucketFill`: this rank's slice from the host, the other k-1 from the other ranks by ``gather``."""

    def __init__(self, rank: int, k: int, gather: Gather):
        if not 0 <= rank < k:
            raise ValueError(f"sliced upload: rank {rank} is not in a group of {k}")
        self.rank, self.k, self.gather = rank, k, gather
        self._scratch: torch.Tensor | None = None  # storage-dtype gather buffer when it differs from compute

    def capacity(self, numel: int) -> int:
        return self.k * math.ceil(numel / self.k)

    def bounds(self, numel: int) -> tuple[int, int]:
        """The element range [lo, hi) of a ``numel``-element bucket this rank reads from the host."""
        c = math.ceil(numel / self.k)
        lo = min(self.rank * c, numel)
        return lo, min(lo + c, numel)

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        n, cap = src.numel(), self.capacity(src.numel())
        c = cap // self.k
        if dst.dtype == src.dtype:
            buf = dst[:cap]  # gather straight into the compute buffer
        else:  # gather the storage dtype (fewer bytes on the wire), cast afterwards
            if self._scratch is None or self._scratch.numel() < cap or self._scratch.dtype != src.dtype:
                self._scratch = torch.empty(cap, dtype=src.dtype, device=dst.device)
            buf = self._scratch[:cap]
        lo, hi = self.bounds(n)
        mine = buf[self.rank * c:(self.rank + 1) * c]
        mine[:hi - lo].copy_(src[lo:hi], non_blocking=dst.device.type == "cuda")
        self.gather(buf, mine)
        if buf.data_ptr() != dst.data_ptr():
            dst[:n].copy_(buf[:n])
        return (hi - lo) * src.element_size()


__all__ = ["SlicedUpload", "Gather"]
