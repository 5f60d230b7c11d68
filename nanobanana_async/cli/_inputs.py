"""Turning command-line inputs into what the API takes: image files and task ids.

Both read files or stdin, so they run before the event loop starts.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

from .._images import MAX_IMAGE_URL_BYTES, image_url
from .._protocol import check_task_id

__all__ = [
    "MAX_IMAGE_URL_BYTES",
    "UsageError",
    "image_reference",
    "out_folder",
    "read_prompt",
    "read_stdin",
    "read_task_ids",
]


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

    Standard input holds whitespace-separated ids and ``--json`` documents of other
    ``nanobanana`` commands, in any mix (several documents one after the other, as a
    loop of ``generate --no-wait --json`` prints them), or a batch's ``manifest.jsonl``.
    """
    ids: list[str] = []
    for value in values:
        if value == "-":
            ids.extend(_ids_from_text(read_stdin(stdin, "task ids")))
        else:
            ids.append(value)
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise UsageError("no task ids given (stdin was empty)")
    return ids


_WORD: Final = re.compile(r"\S+")
_SPACE: Final = re.compile(r"\s*")  # always matches, maybe empty


def _ids_from_text(text: str) -> list[str]:
    """Ids from a stream of words and JSON documents."""
    decoder = json.JSONDecoder()
    ids: list[str] = []
    position = _skip_space(text, 0)
    while position < len(text):
        if text[position] in "{[":
            try:
                value, position = decoder.raw_decode(text, position)
            except json.JSONDecodeError as exc:
                line = text.count("\n", 0, position) + 1
                raise UsageError(f"stdin holds broken JSON at line {line}: {exc.msg}") from None
            ids.extend(_ids_in(value))
        else:
            word = _WORD.match(text, position)
            assert word is not None
            ids.append(word.group())
            position = word.end()
        position = _skip_space(text, position)
    return ids


def _skip_space(text: str, position: int) -> int:
    space = _SPACE.match(text, position)
    return space.end() if space is not None else position


def _ids_in(value: object) -> list[str]:
    """The task ids in one JSON value of ours: a ``--json`` document (``tasks[].id``),
    a batch's (``jobs[].task_id``), a manifest line (``task_id``), or a list of those.
    A job with no task (``null``) has none; an id of another type is refused."""
    if isinstance(value, list):
        return [task_id for item in value for task_id in _ids_in(item)]
    if isinstance(value, dict):
        if isinstance(value.get("tasks"), list):
            return [_task_id(task.get("id")) for task in value["tasks"] if isinstance(task, dict)]
        if isinstance(value.get("jobs"), list):
            return [
                _task_id(job["task_id"])
                for job in value["jobs"]
                if isinstance(job, dict) and job.get("task_id") is not None
            ]
        if "task_id" in value:
            return [_task_id(value["task_id"])] if value["task_id"] is not None else []
        if isinstance(value.get("id"), str):
            return [_task_id(value["id"])]
    raise UsageError("stdin holds JSON that is not the --json output of a nanobanana command")


def _task_id(value: object) -> str:
    """A task id from a JSON document: a non-empty string (never ``str(None)``)."""
    try:
        return check_task_id(value)
    except ValueError:
        raise UsageError(
            f"stdin holds a task id that is not a non-empty string: {value!r:.60}"
        ) from None


def read_stdin(stdin: TextIO, what: str) -> str:
    """All of standard input as text, refused unless it is UTF-8 (bytes that are not
    would reach the service as a garbled prompt or id, and be paid for)."""
    try:
        raw = getattr(stdin, "buffer", None)
        if raw is not None:
            # The bytes themselves: a stream decoded by the locale (Latin-1, cp1252)
            # would take any bytes, and turn UTF-8 text into mojibake.
            text: str = raw.read().decode("utf-8")
        else:  # a text-only stream (a StringIO)
            text = stdin.read()
            text.encode("utf-8")  # read with surrogateescape, bad bytes are kept so
    except UnicodeError:
        raise UsageError(f"stdin is not UTF-8 text: cannot read the {what} from it") from None
    return text.replace("\r\n", "\n")


def read_prompt(value: str, stdin: TextIO) -> str:
    """The prompt argument; ``-`` reads it from standard input (all of it, trimmed)."""
    if value != "-":
        return value
    prompt = read_stdin(stdin, "prompt").strip()
    if not prompt:
        raise UsageError("no prompt given (stdin was empty)")
    return prompt


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
