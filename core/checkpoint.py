"""Checkpoints: safetensors for tensors + a JSON state file, written atomically, verified by checksum.

Layout under ``<run dir>/checkpoints/``::

    step_00000100/
        tensors.safetensors   every tensor of the state (model, optimizer moments, RNG states)
        state.json            the rest of the state (JSON), with {"__tensor__": key} where a tensor stood
        MANIFEST.json         written last, checked first: {"format": 2, "files": {name: sha256}, "sha256": one
                              hash over every file of the folder}

Format 1 checkpoints (no manifest, the SHA-256 of the tensors inside state.json) still load.

A checkpoint is written into a hidden temporary folder and renamed into place, so a folder named ``step_*``
is always complete. Loading never unpickles: tensors come from safetensors, everything else from JSON.
"""
from __future__ import annotations

import contextlib
import errno
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

from .errors import CheckpointError, RunWriteError

_TENSOR = "__tensor__"
FORMAT = 2
MANIFEST = "MANIFEST.json"
_FILES = ("tensors.safetensors", "state.json")
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


MAX_DEPTH = 64  # a state nests a few levels (task/optimizer/state/<param>/exp_avg); deeper is not ours


def unpack(obj: Any, tensors: dict[str, torch.Tensor], _depth: int = 0) -> Any:
    """Inverse of `pack`. A key naming no tensor, a malformed entry or absurd nesting raises ValueError."""
    if _depth > MAX_DEPTH:
        raise ValueError(f"the state nests deeper than {MAX_DEPTH} levels")
    if isinstance(obj, dict):
        if _TENSOR in obj:
            key = obj[_TENSOR]
            if not isinstance(key, str) or key not in tensors:
                raise ValueError(f"the state names tensor {str(key)[:80]!r}, which tensors.safetensors lacks")
            return tensors[key]
        if _TUPLE in obj:
            if not isinstance(obj[_TUPLE], list):
                raise ValueError("a tuple entry of the state is not a list")
            return tuple(unpack(v, tensors, _depth + 1) for v in obj[_TUPLE])
        out = {}
        for k, v in obj.items():
            if k.startswith("i:"):
                try:
                    key: Any = int(k[2:])
                except ValueError:
                    raise ValueError(f"the state key {k[:80]!r} is not an integer key") from None
            elif k.startswith("s:"):
                key = k[2:]
            else:
                raise ValueError(f"the state key {k[:80]!r} is malformed")
            out[key] = unpack(v, tensors, _depth + 1)
        return out
    if isinstance(obj, list):
        return [unpack(v, tensors, _depth + 1) for v in obj]
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
        else:  # an older checkpoint holds every visible device's state (docs/reliability.md)
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


def _files_hash(files: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _write_manifest(folder: Path) -> None:
    files = {name: _sha256(folder / name) for name in _FILES}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"format": FORMAT, "files": files, "sha256": _files_hash(files)}, f)
        f.flush()
        os.fsync(f.fileno())


