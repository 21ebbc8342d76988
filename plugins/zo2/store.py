"""Where streamed blocks live between their visits, and how they move to and from the compute device.

A `BlockStore` keeps each streamed block's parameters in host memory (pinned on CUDA) or in a memory-mapped
safetensors shard on disk, in ``storage_dtype``; the compute copy on the device is fp32 (or the model dtype).
Disk shards are a working copy written from the model when the store is built (replacing whatever the
directory held), so a run never starts from another run's trained shards and never writes into the model's
source files.
``upload(b)`` starts the copy host → device, ``wait(b)`` makes its parameters point at the device copy,
``offload(b, write_back)`` copies the (updated) device copy back and frees it.

Transfers overlap compute: on CUDA through separate upload and offload streams ordered by events, on CPU
through one worker thread each (the copies release the GIL). ``bucket=True`` moves one flat buffer per block.

``set_fill`` replaces how a block's flat bucket is filled on upload (a `BucketFill`; DistZO2's sliced upload
copies 1/k of it from the host and completes it with an all-gather). Write-back is unchanged: always the whole
block.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import save_file

STORAGE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16, torch.float64: np.float64}
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


class BucketFill(Protocol):
    """Fills a block's device bucket on upload instead of one host → device copy of the whole flat buffer."""

    def capacity(self, numel: int) -> int:
        """Elements the device buffer of a ``numel``-element block must hold (≥ numel; room for padding)."""

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        """Make ``dst[:src.numel()]`` (compute dtype, on the device, ``capacity`` elements) equal to ``src`` (the
        host flat buffer, storage dtype); runs where the plain copy would (upload thread or stream). Returns
        the bytes read from ``src``."""


@dataclass
class _Block:
    index: int
    params: list[torch.nn.Parameter]
    shapes: list[torch.Size]
    offsets: list[int]  # element offsets into the flat buffer
    numel: int
    host_flat: torch.Tensor  # storage dtype, host (pinned) or memory-mapped
    host_views: list[torch.Tensor]
    mm: mmap.mmap | None = None
    device_flat: torch.Tensor | None = None
    device_tensors: list[torch.Tensor] | None = None
    upload_done: Future | torch.cuda.Event | None = None
    offload_done: Future | torch.cuda.Event | None = None
    pool_buf: torch.Tensor | None = None  # the pooled compute buffer this block's device copy lives in (CPU)
    bytes_read: int = 0  # host bytes the last upload read (the whole block, or a fill's share of it)
    state: str = "host"  # host | uploading | resident | offloading


@dataclass
class TransferStats:
    uploads: int = 0
    offloads: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    max_resident: int = 0
    per_block: dict = field(default_factory=dict)  # block -> [uploads, offloads]

    def reset(self) -> None:
        self.uploads = self.offloads = self.bytes_up = self.bytes_down = self.max_resident = 0
        self.per_block = {}


