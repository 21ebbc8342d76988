"""Run tracking: TensorBoard event files, ``metrics.jsonl`` and a progress bar.

Tags are ``/``-namespaced (``train/loss``, ``eval/accuracy``, ``perf/steps_per_sec``, ``mem/peak_rss_gib``) so
TensorBoard groups them. Each `log` call writes one JSON line ``{"step": s, tag: value, …}`` and one scalar per
tag into the event file.
"""
from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


class MetricsLogger:
    """Writes metrics to TensorBoard and ``metrics.jsonl`` in a run directory."""

    def __init__(self, run_dir: str | Path, *, purge_after: int | None = None,
                 observers: Iterable[Callable[[int, dict], None]] = ()):
        self.dir = Path(run_dir)
        self.jsonl_path = self.dir / "metrics.jsonl"
        # Nothing is written until the first record (or `open`): a resume truncates metrics.jsonl and purges
        # TensorBoard only once its checkpoint has loaded into the built run, so a refusal changes nothing.
        self._purge_after = purge_after
        self._writer = None
        self._jsonl = None
        self._pending_text: list[tuple[str, str, int]] = []
        self.observers = list(observers)
        self.last: dict[str, float] = {}

    def open(self) -> None:
        """Truncate/purge what a resumed run rewrites and open the files (idempotent)."""
        if self._writer is not None:
            return
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: keep it off import paths

        purge_after = self._purge_after
        if purge_after is not None:
            _truncate_jsonl(self.jsonl_path, purge_after)
        # purge_step hides events of steps > purge_after written by an interrupted run (resume).
        self._writer = SummaryWriter(str(self.dir), purge_step=None if purge_after is None else purge_after + 1)
        self._jsonl = open(self.jsonl_path, "a")
        for tag, text, step in self._pending_text:
            self._writer.add_text(tag, text, step)
        self._pending_text = []

    @property
    def opened(self) -> bool:
        return self._writer is not None

    @property
    def writer(self):
        """The TensorBoard ``SummaryWriter`` (opening the logger)."""
        self.open()
        return self._writer

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for observe in self.observers:
            observe(step, metrics)
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None}
        for tag, value in clean.items():
            self.writer.add_scalar(tag, value, step)
        # strict JSON: a non-finite value is null (its status is the run's: summary.json says diverged)
        record = {"step": step, **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}
        try:
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self._jsonl.flush()
        except OSError as exc:
            from .errors import RunWriteError

            raise RunWriteError(f"cannot write '{self.jsonl_path}': {exc.strerror or exc}") from None
        self.last.update(clean)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self._writer is None:  # before the first record: kept until the run has opened its logger
            self._pending_text.append((tag, text, step))
            return
        self._writer.add_text(tag, text, step)

    def config(self, yaml_text: str) -> None:
        """The resolved config as a text summary ``config`` (TEXT tab), indented so it renders as code."""
        self.text("config", "    " + yaml_text.rstrip("\n").replace("\n", "\n    "), 0)  # deferred until open

    def hparams(self, config: dict[str, Any], metrics: dict[str, float]) -> None:
        """An hparams summary (HPARAMS tab): the flattened config keys against the run's final metrics.

        Written into this run's own event file (``SummaryWriter.add_hparams`` would open a sub-run and log the
        metrics twice); the metric columns read the scalar tags already logged.
        """
        from torch.utils.tensorboard.summary import hparams

        hp = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flatten(config).items()}
        final = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        writer = self.writer._get_file_writer()
        for summary in hparams(hp, final):
            writer.add_summary(summary)

    def flush(self) -> None:
        if self._writer is None:
            return
        self._writer.flush()
        self._jsonl.flush()
        os.fsync(self._jsonl.fileno())

    def close(self, *, write: bool = True) -> None:
        """Close the files; ``write=False`` (a refused resume) drops what was never opened."""
        if self._writer is None and write and self._pending_text:
            self.open()
        if self._writer is None:
            return
        self._writer.close()
        self._jsonl.close()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"run": {"seed": 0}}`` → ``{"run.seed": 0}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records of steps after ``last_step`` (written after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= last_step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            break  # a torn last line from a killed process
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class Progress:
    """A progress bar over training steps showing loss, step rate and ETA (tqdm); silent when disabled."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not enabled, file=sys.stderr, leave=True)

    def update(self, n: int = 1, **postfix: float) -> None:
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
