"""Checkpoints: safetensors for tensors + a JSON state file, written atomically, verified by checksum.

Layout under ``<run dir>/checkpoints/``::

    step_00000100/
        tensors.safetensors   every tensor of the state (model, optimizer moments, RNG states)
        state.json            the rest of the state (JSON), with {"__tensor__": key} where a tensor stood,
                              and the SHA-256 of tensors.safetensors

A checkpoint is written into a hidden temporary folder and renamed into place, so a folder named ``step_*``
is always complete. Loading never unpickles: tensors come from safetensors, everything else from JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError

_TENSOR = "__tensor__"
_TUPLE = "__tuple__"


def pack(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """Turn a nested state (dicts, lists, tuples, tensors, numbers, strings) into JSON + named tensors."""
    if isinstance(obj, torch.Tensor):
        key = prefix or "tensor"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {_TENSOR: key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint state key {k!r} at {prefix!r} must be str or int")
            out[(f"i:{k}" if isinstance(k, int) else f"s:{k}")] = pack(v, tensors, f"{prefix}/{k}" if prefix else str(k))
        return out
    if isinstance(obj, tuple):
        return {_TUPLE: [pack(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint state at {prefix!r} holds a {type(obj).__name__}, which cannot be saved "
                    f"without pickle")


def unpack(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `pack`."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(unpack(v, tensors) for v in obj[_TUPLE])
        return {(int(k[2:]) if k.startswith("i:") else k[2:]): unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from: Python, NumPy, torch CPU and (if present) CUDA."""
    np_state = np.random.get_state()
    state = {
        "python": _listify(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # the run's device only (it is made current by resolve_device / the parallel strategy): a checkpoint
        # written on an 8-GPU node must resume where fewer GPUs are visible
        state["cuda"] = {"state": torch.cuda.get_rng_state()}
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if isinstance(saved, dict):
            torch.cuda.set_rng_state(saved["state"])
        else:  # checkpoints before 2026-11-30 hold every visible device's state
            states = list(saved)[:torch.cuda.device_count()]
            torch.cuda.set_rng_state_all(states)


def _listify(x):
    return [_listify(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves and loads a run's state under ``<run dir>/checkpoints``."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (nested dicts of tensors and JSON values) as checkpoint ``step``, atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".tmp-step_{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tensors: dict[str, torch.Tensor] = {}
        body = pack(state, tensors)
        tensor_file = tmp / "tensors.safetensors"
        # safetensors refuses tensors that share storage; clone those views so each is saved on its own.
        save_file(_unshare(tensors), str(tensor_file))
        meta = {"format": 1, "step": step, "sha256": _sha256(tensor_file), "state": body}
        with open(tmp / "state.json", "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        with open(tensor_file, "rb+") as f:
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)
        self._prune()
        return final

    def _prune(self) -> None:
        if self.keep <= 0:
            return
        for old in self.complete()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def complete(self) -> list[Path]:
        """Checkpoint folders, oldest first (a ``step_*`` folder is complete by construction)."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith("step_"))

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1] if found else None

    @staticmethod
    def load(path: str | Path) -> tuple[int, dict[str, Any]]:
        """Read a checkpoint folder; raise `CheckpointError` if it is truncated or corrupted."""
        path = Path(path)
        state_file, tensor_file = path / "state.json", path / "tensors.safetensors"
        for f in (state_file, tensor_file):
            if not f.is_file():
                raise CheckpointError(f"checkpoint '{path}' is incomplete: '{f.name}' is missing")
        try:
            meta = json.loads(state_file.read_text())
            step, expected, body = int(meta["step"]), meta["sha256"], meta["state"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"checkpoint '{state_file}' is truncated or corrupted "
                                  f"({type(exc).__name__}); refusing to resume from it") from None
        actual = _sha256(tensor_file)
        if actual != expected:
            raise CheckpointError(f"checkpoint '{tensor_file}' is corrupted: SHA-256 {actual[:12]}… does not "
                                  f"match the recorded {expected[:12]}…; refusing to resume from it")
        try:
            tensors = load_file(str(tensor_file))
        except Exception as exc:
            raise CheckpointError(f"checkpoint '{tensor_file}' cannot be read: {exc}") from None
        return step, unpack(body, tensors)


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        sig = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else (0, id(t))
        if sig in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(sig)
        out[k] = t
    return out
