"""Errors a user can act on.

`InputError` is raised for bad input or usage: the command line prints its one-line message and
exits with code 2, never a traceback. Anything else is an internal error (exit code 1).
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input or usage. `str(err)` is one line naming the file or option and the problem."""

    def __init__(self, message: str, path: str | Path | None = None):
        message = " ".join(str(message).split())  # always one line
        super().__init__(f"{path}: {message}" if path is not None else message)
        self.path = None if path is None else Path(path)


class TrainingError(Exception):
    """A run that cannot continue (non-finite loss, ...); the last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM during training: a checkpoint was written and `--resume` continues."""
