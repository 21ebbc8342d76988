"""The ``fsdp`` strategy: FSDP2 (`torch.distributed.fsdp.fully_shard`) for the ``hf_causal_lm`` family.

Placement: every transformer block (the HF model's ``_no_split_modules`` classes, e.g. ``OPTDecoderLayer``) is one
FSDP unit, then the root (embeddings, final norm, tied head). Each rank keeps 1/world of every parameter, of its
gradient and of the optimizer moments (DTensors sharded on dim 0); a unit's full parameters exist only while its
forward or backward runs (all-gathered, then freed again with ``reshard_after_forward``).

The step is `plait.step.FirstOrderStep`'s data-parallel step, as under ``ddp`` (this class inherits the batch split
and the loss-weight all-reduce): rank r backwards ``mean_loss(its slice) × w_r / Σ w``; FSDP's reduce-scatter in
the backward SUMS the gradients over ranks (the gradient divide factor is set to 1), so each rank ends with its
shard of exactly the single-process gradient of the global batch's mean loss. ``reduce_gradients`` then only sums
the step's loss. Clipping (`torch.nn.utils.clip_grad_norm_` over DTensors takes the global norm) and the optimizer
run on the shards.

Checkpoints (`ShardedCheckpointer`): each rank writes its shards with `torch.distributed.checkpoint` into
``checkpoints/shards/.tmp-step_N``, renamed to ``checkpoints/shards/step_N`` once complete; then rank 0 writes the
usual ``checkpoints/step_N`` folder (everything that is not sharded, plus a reference to the shard folder with
each file's SHA-256), so a ``step_N`` folder exists only when its shards do. A resume checks the world size and
the hashes, then loads every shard into a DTensor of the recorded shape and placement.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from plait.errors import CheckpointError, ConfigError, RunWriteError

from .ddp import DDP

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
_REF = "__dcp__"


def parse_dtype(key: str, value: Any) -> torch.dtype | None:
    """``parallel.mixed_precision.<key>``: None (the parameters' own dtype) or one of `DTYPES`."""
    if value is None or value == "none":
        return None
    if value not in DTYPES:
        raise ConfigError(f"parallel.mixed_precision.{key}: {value!r} is not supported; allowed: none, fp32, bf16, "
                          f"fp16 (or float32, bfloat16, float16)")
    return DTYPES[value]


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: modules whose class is in HF's ``_no_split_modules``, in model order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


class FSDP(DDP):
    name = "fsdp"

    # Evaluation is NOT split under fsdp: every forward all-gathers each block's shards, so every rank must run
    # the same number of forwards; uneven eval shares (ddp's split) would leave one rank waiting in a collective.
    # Each rank evaluates the whole set (as one process does); only rank 0 writes.
    splits_eval = False

    def __init__(self, backend: str = "auto", timeout_s: float = 300.0, reshard_after_forward: bool = True,
                 mixed_precision: Any = None):
        self.param_dtype = parse_dtype("param_dtype", getattr(mixed_precision, "param_dtype", None))
        self.reduce_dtype = parse_dtype("reduce_dtype", getattr(mixed_precision, "reduce_dtype", None))
        if not isinstance(reshard_after_forward, bool):
            raise ConfigError(f"parallel.reshard_after_forward: must be true or false, got {reshard_after_forward!r}")
        self.reshard_after_forward = reshard_after_forward
        super().__init__(backend=backend, timeout_s=timeout_s)
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world_size,))
        self.units = 0
        self.gather_bytes = 0  # analytic per-step volume of the FSDP collectives (set by place_model)

    # --- placement (called by FirstOrderStep before it builds the optimizer) ------------------------------
    def place_model(self, model: torch.nn.Module, run: Any) -> torch.nn.Module:
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        blocks = transformer_blocks(model)
        if not blocks:
            raise ConfigError(f"parallel 'fsdp': model {type(model).__name__} names no transformer block class "
                              f"(_no_split_modules); fsdp shards the hf_causal_lm family per block")
        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        for block in blocks:
            fully_shard(block, mesh=self.mesh, reshard_after_forward=self.reshard_after_forward, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)  # the root keeps its parameters for the backward
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # sum over ranks: each rank's loss is already its share
                m.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM), no division
        self.units = len(blocks) + 1
        self._count_bytes(model, blocks, run)
        run.checkpointer = ShardedCheckpointer(run.checkpointer, self)
        if run.resume_state is not None:
            self.load_sharded(run.resume_state, Path(run.dir) / "checkpoints")
        return model

    def _count_bytes(self, model: torch.nn.Module, blocks: list[torch.nn.Module], run: Any) -> None:
        """Bytes a rank receives per micro-batch: all-gathers of the unsharded parameters (forward, and again in
        the backward for the blocks resharded after forward) and the gradient reduce-scatter; (W-1)/W of each."""
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        w = self.world_size
        frac = (w - 1) / w
        total = 0.0
        for p in model.parameters():
            n = p.numel()
            pb = (self.param_dtype or p.dtype).itemsize
            rb = (self.reduce_dtype or self.param_dtype or p.dtype).itemsize
            gathers = 2 if (id(p) in in_blocks and self.reshard_after_forward) else 1
            total += n * (gathers * pb + (rb if p.requires_grad else 0)) * frac
        accum = int(getattr(getattr(run.cfg, "recipe", {}), "grad_accum", 1) or 1)
        self.gather_bytes = total * accum

    # --- what FirstOrderStep asks of a data-parallel placement (broadcast_parameters, inherited, runs first:
    # every rank shards rank 0's full weights) -------------------------------------------------------------
    def reduce_gradients(self, params, extra=()) -> list[float]:
        """The gradients were reduce-scattered (summed) by FSDP in the backward: only the scalars travel."""
        return self.all_reduce_sum(list(extra)) if len(extra) else []

    def metrics(self) -> dict[str, float]:
        return {"perf/comm_bytes": self.take_step_bytes() + self.gather_bytes}

    def barrier(self, what: str) -> None:
        self._collective(what, lambda: dist.barrier())

    # --- sharded checkpoints ----------------------------------------------------------------------------
    def load_sharded(self, resume_state: tuple[int, dict], ckpt_dir: Path) -> None:
        """Replace the shard references of a loaded checkpoint state by DTensors read from its shard folder."""
        step, state = resume_state
        info = state.get("sharded") if isinstance(state, dict) else None
        if not isinstance(info, dict):
            raise ConfigError(f"run.resume: the checkpoint of step {step} was not written by parallel 'fsdp' (it "
                              f"holds full tensors, no shard folder); resume it with the strategy that wrote it")
        saved = info.get("world_size")
        if saved != self.world_size:
            raise ConfigError(f"run.resume: the checkpoint was written by {saved} rank(s), this run has "
                              f"{self.world_size}; resume with --nproc {saved} (the same world size)")
        folder = ckpt_dir / str(info.get("dir"))
        files = info.get("files") or {}
        if not folder.is_dir():
            raise CheckpointError(f"run.resume: the shard folder '{folder}' of step {step} is missing")
        have = sorted(p.name for p in folder.iterdir())
        if have != sorted(files):
            raise CheckpointError(f"checkpoint shards '{folder}' hold {have}, the state lists {sorted(files)}; "
                                  f"refusing to resume from it")
        for name, expected in files.items():  # before torch.distributed.checkpoint unpickles its metadata
            if _sha256(folder / name) != expected:
                raise CheckpointError(f"checkpoint shard '{folder / name}' is corrupted (SHA-256 differs from the "
                                      f"state's); refusing to resume from it")
        refs: dict[str, dict] = {}
        _find_refs(state, refs)
        targets = {key: self._empty_like_ref(ref) for key, ref in refs.items()}
        import torch.distributed.checkpoint as dcp

        try:
            dcp.load(targets, storage_reader=dcp.FileSystemReader(str(folder)))
        except Exception as exc:  # noqa: BLE001 - DCP wraps every rank's failure in its own exception
            raise CheckpointError(f"run.resume: cannot read the shards in '{folder}': "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") \
                from None
        _replace_refs(state, targets)
        del state["sharded"]

    def _empty_like_ref(self, ref: dict) -> torch.Tensor:
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor import empty as dt_empty

        placements = [Shard(p[1]) if p[0] == "shard" else Replicate() for p in ref["placements"]]
        return dt_empty(*ref["shape"], dtype=getattr(torch, ref["dtype"]), device_mesh=self.mesh,
                        placements=placements)


class ShardedCheckpointer:
    """Wraps the run's checkpointer (rank 0's writer, or the no-op of the other ranks): every rank writes its
    DTensor shards with torch.distributed.checkpoint, then rank 0 writes the rest as a normal checkpoint."""

    def __init__(self, inner: Any, strategy: FSDP):
        self.inner, self.strategy = inner, strategy
        self.dir = Path(inner.dir)
        self.keep = getattr(inner, "keep", 2)

    def __getattr__(self, name: str) -> Any:  # latest(), complete(), … as the wrapped checkpointer
        return getattr(self.inner, name)

    def save(self, step: int, state: dict[str, Any]) -> Path:
        import torch.distributed.checkpoint as dcp

        s = self.strategy
        shards = self.dir / "shards"
        tmp, final = shards / f".tmp-step_{step:08d}", shards / f"step_{step:08d}"
        flat: dict[str, torch.Tensor] = {}
        body = _strip(state, flat, "")
        try:
            if s.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as exc:
            raise RunWriteError(f"cannot write checkpoint shards '{tmp}': {exc.strerror or exc}") from None
        s.barrier("the checkpoint start")
        try:
            dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(tmp)))
        except Exception as exc:  # noqa: BLE001 - a full disk on any rank fails every rank's save
            raise RunWriteError(f"cannot write checkpoint shards '{tmp}': "
                                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}; "
                                f"earlier checkpoints are untouched") from None
        s.barrier("the checkpoint shards")
        path = self.dir / f"step_{step:08d}"
        if s.rank == 0:
            try:
                files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _fsync_dir(shards)
            except OSError as exc:
                shutil.rmtree(tmp, ignore_errors=True)
                raise RunWriteError(f"cannot write checkpoint shards '{final}': {exc.strerror or exc}") from None
            body["sharded"] = {"dir": f"shards/step_{step:08d}",
                               "world_size": s.world_size, "files": files}
            path = self.inner.save(step, body)  # atomic: step_N appears only now, after its shards
            self._prune_shards()
        s.barrier("the checkpoint")
        return path

    def _prune_shards(self) -> None:
        """Shard folders whose ``step_N`` checkpoint was pruned (or never completed) go too."""
        kept = {p.name for p in self.inner.complete()}
        shards = self.dir / "shards"
        for p in shards.iterdir() if shards.is_dir() else ():
            if p.name.startswith("step_") and p.name not in kept:
                shutil.rmtree(p, ignore_errors=True)


