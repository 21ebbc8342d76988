"""User-facing errors: one clear line, exit code 2, no traceback unless `--debug`."""
from __future__ import annotations


class PlaitError(Exception):
    """A problem with what the user asked for (config, files, plugins), not a bug in plait.

    The CLI prints ``error: <message>`` on one line and exits with `exit_code`.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # always one line


class ConfigError(PlaitError):
    """A config value is missing, unknown, of the wrong type or impossible."""


class PluginError(PlaitError):
    """A plugin failed to import or register, or two plugins clash."""


class CheckpointError(PlaitError):
    """A checkpoint is missing, truncated or corrupted."""


class RunWriteError(PlaitError):
    """Writing the run directory failed (a full disk, a read-only or failing file system): exit 1."""

    exit_code = 1


class RunLockedError(PlaitError):
    """Another process holds the run directory."""
