"""Errors a user can act on.

`InputError` is raised for bad input or usage: the command line prints its one-line message and
exits with code 2, never a traceback. Anything else is an internal error (exit code 1). `warn`
tells the user about a problem that was worked around (a volume padded to the ROI, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path


def _line(message: str, path: str | Path | None) -> str:
    message = " ".join(str(message).split())  # always one line
    return f"{path}: {message}" if path is not None else message


class InputError(Exception):
    """Bad input or usage. `str(err)` is one line naming the file or option and the problem."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(_line(message, path))
        self.path = None if path is None else Path(path)


def warn(message: str, path: str | Path | None = None) -> None:
    """One `glmae: warning: <path>: <message>` line on stderr."""
    print(f"glmae: warning: {_line(message, path)}", file=sys.stderr, flush=True)


class TrainingError(Exception):
    """A run that cannot continue (non-finite loss, ...); the last good checkpoint is kept."""


class Interrupted(Exception):
    """SIGINT/SIGTERM during training: a checkpoint was written and `--resume` continues."""