def _strip(obj: Any, flat: dict[str, torch.Tensor], prefix: str) -> Any:
    """A copy of ``obj`` where every DTensor is moved to ``flat`` under its path and replaced by a reference
    (shape, dtype, placements); everything else is kept as it is."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if isinstance(obj, DTensor):
        key = prefix or "tensor"
        placements = []
        for p in obj.placements:
            if isinstance(p, Shard):
                placements.append(["shard", p.dim])
            elif isinstance(p, Replicate):
                placements.append(["replicate"])
            else:
                raise RunWriteError(f"checkpoint: tensor {key!r} has placement {p}, which fsdp does not save")
        flat[key] = obj.detach()
        return {_REF: key, "shape": list(obj.shape), "dtype": str(obj.dtype).removeprefix("torch."),
                "placements": placements}
    if isinstance(obj, dict):
        return {k: _strip(v, flat, f"{prefix}/{k}" if prefix else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [_strip(v, flat, f"{prefix}/{i}") for i, v in enumerate(obj)]
        return tuple(out) if isinstance(obj, tuple) else out
    return obj


def _find_refs(obj: Any, out: dict[str, dict]) -> None:
    if isinstance(obj, dict):
        if _REF in obj:
            out[obj[_REF]] = obj
            return
        for v in obj.values():
            _find_refs(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _find_refs(v, out)


def _replace_refs(obj: Any, targets: dict[str, torch.Tensor]) -> None:
    """In place: every reference in a dict or list becomes its loaded DTensor (tuples are rebuilt by the caller's
    containers; the states saved here hold references only in dicts and lists)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in list(items):
        if isinstance(v, dict) and _REF in v:
            obj[k] = targets[v[_REF]]
        elif isinstance(v, (dict, list)):
            _replace_refs(v, targets)
        elif isinstance(v, tuple):
            as_list = list(v)
            _replace_refs(as_list, targets)
            obj[k] = tuple(as_list)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
