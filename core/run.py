"""Composing and executing a run.

``compose(cfg)`` validates the config against the registries, creates (or reopens, on resume) the run
directory, its metrics logger and checkpointer, and returns a `Run`. ``execute(cfg)`` composes, builds the
recipe, calls it between the ``on_run_start`` and ``on_run_end`` hooks and writes ``summary.json``.

``train_loop(run, task)`` is the step loop that step-based recipes share: logging cadence, evaluation,
checkpoints (every ``run.ckpt_every`` steps, at the end and on Ctrl-C), resume, and the progress bar.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from .checkpoint import Checkpointer, RunLock, rng_state, set_rng_state
from .config import Component, find_renamed, validate
from .errors import CheckpointError, ConfigError, PlaitError, RunWriteError
from .manager import PluginHost, get_host
from .metrics import MetricsLogger, Progress


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} requested but CUDA is not available here; use cpu or auto")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise ConfigError(f"run.device: {name!r} but this machine shows {count} CUDA device(s); allowed: "
                              f"cuda:0 … cuda:{count - 1}")
        torch.cuda.set_device(device)  # kernels (Triton) and CUDA RNG state follow the current device
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"run.device: {name!r} requested but MPS is not available here; use cpu or auto")
    return device


@dataclass
class Run:
    """A composed run: config, validated components, run directory and trackers."""

    cfg: DictConfig
    components: dict[str, Any]
    host: PluginHost
    dir: Path
    device: torch.device
    logger: MetricsLogger
    checkpointer: Checkpointer
    resume_state: tuple[int, dict] | None = None  # (step, state) of the checkpoint resumed from
    status: str = "running"
    summary: dict[str, Any] = field(default_factory=dict)
    parallel: Any = None  # the ``parallel:`` strategy, built before anything else (None without the section)
    lock: Any = None  # rank 0's `RunLock` on the run directory, released by `execute` at the end

    @property
    def rank(self) -> int:
        """This process's rank; only rank 0 writes the run directory, metrics and checkpoints."""
        return int(getattr(self.parallel, "rank", 0))

    def has(self, section: str) -> bool:
        return section in self.components

    def options(self, section: str) -> Any:
        """The validated options dataclass of a section."""
        return self._component(section).options

    def _component(self, section: str) -> Component:
        try:
            return self.components[section]
        except KeyError:
            raise ConfigError(f"{section}: missing; this recipe needs a '{section}:' section") from None

    def build(self, section: str, **runtime: Any) -> Any:
        """Build the component of ``section`` from its entry: ``factory(**options, **runtime)``.

        A ``ValueError`` or ``FileNotFoundError`` raised by the factory is a problem with the config: it is
        re-raised as `ConfigError` naming the section.
        """
        comp = self._component(section)
        if isinstance(comp, list):  # a chain (grad_transform: [..]): built in order, one TransformChain
            return _build_chain(comp, runtime)
        return _call_factory(comp, runtime)

    def build_transforms(self) -> list:
        """The callables of the ``transforms:`` list, in order."""
        return [_call_factory(c, {}) for c in self.components.get("transforms", [])]

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.logger.log(step, metrics)


def _build_chain(comps: list[Component], runtime: dict[str, Any]) -> Any:
    """Members in config order; a data-reading member before the private one switches to its private-compatible
    mode (``compose_before_private()``; the pairing was checked at validate by `plait.config.check_chain`)."""
    from .step import TransformChain

    members = [_call_factory(c, runtime) for c in comps]
    private = [i for i, c in enumerate(comps) if c.entry.extra.get("private")]
    for i, (c, m) in enumerate(zip(comps, members)):
        if private and i < private[0] and c.entry.extra.get("reads_data"):
            m.compose_before_private()
    return TransformChain(members, [c.entry.name for c in comps])


def _call_factory(comp: Component, runtime: dict[str, Any]) -> Any:
    try:
        return comp.entry.factory(**comp.kwargs(), **runtime)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"{comp.section} {comp.entry.name!r}: {exc}") from exc


def _new_run_dir(out_dir: str, name: str) -> Path:
    base = Path(out_dir) / name
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = base / stamp, 1
    try:
        base.mkdir(parents=True, exist_ok=True)
        while True:  # an atomic mkdir per candidate: processes started in the same second get distinct folders
            try:
                path.mkdir()
                return path
            except FileExistsError:
                path, n = base / f"{stamp}-{n}", n + 1
    except OSError as exc:
        raise ConfigError(f"run.out_dir: cannot create the run directory '{path}': {exc.strerror or exc}") from None


