"""The jobs of ``nanobanana batch``: a prompts file (one per line) or a JSON-lines file.

Read before the event loop starts, like every other input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TextIO

from ..batch import BatchJob
from ._inputs import UsageError, read_stdin

__all__ = ["JOB_FIELDS", "read_jobs"]

#: The fields a JSON-lines job may have; ``prompt`` is the only one required.
JOB_FIELDS: Final = frozenset(
    {"key", "prompt", "image_urls", "model", "aspect_ratio", "resolution", "count"}
)
_JSONL_SUFFIXES: Final = frozenset({".jsonl", ".ndjson"})


def read_jobs(source: str, stdin: TextIO, defaults: Mapping[str, Any]) -> list[BatchJob]:
    """The jobs in ``source`` (a path, or ``-`` for stdin), options defaulting to ``defaults``.

    A prompts file has one prompt per line; blank lines and lines starting with ``#``
    are skipped, and each prompt's key is its line number. A ``.jsonl`` file (or any
    input whose first job line starts with ``{``) has one JSON object per line, with
    the fields of :data:`JOB_FIELDS`; its key defaults to the line number too.
    """
    name = "stdin" if source == "-" else source
    if source == "-":
        text = read_stdin(stdin, "prompts")
    else:
        try:
            text = Path(source).expanduser().read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UsageError(f"prompts file not found: {source}") from None
        except (OSError, UnicodeError) as exc:
            raise UsageError(f"cannot read prompts file {source}: {exc}") from None
    # Lines end at "\n" alone (a "\r" before it is stripped): str.splitlines would also
    # cut at U+2028, form feeds and the like, making more (paid) jobs than the file has
    # lines, keyed by numbers that are not its line numbers.
    lines = [
        (number, line.strip())
        for number, line in enumerate(text.split("\n"), start=1)
        if line.strip() and not line.strip().startswith("#")
    ]
    if not lines:
        raise UsageError(f"no prompts in {name}")
    as_json = Path(source).suffix.lower() in _JSONL_SUFFIXES or lines[0][1].startswith("{")
    jobs = []
    for number, line in lines:
        try:
            jobs.append(
                _json_job(number, line, defaults) if as_json else _line_job(number, line, defaults)
            )
        except ValueError as exc:
            raise UsageError(f"{name}, line {number}: {exc}") from None
    return jobs


def _line_job(number: int, prompt: str, defaults: Mapping[str, Any]) -> BatchJob:
    job = BatchJob(str(number), prompt, **defaults)
    job.check()
    return job


def _json_job(number: int, line: str, defaults: Mapping[str, Any]) -> BatchJob:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not a JSON object: {exc.msg}") from None
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    unknown = set(fields) - JOB_FIELDS
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; a job has {sorted(JOB_FIELDS)}")
    if not isinstance(fields.get("prompt"), str):
        raise ValueError('a job needs a "prompt" string')
    key = fields.pop("key", number)
    if isinstance(key, bool) or not isinstance(key, str | int):
        raise ValueError(f'"key" must be a string or a number, got {key!r}')
    image_urls = fields.pop("image_urls", [])
    if not isinstance(image_urls, list) or not all(isinstance(url, str) for url in image_urls):
        raise ValueError('"image_urls" must be a list of URLs')
    job = BatchJob(str(key), image_urls=image_urls, **{**defaults, **fields})
    job.check()
    return job
