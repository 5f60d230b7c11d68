"""Turning command-line inputs into what the API takes: image files and task ids.

Both read files or stdin, so they run before the event loop starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .._images import MAX_IMAGE_URL_BYTES, image_url

__all__ = ["MAX_IMAGE_URL_BYTES", "UsageError", "image_reference", "out_folder", "read_task_ids"]

class UsageError(Exception):
    """The command line asks for something that cannot work (exit code 2)."""


def image_reference(value: str) -> str:
    """An ``--image`` value as the API takes it: URLs pass, a file becomes a data: URL."""
    try:
        return image_url(value, name=value)
    except FileNotFoundError:
        raise UsageError(f"image file not found: {value}") from None
    except OSError as exc:
        raise UsageError(f"cannot read image file {value}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def read_task_ids(values: Sequence[str], stdin: TextIO) -> list[str]:
    """The ids given, with ``-`` replaced by those read from ``stdin``; repeats dropped.

    Standard input holds whitespace-separated ids, or the ``--json`` document of
    another ``nanobanana`` command (its ``tasks[].id``).
    """
    ids: list[str] = []
    for value in values:
        if value == "-":
            ids.extend(_ids_from_text(stdin.read()))
        else:
            ids.append(value)
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise UsageError("no task ids given (stdin was empty)")
    return ids


def _ids_from_text(text: str) -> list[str]:
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            document = json.loads(stripped)
            return [str(task["id"]) for task in document["tasks"]]
        except (ValueError, KeyError, TypeError):
            raise UsageError(
                "stdin looks like JSON but not like nanobanana --json output"
            ) from None
    return stripped.split()


def out_folder(value: str | None) -> Path | None:
    """The ``--out`` folder, refused early when it exists as something else."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out must be a folder, but {value} is a file")
    if not os.access(path if path.exists() else _existing_parent(path), os.W_OK):
        raise UsageError(f"cannot write to {value}")
    return path


def _existing_parent(path: Path) -> Path:
    for parent in path.absolute().parents:
        if parent.exists():
            return parent
    return Path.cwd()