class BlockStore:
    def __init__(self, blocks: dict[int, list[torch.nn.Parameter]], device: torch.device, compute_dtype: torch.dtype,
                 storage_dtype: torch.dtype, overlap: bool, bucket: bool, pin_memory: bool,
                 disk_dir: str | None = None):
        self.device, self.compute_dtype, self.storage_dtype = device, compute_dtype, storage_dtype
        self.overlap, self.bucket = overlap, bucket
        self.cuda = device.type == "cuda"
        self.pin = pin_memory and self.cuda and disk_dir is None
        self.stats = TransferStats()
        self.fill: BucketFill | None = None
        self.blocks: dict[int, _Block] = {}
        self.disk_dir = Path(disk_dir) if disk_dir else None
        if self.disk_dir is not None:
            _check_disk_dir(self.disk_dir, blocks, storage_dtype)
        for b, params in blocks.items():
            self.blocks[b] = self._make_block(b, params)
        # CPU: device copies live in a small pool of same-size flat buffers reused step after step, so the
        # working set stays a fixed handful of blocks instead of fragmenting the heap with fresh allocations
        self._pool: list[torch.Tensor] = []
        self._pool_numel = max((blk.numel for blk in self.blocks.values()), default=0)
        if self.cuda:
            self.upload_stream = torch.cuda.Stream(device)
            self.offload_stream = torch.cuda.Stream(device)
        elif overlap:
            self.upload_pool = ThreadPoolExecutor(1, thread_name_prefix="plait-upload")
            self.offload_pool = ThreadPoolExecutor(1, thread_name_prefix="plait-offload")

    # --- set-up -----------------------------------------------------------------------------------------
    def _make_block(self, b: int, params: list[torch.nn.Parameter]) -> _Block:
        shapes = [p.shape for p in params]
        offsets, n = [], 0
        for p in params:
            offsets.append(n)
            n += p.numel()
        mm = None
        if self.disk_dir is not None:
            # always from the model (peak memory: one block), atomically: shards already there are stale
            path = self.disk_dir / f"block_{b:05d}.safetensors"
            tmp = path.with_name(f".{path.name}.tmp")
            flat = torch.cat([p.detach().reshape(-1).to(self.storage_dtype) for p in params])
            save_file({"flat": flat}, str(tmp), metadata={"plait": "zo2-block", "numel": str(n)})
            del flat
            os.replace(tmp, path)
            host_flat, mm = map_flat(path, self.storage_dtype, n, writable=True)
        else:
            host_flat = torch.empty(n, dtype=self.storage_dtype, pin_memory=self.pin)
            for p, o in zip(params, offsets):
                host_flat[o:o + p.numel()].copy_(p.detach().reshape(-1))
        views = [host_flat[o:o + s.numel()].view(s) for o, s in zip(offsets, shapes)]
        block = _Block(b, params, shapes, offsets, n, host_flat, views, mm)
        for p, v in zip(params, views):
            p.data = v  # the original (maybe fp32) tensor is released: the host copy is the only one
        return block

    def set_fill(self, fill: BucketFill | None) -> None:
        """Fill uploaded buckets with ``fill`` (None: the plain copy). Every block must be on the host."""
        if fill is not None and not self.bucket:
            raise ValueError("offload.bucket: a bucket fill (sliced upload) needs one flat buffer per block; "
                             "set offload.bucket: true")
        busy = [b for b, blk in self.blocks.items() if blk.state != "host"]
        if busy:
            raise RuntimeError(f"BlockStore.set_fill: block {busy[0]} is on the device; settle the engine first")
        self.fill = fill
        self._pool.clear()
        self._pool_numel = max((self._capacity(blk.numel) for blk in self.blocks.values()), default=0)

    def _capacity(self, numel: int) -> int:
        return numel if self.fill is None else self.fill.capacity(numel)

    def round_to_storage(self, b: int) -> None:
        """Round resident block ``b``'s compute copy to the storage dtype, as its write-back will.

        Called right after the lazy update: the forward that follows then uses the value a flush (eval,
        checkpoint) would have stored, so the trajectory does not depend on when flushes happen.
        """
        blk = self.blocks[b]
        if self.storage_dtype == self.compute_dtype or blk.state != "resident":  # on the host: stored already
            return
        for t in [blk.device_flat] if blk.device_flat is not None else blk.device_tensors:
            t.copy_(t.to(self.storage_dtype))

    # --- transfers --------------------------------------------------------------------------------------
    def resident_count(self) -> int:
        return sum(1 for blk in self.blocks.values() if blk.state != "host")

    def _note(self, b: int, kind: int) -> None:
        self.stats.per_block.setdefault(b, [0, 0])[kind] += 1
        self.stats.max_resident = max(self.stats.max_resident, self.resident_count())

    def upload(self, b: int) -> None:
        blk = self.blocks[b]
        if blk.state in ("uploading", "resident"):
            return
        self._finish_offload(blk)
        blk.state = "uploading"
        self.stats.max_resident = max(self.stats.max_resident, self.resident_count())

        # destinations are allocated here, on the calling thread: memory a worker thread allocates lands in its
        # own malloc arena and is not returned to the OS when the main thread frees it (RSS would grow)
        if not self.cuda:
            if self.bucket:
                blk.pool_buf = self._pool.pop() if self._pool else torch.empty(
                    self._pool_numel, dtype=self.compute_dtype, device=self.device)
                blk.device_flat = blk.pool_buf[:blk.numel]
                blk.device_tensors = [blk.device_flat[o:o + s.numel()].view(s)
                                      for o, s in zip(blk.offsets, blk.shapes)]
            else:
                blk.device_tensors = [torch.empty(s, dtype=self.compute_dtype, device=self.device)
                                      for s in blk.shapes]

        def copy() -> None:
            blk.bytes_read = blk.numel * blk.host_flat.element_size()
            if self.fill is not None:
                if self.cuda:
                    buf = torch.empty(self.fill.capacity(blk.numel), dtype=self.compute_dtype, device=self.device)
                    blk.device_flat = buf[:blk.numel]
                    blk.device_tensors = [blk.device_flat[o:o + s.numel()].view(s)
                                          for o, s in zip(blk.offsets, blk.shapes)]
                else:
                    buf = blk.pool_buf
                blk.bytes_read = self.fill(blk.host_flat, buf)
            elif self.cuda:
                if self.bucket:
                    blk.device_flat = _to_device(blk.host_flat, self.device, self.compute_dtype)
                    blk.device_tensors = [blk.device_flat[o:o + s.numel()].view(s)
                                          for o, s in zip(blk.offsets, blk.shapes)]
                else:
                    blk.device_tensors = [_to_device(v, self.device, self.compute_dtype) for v in blk.host_views]
            elif self.bucket:
                blk.device_flat.copy_(blk.host_flat)
            else:
                for t, v in zip(blk.device_tensors, blk.host_views):
                    t.copy_(v)
            if blk.mm is not None and hasattr(mmap, "MADV_DONTNEED"):
                blk.mm.madvise(mmap.MADV_DONTNEED)  # the pages just read are not needed until the write-back

        if self.cuda:
            if blk.offload_done is None:  # the first upload must see the compute stream's writes
                self.upload_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.upload_stream):
                if isinstance(blk.offload_done, torch.cuda.Event):
                    self.upload_stream.wait_event(blk.offload_done)
                copy()
                ev = torch.cuda.Event()
                ev.record(self.upload_stream)
            blk.upload_done = ev
        elif self.overlap:
            blk.upload_done = self.upload_pool.submit(copy)
        else:
            copy()
            blk.upload_done = None

    def wait(self, b: int) -> None:
        """Block ``b`` is on the device and its parameters point at the device copy."""
        blk = self.blocks[b]
        if blk.state == "host":
            self.upload(b)
        if blk.state == "uploading":
            done = blk.upload_done
            if isinstance(done, Future):
                done.result()
            elif isinstance(done, torch.cuda.Event):
                torch.cuda.current_stream(self.device).wait_event(done)
                for t in blk.device_tensors:
                    t.record_stream(torch.cuda.current_stream(self.device))
            for p, t in zip(blk.params, blk.device_tensors):
                p.data = t
            blk.state = "resident"
            # an upload is counted when its block is used, so a prefetch belongs to the step that needs it
            self.stats.uploads += 1
            self.stats.bytes_up += blk.bytes_read
            self._note(b, 0)

    def offload(self, b: int, write_back: bool) -> None:
        """Copy block ``b`` back (if it changed) and free its device copy; parameters point at the host."""
        blk = self.blocks[b]
        if blk.state != "resident":
            return
        blk.state = "offloading"
        self.stats.offloads += 1
        self._note(b, 1)
        flat, tensors = blk.device_flat, blk.device_tensors
        for p, v in zip(blk.params, blk.host_views):
            p.data = v
        blk.device_flat = blk.device_tensors = None

        def copy() -> None:
            if write_back:  # copy_ casts to the storage dtype without a temporary on the host
                if self.bucket:
                    blk.host_flat.copy_(flat.to(self.storage_dtype) if self.cuda else flat, non_blocking=self.cuda)
                else:
                    for v, t in zip(blk.host_views, tensors):
                        v.copy_(t.to(self.storage_dtype) if self.cuda else t, non_blocking=self.cuda)
            if blk.mm is not None and hasattr(mmap, "MADV_DONTNEED"):
                # unmap the pages from this process (its RSS); dirty ones stay in the page cache and the kernel
                # writes them back in the background (no msync per step: checkpoints are written separately)
                blk.mm.madvise(mmap.MADV_DONTNEED)

        if write_back:
            self.stats.bytes_down += blk.numel * blk.host_flat.element_size()
        if self.cuda:
            ev_compute = torch.cuda.Event()
            ev_compute.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.offload_stream):
                self.offload_stream.wait_event(ev_compute)
                copy()
                for t in ([flat] if flat is not None else tensors):
                    t.record_stream(self.offload_stream)
                ev = torch.cuda.Event()
                ev.record(self.offload_stream)
            blk.offload_done = ev
        elif self.overlap:
            blk.offload_done = self.offload_pool.submit(copy)
        else:
            copy()
            blk.offload_done = None
            blk.state = "host"
            self._release(blk)

    def _release(self, blk: _Block) -> None:
        if blk.pool_buf is not None:
            self._pool.append(blk.pool_buf)
            blk.pool_buf = None

    def _finish_offload(self, blk: _Block) -> None:
        if blk.state != "offloading":
            return
        done = blk.offload_done
        if isinstance(done, Future):
            done.result()
        elif isinstance(done, torch.cuda.Event):
            if blk.mm is not None or not self.overlap:
                done.synchronize()
        blk.state = "host"
        self._release(blk)

    def finish_offloads(self, keep_below: int | None = None) -> None:
        """Wait for pending offloads (all of them, or the ones of blocks < keep_below)."""
        for b, blk in self.blocks.items():
            if blk.state == "offloading" and (keep_below is None or b < keep_below):
                self._finish_offload(blk)
        if self.cuda and keep_below is None:
            torch.cuda.current_stream(self.device).wait_stream(self.offload_stream)

    def close(self) -> None:
        self.finish_offloads()
        if not self.cuda and self.overlap:
            self.upload_pool.shutdown()
            self.offload_pool.shutdown()


