"""Logging what outsiders can repeat: the first event of a run is worth a line, the rest
are counted elsewhere (stats) and logged at debug level, so nobody who can reach a
callback URL or a Redis channel can flood a service's logs."""

from __future__ import annotations

import logging

__all__ = ["FirstOfRun"]


class FirstOfRun:
    """Logs the first event of a run at ``level``, the rest of it at DEBUG.

    A run lasts until [`end`][] (e.g. the next delivery with the right secret), so the
    first event after that is news again.
    """

    __slots__ = ("_level", "_logger", "_running")

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        self._logger = logger
        self._level = level
        self._running = False

    @property
    def running(self) -> bool:
        """Whether a run is on (its first event was logged)."""
        return self._running

    def log(self, message: str, *args: object) -> None:
        """Log one event of the run."""
        self._logger.log(logging.DEBUG if self._running else self._level, message, *args)
        self._running = True

    def end(self) -> None:
        """End the run: the next event is logged at ``level`` again."""
        self._running = False