RESUME_FREE = ("resume", "progress", "steps", "device", "log_every", "eval_every", "ckpt_every", "keep_checkpoints",
               "out_dir", "name", "on_nonfinite")  # run keys a resume may change; everything else must equal the saved config


def _check_resume_config(cfg: DictConfig, run_dir: Path, registries: Any = None) -> None:
    """A resume continues the *same* run: a different model, data or optimizer would load a state that does
    not fit (a traceback) or silently train something else under the old config.yaml."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return  # a run directory written by hand or by an older plait: nothing to compare with
    try:
        saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"run.resume: cannot read '{saved_path}': {exc}") from None
    renamed = find_renamed(saved, registries) if registries is not None else None
    if renamed is not None:  # written before an entry or option was renamed: say so, not just "differs"
        raise ConfigError(f"run.resume: '{saved_path}' is older than a rename ({renamed}); write the new name "
                          f"there to resume this run")
    now = OmegaConf.to_container(cfg, resolve=True)
    for cur in (saved, now):
        for key in RESUME_FREE:
            (cur.get("run") or {}).pop(key, None)
        cur.pop("parallel", None)  # how the run is launched; a strategy checks what it can resume from
    diff = _first_difference(saved, now)
    if diff is not None:
        key, old, new = diff
        raise ConfigError(f"run.resume: the config differs from '{saved_path}' at {key} ({old!r} -> {new!r}); "
                          f"resume with the same config and overrides (only run.steps and logging keys may change)")


def _first_difference(a: Any, b: Any, prefix: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                return sub, a.get(key, "<absent>"), b.get(key, "<absent>")
            found = _first_difference(a[key], b[key], sub)
            if found is not None:
                return found
        return None
    return None if a == b else (prefix, a, b)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunWriteError(f"cannot write '{path}': {exc.strerror or exc}") from None


class _NullWriter:
    """A TensorBoard writer that writes nothing: every ``add_*`` call is a no-op."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class _NullLogger:
    """The metrics logger of ranks other than 0: they compute the same metrics but write nothing."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.writer = _NullWriter()  # recipes write images through logger.writer (rank 0 only writes them)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.last.update({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    def text(self, tag: str, text: str, step: int = 0) -> None:
        pass

    def config(self, yaml_text: str) -> None:
        pass

    def hparams(self, config: dict, metrics: dict) -> None:
        pass

    def flush(self) -> None:
        pass

    def open(self) -> None:
        pass

    def close(self, *, write: bool = True) -> None:
        pass


class _NoCheckpoints(Checkpointer):
    """The checkpointer of ranks other than 0: reads like rank 0's (resume), never writes."""

    def save(self, step: int, state: dict) -> Path:
        return self.dir / f"step_{step:08d}"


def _start_parallel(cfg: DictConfig, components: dict[str, Any]) -> Any:
    """Build the ``parallel:`` strategy first (it may start a process group) and let it check that every rank
    runs the same resolved config (its optional ``check_config(text)``)."""
    world = os.environ.get("WORLD_SIZE", "1")
    comp = components.get("parallel")
    if world.isdigit() and int(world) > 1 and (comp is None or comp.entry.extra.get("max_world") == 1):
        what = "no 'parallel:' section" if comp is None else f"parallel {comp.entry.name!r} (one process)"
        raise ConfigError(f"WORLD_SIZE={world}: the config has {what}, so every rank would run the same "
                          f"training; set parallel.name to a strategy that splits the work (plait ls parallel)")
    if comp is None:
        return None
    parallel = _call_factory(comp, {})
    check = getattr(parallel, "check_config", None)
    if check is not None:
        check(OmegaConf.to_yaml(cfg))
    return parallel