def _check_manifest(folder: Path) -> None:
    where = folder / MANIFEST
    try:
        manifest = json.loads(where.read_text())
        files, whole = manifest["files"], manifest["sha256"]
        if not isinstance(files, dict) or set(files) != set(_FILES) or _files_hash(files) != whole:
            raise ValueError
    except (ValueError, KeyError, TypeError, RecursionError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint '{where}' is truncated or corrupted; refusing to resume from it") \
            from None
    extra = sorted(p.name for p in folder.iterdir() if p.name not in _FILES and p.name != MANIFEST)
    if extra:
        raise CheckpointError(f"checkpoint '{folder}' holds files its manifest does not list ({', '.join(extra)}); "
                              f"refusing to resume from it")
    for name, expected in files.items():
        actual = _sha256(folder / name)
        if actual != expected:
            raise CheckpointError(f"checkpoint '{folder / name}' is corrupted: SHA-256 {actual[:12]}… does not "
                                  f"match the manifest's {str(expected)[:12]}…; refusing to resume from it")


class Checkpointer:
    """Saves and loads a run's state under ``<run dir>/checkpoints``."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.dir = Path(directory)
        self.keep = keep

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` (nested dicts of tensors and JSON values) as checkpoint ``step``, atomically."""
        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".tmp-step_{step:08d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tensors: dict[str, torch.Tensor] = {}
        body = pack(state, tensors)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            tensor_file = tmp / "tensors.safetensors"
            # safetensors refuses tensors that share storage; clone those views so each is saved on its own.
            try:
                save_file(_unshare(tensors), str(tensor_file))
            except OSError:
                raise
            except Exception as exc:  # SafetensorError wraps an I/O error (a full disk)
                if "No space" in str(exc) or "os error" in str(exc).lower():
                    raise OSError(errno.ENOSPC, str(exc).splitlines()[0]) from None
                raise
            meta = {"format": FORMAT, "step": step, "state": body}
            with open(tmp / "state.json", "w") as f:
                json.dump(meta, f)
                f.flush()
                os.fsync(f.fileno())
            with open(tensor_file, "rb+") as f:
                os.fsync(f.fileno())
            _write_manifest(tmp)  # last: a folder with a valid manifest was written whole
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.dir)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RunWriteError(f"cannot write checkpoint '{final}': {exc.strerror or exc}; earlier checkpoints "
                                f"are untouched") from None
        except Exception:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
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
        """Read a checkpoint folder; raise `CheckpointError` if it is truncated, corrupted or inconsistent.

        The manifest is checked first (every file's SHA-256 and one hash over all of them), then every field
        of state.json: ``format``, ``step`` (an int >= 0 equal to the folder's ``step_<n>``), ``state`` (a
        mapping whose tensor references all exist, nested at most `MAX_DEPTH` deep).
        """
        path = Path(path)
        state_file, tensor_file = path / "state.json", path / "tensors.safetensors"
        for f in (state_file, tensor_file):
            if not f.is_file():
                raise CheckpointError(f"checkpoint '{path}' is incomplete: '{f.name}' is missing")
        manifest = path / MANIFEST
        if manifest.is_file():
            _check_manifest(path)
        try:
            meta = json.loads(state_file.read_text())
        except (ValueError, RecursionError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"checkpoint '{state_file}' is truncated or corrupted "
                                  f"({type(exc).__name__}); refusing to resume from it") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"checkpoint '{state_file}' is truncated or corrupted (not a JSON object); "
                                  f"refusing to resume from it")
        fmt = meta.get("format")
        if fmt not in (1, FORMAT) or isinstance(fmt, bool):
            raise CheckpointError(f"checkpoint '{state_file}': format {fmt!r} is not one this plait reads "
                                  f"(1 or {FORMAT}); refusing to resume from it")
        if fmt == FORMAT and not manifest.is_file():
            raise CheckpointError(f"checkpoint '{path}' is incomplete: '{MANIFEST}' is missing; refusing to "
                                  f"resume from it")
        step = meta.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"checkpoint '{state_file}': step {step!r} is not an integer >= 0; refusing "
                                  f"to resume from it")
        if path.name.startswith("step_") and path.name[5:].isdigit() and int(path.name[5:]) != step:
            raise CheckpointError(f"checkpoint '{state_file}': step {step} does not match the folder name "
                                  f"'{path.name}'; refusing to resume from it")
        body = meta.get("state")
        if not isinstance(body, dict):
            raise CheckpointError(f"checkpoint '{state_file}': 'state' is missing or not a mapping; refusing "
                                  f"to resume from it")
        if fmt == 1:
            expected = meta.get("sha256")
            actual = _sha256(tensor_file)
            if actual != expected:
                raise CheckpointError(f"checkpoint '{tensor_file}' is corrupted: SHA-256 {actual[:12]}… does "
                                      f"not match the recorded {str(expected)[:12]}…; refusing to resume from it")
        try:
            tensors = load_file(str(tensor_file))
        except Exception as exc:
            raise CheckpointError(f"checkpoint '{tensor_file}' cannot be read: {exc}") from None
        try:
            return step, unpack(body, tensors)
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"checkpoint '{state_file}' is inconsistent: {exc}; refusing to resume "
                                  f"from it") from None


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


LOCK_FILE = ".plait.lock"


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run dir>/.plait.lock`` for the life of a run or resume.

    The holder writes its pid into the file; a second writer is refused in one line naming it. The file is
    removed on release (after checking, on acquire, that the locked file is still the one at the path).
    """

    def __init__(self, run_dir: str | Path):
        import fcntl

        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise RunWriteError(f"cannot create the lock file '{self.path}': {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_pid(fd)
                os.close(fd)
                from .errors import RunLockedError

                raise RunLockedError(f"run directory '{run_dir}' is in use by another plait process"
                                     f"{f' (pid {holder})' if holder else ''}; wait for it to finish or stop it "
                                     f"(its lock: '{self.path}')") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it between our open and flock: try again
        else:
            raise RunWriteError(f"cannot lock '{self.path}': it keeps being replaced")
        self.fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None
