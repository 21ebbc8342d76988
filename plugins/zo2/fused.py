"""Offload policy ``zo2``: the fused dual forward with transformer blocks streamed through the device.

One HF forward runs over the batch repeated ``n`` times (n = 2q chunks for the central difference). Each
*unit* — a transformer block, or a parametric leaf module outside the blocks (embeddings, final norm, head) —
intercepts its call, splits its inputs into the n chunks and runs itself once per chunk, shifting its own
parameters in place by the chunk's perturbation in between (MeZO's +ε, -2ε, +ε). So every unit sees exactly
the computation the plain MeZO step would run, at the same batch size, without copying any HF forward code.

Streaming: a streamed block is uploaded when the forward reaches the block before it (prefetch), applies its
pending update from the previous step (lazy update: no extra transfer), runs its chunks, and is offloaded
straight after. At most three streamed blocks are on the device: one offloading, one computing, one
uploading. ``flush()`` applies pending updates everywhere; it runs before eval, state_dict and checkpoints.
A lazily updated block is rounded to its storage dtype at once, so flushes do not change the trajectory.

A parameter shared by several units (tied embeddings) is perturbed once per step: its chunk values are
computed on first use and handed to each owner, and its restore drift is written back at the end of the step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .mezo import DrawPool, MeZO, Param, chunk_losses, param_table
from .store import STORAGE_DTYPES, BlockStore


@dataclass
class Unit:
    name: str
    module: torch.nn.Module
    own: list[Param]  # parameters only this unit uses
    shared: list[tuple[Param, torch.nn.Module, str]]  # (param, owning submodule, attribute name)
    block: int | None = None  # index among the transformer blocks if streamed
    updated: bool = True  # pending update applied
    calls: int = 0  # chunk calls (forwards) since the counters were reset


@dataclass
class Pending:
    seed: int
    grads: list[float]
    lr: float
    done: set = field(default_factory=set)  # indices of shared params already updated


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass whose ``__call__`` hands the call to the engine (hooks still fire once per chunk)."""
    if cls not in _FUSED_CLASSES:
        base_call = cls.__call__

        def __call__(self, *args, **kwargs):
            return self._plait_engine._call_unit(self, base_call, args, kwargs)

        _FUSED_CLASSES[cls] = type(f"ZO2{cls.__name__}", (cls,), {"__call__": __call__, "_plait_base": cls})
    return _FUSED_CLASSES[cls]


def _split(x, n: int, total: int):
    """Per-chunk views of an argument: tensors (ndim ≥ 2) whose first dim is the fused batch are split."""
    if isinstance(x, torch.Tensor):
        if x.dim() >= 2 and x.shape[0] == total:
            return list(x.chunk(n, dim=0))
        return [x] * n
    if isinstance(x, (tuple, list)):
        parts = [_split(v, n, total) for v in x]
        return [type(x)(p[c] for p in parts) for c in range(n)]
    if isinstance(x, dict):
        parts = {k: _split(v, n, total) for k, v in x.items()}
        return [{k: parts[k][c] for k in x} for c in range(n)]
    return [x] * n


def _concat(outs: list):
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, dim=0)
    if isinstance(first, tuple):
        return type(first)(_concat([o[i] for o in outs]) for i in range(len(first)))
    if isinstance(first, list):
        return [_concat([o[i] for o in outs]) for i in range(len(first))]
    return first


