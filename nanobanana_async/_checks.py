"""Argument checks shared by every public entry point: one wording, one set of rules.

A number must be a real one (never a bool, never NaN; infinite only where allowed), in
range, and a wrong one raises :class:`ValueError` naming the argument, before any work.
A NaN timeout would otherwise stall every timer of the event loop.
"""

from __future__ import annotations

import math

__all__ = ["check_count", "check_number", "check_timeout"]


def check_number(
    name: str,
    value: object,
    *,
    minimum: float = 0.0,
    strict: bool = True,
    allow_inf: bool = False,
) -> float:
    """``value`` as a float if it is a number above ``minimum`` (at it, unless ``strict``)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        finite = math.isfinite(number) or (allow_inf and number == math.inf)
        if finite and (number > minimum if strict else number >= minimum):
            return number
    rule = f"{'>' if strict else '>='} {minimum:g}"
    kind = "a number" if allow_inf else "a finite number"
    raise ValueError(f"{name} must be {kind} {rule}, got {value!r}")


def check_timeout(name: str, value: object) -> float | None:
    """A wait's deadline in seconds: a finite number >= 0, or None for no deadline."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number >= 0:
            return number
    raise ValueError(f"{name} must be a finite number of seconds >= 0, or None, got {value!r}")


def check_count(name: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) from ``minimum`` to ``maximum``."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and value >= minimum
        and (maximum is None or value <= maximum)
    ):
        return value
    upper = f" to {maximum}" if maximum is not None else " or more"
    raise ValueError(f"{name} must be an integer from {minimum}{upper}, got {value!r}")