def compose(cfg: DictConfig, host: PluginHost | None = None) -> Run:
    """Validate, seed, and set up the run directory. Nothing is written before validation passes.

    With a ``parallel:`` strategy of several ranks, rank 0 creates the run directory and hands its path to the
    others (the strategy's optional ``broadcast_object``); only rank 0 writes metrics and checkpoints.
    """
    host = host or get_host()
    host.check_healthy()
    components = validate(cfg, host.registries)
    device = resolve_device(cfg.run.device)
    parallel = _start_parallel(cfg, components)
    main = int(getattr(parallel, "rank", 0)) == 0
    resume_state = None
    if cfg.run.resume:
        run_dir = Path(cfg.run.resume)
        if not run_dir.is_dir():
            raise CheckpointError(f"run.resume: '{run_dir}' is not a run directory")
        latest = Checkpointer(run_dir / "checkpoints").latest()
        if latest is None:
            raise CheckpointError(f"run.resume: '{run_dir}' has no complete checkpoint under checkpoints/")
        lock = RunLock(run_dir) if main else None
        try:
            _check_resume_config(cfg, run_dir, host.registries)
            resume_state = Checkpointer.load(latest)
            if 0 < cfg.run.steps <= resume_state[0]:  # before the logger truncates anything of the finished run
                raise CheckpointError(f"run.resume: '{run_dir}' already finished step {resume_state[0]} of "
                                      f"run.steps={cfg.run.steps}; raise run.steps to train further")
        except BaseException:
            if lock is not None:
                lock.release()
            raise
    else:
        run_dir = _new_run_dir(cfg.run.out_dir, cfg.run.name) if main else Path(cfg.run.out_dir) / cfg.run.name
        lock = RunLock(run_dir) if main else None
        if main:
            _write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
        share = getattr(parallel, "broadcast_object", None)
        if share is not None:
            run_dir = Path(share(str(run_dir)))
    seed_everything(cfg.run.seed)
    if not cfg.run.progress:
        _quiet_library_progress()
    observers = [(lambda step, metrics, f=f: f(run=run, step=step, metrics=metrics))
                 for f in host.observers("on_log")]
    if main:
        logger = MetricsLogger(run_dir, purge_after=resume_state[0] if resume_state else None, observers=observers)
        logger.config(OmegaConf.to_yaml(cfg))
        checkpointer = Checkpointer(run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
    else:
        logger, checkpointer = _NullLogger(), _NoCheckpoints(run_dir / "checkpoints")
    run = Run(cfg, components, host, run_dir, device, logger, checkpointer, resume_state, parallel=parallel,
              lock=lock)
    return run


def _quiet_library_progress() -> None:
    """``run.progress=false``: also silence the libraries' own bars (Hugging Face's "Loading weights",
    hub downloads), when they are installed."""
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def execute(cfg: DictConfig, host: PluginHost | None = None) -> Run:
    """Compose a run and perform its recipe; returns the finished `Run` (``run.status``, ``run.summary``)."""
    run = compose(cfg, host)
    hook = run.host.pm.hook
    t0 = time.time()
    try:
        recipe = run.build("recipe", run=run)
    except (PlaitError, KeyboardInterrupt):
        # a bad value found (or Ctrl-C) while building, before any step: leave no half-made run directory behind
        run.logger.close(write=False)
        if run.resume_state is None and run.rank == 0:
            shutil.rmtree(run.dir, ignore_errors=True)
            with contextlib.suppress(OSError):  # the <out_dir>/<name>/ folder it alone was in
                run.dir.parent.rmdir()
        _release(run)
        _close_parallel(run)
        raise
    hook.on_run_start(run=run)
    keep_summary = False  # a resume whose checkpoint does not load leaves the earlier summary.json as it was
    try:
        result = recipe() or {}
        if run.status == "running":
            run.status = "completed"
        run.summary.update(result)
    except BaseException as exc:
        run.status = "failed" if run.status == "running" else run.status
        # a resume refused before its logger opened (checkpoint, budget) leaves the run directory as it was
        keep_summary = run.resume_state is not None and (isinstance(exc, CheckpointError) or (
            isinstance(exc, PlaitError) and not getattr(run.logger, "opened", True)))
        raise
    finally:
        hook.on_run_end(run=run, status=run.status)
        run.summary.update({"status": run.status, "run_dir": str(run.dir),
                            "wall_seconds": round(time.time() - t0, 3)})
        run.summary.setdefault("final", dict(run.logger.last))
        try:
            if not keep_summary:  # a refused resume leaves the run directory as it was
                run.logger.hparams(OmegaConf.to_container(run.cfg, resolve=True), run.summary["final"])
            run.logger.close(write=not keep_summary)
            if run.rank == 0 and not keep_summary:
                _write_atomic(run.dir / "summary.json", _strict_json(run.summary))
        finally:
            _release(run)
            _close_parallel(run)
    return run


def _release(run: Run) -> None:
    if run.lock is not None:
        run.lock.release()


def _strict_json(summary: dict[str, Any]) -> str:
    """summary.json is strict JSON: a non-finite number is written as null."""
    return json.dumps(_finite_or_none(summary), indent=2, default=str, allow_nan=False) + "\n"


def _finite_or_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _close_parallel(run: Run) -> None:
    close = getattr(run.parallel, "close", None)
    if close is not None:
        close()


class Task(Protocol):
    """What `train_loop` drives. ``state_dict`` may hold tensors and JSON values (no pickle).

    Optional: ``log_metrics(step) -> dict[str, float]``, called only at the steps that are logged and
    merged as is (not averaged over the window): for values that are cumulative or costly to compute
    (e.g. a privacy accountant's ε).

    Under ``run.on_nonfinite=skip`` a step whose loss is not finite is undone: `train_loop` copies the state
    before each step and loads it back. Optional, for that case: ``skips_nonfinite = True`` — the task's own
    step already leaves the learned state untouched when its loss is not finite, so no copy is made (ZO: an
    offloaded model too large to copy); ``progress_state() -> dict`` and ``load_progress_state(state)`` — what
    the undo keeps from after the step (the data generator, so that the next step draws another batch; a DP
    accountant, since the step's mechanism ran).
    """

    def train_step(self, step: int) -> dict[str, float]: ...

    def evaluate(self) -> dict[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@contextlib.contextmanager
def preserved_rng():
    """Evaluation must not shift the training RNG streams (so a resumed run matches an uninterrupted one)."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def _eval_splitter(run: Any) -> Any:
    """The ``parallel:`` strategy if it declares ``splits_eval = True`` (then it defines ``eval_share``,
    ``eval_sum`` and ``eval_gather``), else None: every rank evaluates the whole set, as one process does."""
    par = getattr(run, "parallel", None)
    return par if getattr(par, "splits_eval", False) else None


def eval_share(run: Any, n: int, align: int = 1) -> range:
    """The items of an evaluation set of ``n`` that this rank evaluates: all of them, unless the ``parallel:``
    strategy splits evaluation (its ``eval_share(n, align)``; ddp: a contiguous share of whole blocks of
    ``align`` items, so that eval batches of ``align`` are the batches one process forms). What a recipe sums
    over its share it then totals with `eval_sum`; per-item values (predictions) it collects with `eval_gather`.
    Every rank must call these (they are collectives under a splitting strategy)."""
    par = _eval_splitter(run)
    return range(n) if par is None else par.eval_share(n, max(1, int(align)))


def eval_sum(run: Any, values: list[float]) -> list[float]:
    """``values`` summed over the ranks that share the evaluation (as given without such a strategy)."""
    par = _eval_splitter(run)
    return [float(v) for v in values] if par is None else par.eval_sum(values)


def eval_gather(run: Any, values: torch.Tensor) -> torch.Tensor:
    """Per-item ``values`` of every rank's `eval_share`, concatenated in rank order along dim 0: the values of
    the whole set, in its order (as given without a splitting strategy)."""
    par = _eval_splitter(run)
    return values if par is None else par.eval_gather(values)


def train_loop(run: Run, task: Task, *, loss_key: str = "train/loss") -> dict[str, Any]:
    """Run ``task.train_step`` for steps ``1..run.steps`` with logging, evaluation and checkpoints.

    Metrics of ``train_step`` are averaged over each ``log_every`` window (plus ``task.log_metrics(step)`` at
    the logged steps, when the task has it). Returns the summary fields:
    ``{"first_eval": …, "final_eval": …, "steps": …}``.
    """
    rc = run.cfg.run
    start, window, first_eval = 0, {}, None
    if run.resume_state is not None:
        start, state = run.resume_state
        try:
            task.load_state_dict(state["task"])
            window, first_eval = state["loop"]["window"], state["loop"]["first_eval"]
            set_rng_state(state["rng"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"run.resume: the checkpoint of step {start} in '{run.dir}' does not fit this "
                                  f"run ({type(exc).__name__}: {msg})") from exc
        run.logger.open()  # only now: truncate metrics.jsonl / purge TensorBoard past the checkpoint
    else:
        with preserved_rng():
            first_eval = task.evaluate()
        if first_eval:
            run.log(0, first_eval)

    def save(step: int) -> None:
        run.checkpointer.save(step, {"task": task.state_dict(), "rng": rng_state(),
                                     "loop": {"window": window, "first_eval": first_eval}})

    progress = Progress(rc.steps, initial=start, enabled=rc.progress and getattr(run, "rank", 0) == 0)
    step, final_eval, t_window = start, None, time.perf_counter()
    skip = rc.get("on_nonfinite", "stop") == "skip"
    copy_before = skip and not getattr(task, "skips_nonfinite", False)
    skipped = int(run.summary.get("skipped_steps", 0))
    stop_at = None  # after a Ctrl-C: the step after which to checkpoint and stop (`_agree_stop`)
    with _stop_on_sigint() as stop:
        try:
            for step in range(start + 1, rc.steps + 1):
                before = _clone_state(task.state_dict()) if copy_before else None
                metrics = task.train_step(step)
                loss = metrics.get(loss_key)
                if isinstance(loss, (int, float, torch.Tensor)) and not np.isfinite(float(loss)):
                    if not skip:  # stop: keep the last good checkpoint, say so in one line and in summary.json
                        run.status = "diverged"
                        run.summary["diverged_at"] = step
                        print(f"plait: step {step}: {loss_key} is {float(loss)}; stopping (status diverged; the "
                              f"last good checkpoint is kept; run.on_nonfinite=skip skips such updates)",
                              file=sys.stderr)
                        return {"first_eval": first_eval, "final_eval": final_eval, "steps": step - 1}
                    if before is not None:  # skip: undo the update of this step, keeping its progress
                        kept = _clone_state(task.progress_state()) if hasattr(task, "progress_state") else None
                        task.load_state_dict(before)
                        if kept is not None:
                            task.load_progress_state(kept)
                    skipped += 1
                    run.summary["skipped_steps"] = skipped
                    metrics = {"train/skipped_nonfinite": 1.0}
                elif skip:
                    metrics = {**metrics, "train/skipped_nonfinite": 0.0}
                for k, v in metrics.items():
                    s, n = window.get(k, (0.0, 0))
                    window[k] = (s + float(v), n + 1)
                if step % rc.log_every == 0 or step == rc.steps:
                    averaged = {k: s / n for k, (s, n) in window.items() if n}
                    elapsed = time.perf_counter() - t_window
                    averaged["perf/steps_per_sec"] = _window_len(window) / elapsed if elapsed > 0 else 0.0
                    if hasattr(task, "log_metrics"):
                        averaged.update(task.log_metrics(step) or {})
                    run.log(step, averaged)
                    window, t_window = {}, time.perf_counter()
                if step == rc.steps or (rc.eval_every and step % rc.eval_every == 0):
                    with preserved_rng():
                        final_eval = task.evaluate()
                    if final_eval:
                        run.log(step, final_eval)
                if step != rc.steps and rc.ckpt_every and step % rc.ckpt_every == 0:
                    save(step)
                progress.update(1, loss=metrics.get(loss_key, float("nan")))
                if stop.requested and stop_at is None:
                    stop_at = _agree_stop(run, step)
                if stop_at is not None and step >= stop_at and step != rc.steps:
                    save(step)
                    run.status = "interrupted"
                    run.summary["interrupted_at"] = step
                    return {"first_eval": first_eval, "final_eval": final_eval, "steps": step}
            if rc.steps > start:
                save(rc.steps)
        finally:
            progress.close()
            run.logger.flush()
    return {"first_eval": first_eval, "final_eval": final_eval, "steps": rc.steps}


def _agree_stop(run: Any, step: int) -> int:
    """The step at which a Ctrl-C noticed at the end of ``step`` stops the run: this one in one process; across
    the ranks of a multi-process strategy (``agree_stop``, `plait.distributed.ProcessGroup`) the first rank's
    proposal of the next step, so that every rank checkpoints and stops after the same step."""
    par = getattr(run, "parallel", None)
    if par is None or int(getattr(par, "world_size", 1)) <= 1 or not hasattr(par, "agree_stop"):
        return step
    return par.agree_stop(f"plait/stop_at/{Path(run.dir).name}", step + 1)


class _StopFlag:
    requested = False


@contextlib.contextmanager
def _stop_on_sigint():
    """First Ctrl-C: finish the current step, checkpoint, stop. Second Ctrl-C: stop at once."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("\nplait: Ctrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _clone_state(state: Any) -> Any:
    """A copy of a task state that the next step cannot change (``state_dict`` returns live tensors)."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_clone_state(v) for v in state)
    return copy.deepcopy(state)


def _window_len(window: dict[str, tuple[float, int]]) -> int:
    return max((n for _, n in window.values()), default=0)