class ZO2Engine:
    """Fused dual-forward ZO steps with block streaming; numerically the plain `InPlaceMeZO` step."""

    def __init__(self, model: torch.nn.Module, device: torch.device, mezo: MeZO, *, blocks: list[int] | None,
                 overlap: bool, bucket: bool, storage_dtype: str, pin_memory: bool, disk_dir: str | None):
        from plait.plugins.basics.models import find_blocks

        source = getattr(model, "_plait_shard_dir", None)
        if source is not None:  # a zo2_shards model: its mapped shards are read, a working copy is trained
            if disk_dir is None:
                raise ValueError("offload.disk_dir: a zo2_shards model streams from a working copy of its shards; "
                                 "set disk_dir to a directory (or 'run')")
            if Path(disk_dir).resolve() == Path(source).resolve():
                raise ValueError(f"offload.disk_dir '{disk_dir}' is the model's own shard directory; training "
                                 f"would overwrite the source model: choose another directory (or 'run')")
        if storage_dtype != "model" and storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"offload.storage_dtype {storage_dtype!r} is not supported; allowed: model, "
                             f"{', '.join(STORAGE_DTYPES)}")
        if device.type == "cpu" and storage_dtype == "bf16" and not _cpu_bf16_ok():
            raise ValueError("offload.storage_dtype bf16 is not supported on this CPU; use fp16 or fp32")
        try:
            block_path, layers = find_blocks(model)
        except ValueError as exc:
            raise ValueError(f"offload: cannot stream {type(model).__name__}: {exc}") from None
        n_blocks = len(layers)
        streamed = list(range(n_blocks)) if blocks is None else sorted(set(blocks))
        bad = [b for b in streamed if not 0 <= b < n_blocks]
        if bad:
            raise ValueError(f"offload.blocks: block {bad[0]} does not exist; {type(model).__name__} has "
                             f"{n_blocks} blocks (0..{n_blocks - 1})")
        self.model, self.device, self.mezo = model, device, mezo
        self.params = param_table(model, mezo.no_decay)
        self.units = self._find_units(model, block_path, layers)
        self.streamed = {u.block: u for u in self.units if u.block is not None and u.block in streamed}
        compute_dtype = next(model.parameters()).dtype
        # everything except the streamed blocks lives on the device
        for u in self.units:
            if u.block not in self.streamed:
                u.module.to(device)
        for sub in model.modules():  # buffers (rotary tables, masks) are small: all on the device
            for k, v in list(sub._buffers.items()):
                if v is not None:
                    sub._buffers[k] = v.to(device)
        self.compute_dtype = compute_dtype
        block_params = {b: [p.tensor for p in u.own] for b, u in self.streamed.items()}
        if storage_dtype == "model":  # the streamed parameters' own dtype: host copies round nothing
            dtypes = {t.dtype for ps in block_params.values() for t in ps}
            storage = functools.reduce(torch.promote_types, dtypes) if dtypes else compute_dtype
        else:
            storage = STORAGE_DTYPES[storage_dtype]
        self.store = BlockStore(block_params, device, compute_dtype, storage, overlap, bucket, pin_memory, disk_dir)
        self.order = sorted(self.streamed)
        self.next_of = {b: nb for b, nb in zip(self.order, self.order[1:])}
        for u in self.units:
            u.module._plait_engine = self
            u.module.__class__ = _fused_class(type(u.module))
        self.by_module = {id(u.module): u for u in self.units}
        self.mode = "eval"
        self.pending: Pending | None = None
        self.shared_origin: dict[int, torch.Tensor] = {}  # tied parameters: their value at the step's start
        self.shared_z: dict[tuple[int, int], torch.Tensor] = {}  # and their z of sample j, drawn once per step
        self.seed = 0
        self.stats = self.store.stats
        self.draw_pool = DrawPool(device)  # a unit's z drawn in threads (CPU; same bits, see DrawPool)
        if self.order:
            self.store.upload(self.order[0])

    # --- structure --------------------------------------------------------------------------------------
    def _find_units(self, model, block_path: str, layers) -> list[Unit]:
        by_id = {id(p.tensor): p for p in self.params}
        owners: dict[int, list[tuple[int, torch.nn.Module, str]]] = {}
        units: list[Unit] = []
        block_ids = {id(m) for m in layers}
        candidates: list[tuple[str, torch.nn.Module, int | None]] = []
        for i, layer in enumerate(layers):
            candidates.append((f"{block_path}.{i}", layer, i))
        inside = {id(m) for layer in layers for m in layer.modules()}
        for name, m in model.named_modules():
            if id(m) in inside or id(m) in block_ids:
                continue
            direct = [p for p in m.parameters(recurse=False)]
            if not direct:
                continue
            if any(True for c in m.children() if any(True for _ in c.parameters())):
                raise ValueError(f"module '{name}' ({type(m).__name__}) has parameters of its own and parametric "
                                 f"children outside the transformer blocks; zo2 cannot split it")
            candidates.append((name, m, None))
        for ui, (name, m, block) in enumerate(candidates):
            for sub in m.modules():
                for attr, p in sub._parameters.items():
                    if p is not None and id(p) in by_id:
                        owners.setdefault(id(p), []).append((ui, sub, attr))
        for ui, (name, m, block) in enumerate(candidates):
            own, shared, seen = [], [], set()
            for sub in m.modules():
                for attr, p in sub._parameters.items():
                    if p is None or id(p) not in by_id:
                        continue
                    entry = by_id[id(p)]
                    if len({o[0] for o in owners[id(p)]}) > 1:
                        if block is not None:
                            raise ValueError(f"parameter '{entry.name}' of block {name} is shared with another "
                                             f"module; zo2 cannot stream it")
                        shared.append((entry, sub, attr))
                    elif id(p) not in seen:
                        own.append(entry)
                    seen.add(id(p))
            units.append(Unit(name, m, sorted(own, key=lambda e: e.index), shared, block))
        covered = {e.index for u in units for e in u.own} | {e.index for u in units for e, _, _ in u.shared}
        missing = [p.name for p in self.params if p.index not in covered]
        if missing:
            raise ValueError(f"parameter '{missing[0]}' is used by no module zo2 can split")
        return units

    # --- the unit call -------------------------------------------------------------------------------------
    def _call_unit(self, module, base_call, args, kwargs):
        u = self.by_module[id(module)]
        if u.block in self.streamed:
            self._arrive(u.block)
        if not u.updated:
            self._apply_pending(u)
        try:
            if self.mode != "train":
                u.calls += 1
                return base_call(module, *args, **kwargs)
            return self._fused(u, module, base_call, args, kwargs)
        finally:
            if u.block in self.streamed:
                self.store.offload(u.block, write_back=self.mode == "train")

    def _arrive(self, b: int) -> None:
        self.store.wait(b)
        nb = self.next_of.get(b)
        if nb is not None:
            # keep ≤ 3 streamed blocks on the device: the one before b must have finished offloading
            self.store.finish_offloads(keep_below=b)
            self.store.upload(nb)

    def _fused(self, u: Unit, module, base_call, args, kwargs):
        m, eps, n = self.mezo, self.mezo.eps, self.mezo.n_chunks
        chunk_args = _split(args, n, self.total)
        chunk_kwargs = _split(kwargs, n, self.total)
        outs: list = [None] * n

        def run(c: int):
            outs[c] = base_call(module, *chunk_args[c], **chunk_kwargs[c])
            u.calls += 1

        # A tied parameter (OPT's embedding = LM head) is used by several units. Each use runs MeZO's in-place
        # shifts from the value the step started with (restored from one saved copy) with the same z (drawn
        # once, kept for the step), so every use sees the same perturbed values and the value left behind — the
        # in-place shifts' rounding included — is exactly plain MeZO's. Two tensors of the parameter's size
        # (start value, z) instead of one per chunk plus a running copy (4 GB at OPT-13B's embedding).
        shared = [p for p, _, _ in u.shared]
        for p in shared:
            origin = self.shared_origin.get(p.index)
            if origin is None:
                self.shared_origin[p.index] = p.tensor.data.clone()
            else:
                p.tensor.data.copy_(origin)
        shifted = list(u.own) + shared
        if m.one_sided:
            run(0)
        for j, shifts in m.shifts():
            drawn = self.draw_pool.run(u.name, u.own, lambda p, j=j: m.z(p.tensor.data, p.index, self.seed, j))
            zs = [drawn.pop(p.index) for p in u.own]
            for p in shared:
                if (p.index, j) not in self.shared_z:
                    self.shared_z[p.index, j] = m.z(p.tensor.data, p.index, self.seed, j)
                zs.append(self.shared_z[p.index, j])
            for k, s in enumerate(shifts):
                for p, z in zip(shifted, zs):
                    p.tensor.data.add_(z, alpha=s * eps)
                c = m.chunk_of(j, k)
                if c is not None:
                    run(c)
            del zs
        return _concat(outs)

    # --- updates ---------------------------------------------------------------------------------------------
    def _apply_pending(self, u: Unit) -> None:
        pend = self.pending
        if pend is not None:
            with torch.no_grad():
                self.draw_pool.run(u.name, u.own, lambda p: self.mezo.update(p, pend.seed, pend.grads, pend.lr))
                if u.block in self.streamed:
                    self.store.round_to_storage(u.block)
                for p, _, _ in u.shared:
                    if p.index not in pend.done:
                        self.mezo.update(p, pend.seed, pend.grads, pend.lr)
                        pend.done.add(p.index)
        u.updated = True

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending update to every parameter (streamed blocks pass through the device)."""
        if self.pending is None:
            return
        for u in self.units:
            if u.updated:
                continue
            if u.block in self.streamed:
                # the forward's streaming discipline: prefetch the next block, wait for the offloads before this
                # one, so ≤ 3 compute copies exist (without it every block's copy stayed alive until the end)
                self._arrive(u.block)
                self._apply_pending(u)
                self.store.offload(u.block, write_back=True)
            else:
                self._apply_pending(u)
        self.store.finish_offloads()
        self.pending = None
        if self.order:
            self.store.upload(self.order[0])

    # --- steps ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, batch: dict[str, torch.Tensor], seed: int, lr: float) -> tuple[list[float], list[float]]:
        """One fused ZO step; returns (chunk losses, projected gradients). The update is applied lazily."""
        m, n = self.mezo, self.mezo.n_chunks
        b = batch["input_ids"].shape[0]
        self.total, self.seed, self.mode = n * b, seed, "train"
        self.stats.reset()
        try:
            if self.order:
                self.store.upload(self.order[0])
            out = self.model(input_ids=batch["input_ids"].repeat(n, 1),
                             attention_mask=batch["attention_mask"].repeat(n, 1), use_cache=False).logits
            want = getattr(m, "wants_sample_losses", False)  # dp_zo: per-example losses of the same logits
            pairs = [chunk_losses(out[c * b:(c + 1) * b], batch["labels"], want) for c in range(n)]
            losses = [loss for loss, _ in pairs]
            samples = [per for _, per in pairs] if want else None
            for u in self.units:  # a unit the forward skipped still owes its update
                if not u.updated:
                    self._apply_pending(u)
        finally:
            self.mode = "eval"
        self.shared_origin.clear()  # tied parameters keep the value their last use's shifts left (MeZO's)
        self.shared_z.clear()
        grads = m.estimate(losses, samples) if samples is not None else m.estimate(losses)
        self.pending = Pending(seed, grads, lr)
        for u in self.units:
            u.updated = False
        self.store.finish_offloads()
        if self.order:
            self.store.upload(self.order[0])
        return losses, grads

    @torch.no_grad()
    def apply_update(self, seed: int, grads: list[float], lr: float) -> None:
        """The update of ``grads`` along step ``seed``'s z with no forward (a private step's noise-only update for
        an empty Poisson batch): the pending update is settled, this one becomes pending (applied lazily)."""
        self.flush()
        self.pending = Pending(seed, grads, lr)
        for u in self.units:
            u.updated = False

    @torch.no_grad()
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.flush()
        self.stats.reset()
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        self.store.finish_offloads()
        if self.order:
            self.store.upload(self.order[0])
        return out

    def _settle(self) -> None:
        """Pending update applied, transfers finished, no prefetched copy left on the device."""
        self.flush()
        self.store.finish_offloads()
        for b, blk in self.store.blocks.items():
            if blk.state in ("uploading", "resident"):
                self.store.wait(b)
                self.store.offload(b, write_back=False)
        self.store.finish_offloads()
        if self.store.cuda:  # the host too: state_dict and checkpoints read the pinned host copies next, and must
            self.store.offload_stream.synchronize()  # not rely on a later blocking copy to order them

    def set_block_fill(self, fill) -> None:
        """Fill streamed blocks' buckets on upload with ``fill`` (a `store.BucketFill`, e.g. DistZO2's sliced
        upload) from now on: transfers are settled, then the first block is prefetched through it."""
        self._settle()
        self.store.set_fill(fill)
        if self.order:
            self.store.upload(self.order[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Current parameters (pending update applied) in the compute dtype, on the host."""
        self._settle()
        out = {}
        for k, v in self.model.state_dict().items():
            v = v.detach().to("cpu")
            out[k] = (v.to(self.compute_dtype) if v.is_floating_point() else v).clone()
        if self.order:
            self.store.upload(self.order[0])
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._settle()
        with torch.no_grad():
            for k, v in self.model.state_dict(keep_vars=True).items():
                if k in state:
                    v.data.copy_(state[k].to(v.dtype))
        if self.order:
            self.store.upload(self.order[0])

    def close(self) -> None:
        self._settle()
        self.draw_pool.close()
        self.store.close()
        for u in self.units:
            u.module.__class__ = type(u.module)._plait_base
            del u.module._plait_engine


def _set_buffer(model: torch.nn.Module, dotted: str, value: torch.Tensor) -> None:
    owner_name, _, attr = dotted.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    owner._buffers[attr] = value


def _cpu_bf16_ok() -> bool:
    try:
        torch.ones(2, dtype=torch.bfloat16) + 1
        return True
    except RuntimeError:
        return False
