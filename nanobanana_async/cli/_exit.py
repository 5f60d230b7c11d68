"""The documented exit codes of ``nanobanana``."""

from __future__ import annotations

import enum

__all__ = ["ExitCode"]


class ExitCode(enum.IntEnum):
    """What the process tells its caller; see the package docstring."""

    OK = 0
    TASK_FAILED = 1
    USAGE = 2
    API_ERROR = 3
    TIMEOUT = 4
    INTERRUPTED = 130  # SIGINT (Ctrl-C)
    TERMINATED = 143  # SIGTERM