def _to_device(src: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A fresh device copy in ``dtype`` (on CPU too: the compute copy must not alias the host copy)."""
    if device.type == "cuda":
        return src.to(device, non_blocking=True).to(dtype)
    out = torch.empty(src.shape, dtype=dtype, device=device)
    out.copy_(src)
    return out


def map_flat(path: Path, dtype: torch.dtype, numel: int, writable: bool = False) -> tuple[torch.Tensor, mmap.mmap]:
    """Memory-map the tensor ``flat`` of a safetensors file (no copy).

    ``writable``: writes go to the file (the disk tier's working copy). Otherwise the file is opened
    read-only and mapped copy-on-write: the tensor can still be changed in memory (e.g. by in-place MeZO),
    but the file — a model's source shards — never is.
    """
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    info = header["flat"]
    if info["dtype"] != _ST_DTYPE[dtype] or info["shape"] != [numel]:
        raise ValueError(f"shard '{path}' holds {info['dtype']} {info['shape']}, expected {_ST_DTYPE[dtype]} "
                         f"[{numel}] (its manifest or model config disagrees; rewrite it with scripts/make_shards.py)")
    begin, end = info["data_offsets"]
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    arr = np.frombuffer(mm, dtype=_NP[dtype], count=numel, offset=8 + header_len + begin)
    t = torch.from_numpy(arr)
    if dtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t, mm


def _check_disk_dir(path: Path, blocks: dict[int, list[torch.nn.Parameter]], dtype: torch.dtype) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"offload.disk_dir '{path}' does not exist (create it, or choose another)")
    need = sum(sum(p.numel() for p in ps) for ps in blocks.values()) * torch.tensor([], dtype=dtype).element_size()
    shards = [path / f"block_{b:05d}.safetensors" for b in blocks]
    free = shutil.disk_usage(path).free + sum(f.stat().st_size for f in shards if f.exists())  # replaced
    if need > free:
        raise ValueError(f"offload.disk_dir '{path}' is too small: the block shards need {need / 2**30:.2f} GiB, "
                         f"{free / 2**30:.2f} GiB are free")
