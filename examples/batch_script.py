"""A batch script: prompts from a file in, one JSON line per finished image out, resumable.

Each non-blank line of the prompts file (``#`` starts a comment) is one prompt, known
by its line number. Prompts go out in windows of ``--max-in-flight`` tasks; the tasks of
a window are reported as they finish (``as_completed``), then the next window starts.

Two files make it resumable:

* ``--out`` (default ``results.jsonl``): one line per finished prompt, ``{"line",
  "prompt", "task_id", "state", "image_urls", "error"}``;
* the journal, ``<out>.journal``: one line per submission, ``{"line", "prompt",
  "task_id"}``, written as soon as the service gives the task id.

Run it again after a crash, a Ctrl-C or a timeout and it skips finished prompts, waits
on tasks it already submitted (never paying for them twice) and submits the rest.
Only a crash in the moment between the service's answer and the journal write can
lose a task id. Try it against the fake server::

    ACEDATACLOUD_API_TOKEN=test-token python examples/batch_script.py prompts.txt \\
        --base-url http://127.0.0.1:8765 --out results.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterable, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any, TextIO

import attrs

from nanobanana_async import (
    BadRequestError,
    NanoBananaClient,
    NanoBananaError,
    PermissionDeniedError,
    Task,
    TaskTimeoutError,
)


@attrs.define
class Summary:
    """What one run did; ``pending`` counts prompts left for the next run."""

    skipped: int = 0  # finished in an earlier run
    resumed: int = 0  # submitted in an earlier run, waited on in this one
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0  # finished without an image, or refused at submission
    pending: int = 0


def read_prompts(path: Path) -> dict[int, str]:
    """Prompts by line number (1-based); blank lines and ``#`` comments are skipped."""
    prompts = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#"):
            prompts[number] = text
    return prompts


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn last line (a crash mid-write) is dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append(out: TextIO, record: dict[str, Any], *, durable: bool = False) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
    out.flush()
    if durable:  # the journal is what stops us paying twice: make it reach the disk
        os.fsync(out.fileno())


async def run(
    client: NanoBananaClient,
    prompts_path: Path,
    out_path: Path,
    *,
    max_in_flight: int = 8,
    timeout: float = 600.0,
    model: str | None = None,
    echo: bool = True,
) -> Summary:
    """Process the prompts file into ``out_path``, resuming from earlier runs."""
    prompts = read_prompts(prompts_path)
    journal_path = out_path.with_name(out_path.name + ".journal")
    finished = {record["line"] for record in read_jsonl(out_path)}
    submitted: dict[int, str] = {}
    for record in read_jsonl(journal_path):
        line = record["line"]
        if prompts.get(line) != record["prompt"]:
            raise ValueError(
                f"line {line} of {prompts_path} changed since it was submitted; "
                f"use a new --out or remove {journal_path}"
            )
        submitted[line] = record["task_id"]
    summary = Summary(skipped=sum(1 for line in prompts if line in finished))
    todo = [line for line in prompts if line not in finished]
    total = len(prompts)

    def say(text: str) -> None:
        if echo:
            print(text, flush=True)

    with (
        out_path.open("a", encoding="utf-8") as out,
        journal_path.open("a", encoding="utf-8") as journal,
    ):

        def record_result(
            line: int,
            task_id: str | None,
            state: str,
            task: Task | None,
            error: dict[str, Any] | None = None,
        ) -> None:
            failure = task.failure if task is not None else None
            if failure is not None:
                error = {"code": failure.code, "message": failure.message}
            append(
                out,
                {
                    "line": line,
                    "prompt": prompts[line],
                    "task_id": task_id,
                    "state": state,
                    "image_urls": task.image_urls if task is not None else [],
                    "error": error,
                },
            )
            if state == "succeeded":
                summary.succeeded += 1
            else:
                summary.failed += 1
            done = summary.skipped + summary.succeeded + summary.failed
            say(f"[{done}/{total}] line {line}: {state} {task_id or ''}".rstrip())

        async def submit(line: int) -> tuple[int, str] | None:
            if line in submitted:
                summary.resumed += 1
                return line, submitted[line]
            try:
                submission = await client.generate(prompts[line], model=model)
            except (BadRequestError, PermissionDeniedError) as exc:
                if isinstance(exc, PermissionDeniedError) and exc.code != "forbidden":
                    raise  # e.g. used_up: every later prompt would fail the same way
                record_result(
                    line, None, "rejected", None, {"code": exc.code, "message": exc.message}
                )
                return None
            append(
                journal,
                {"line": line, "prompt": prompts[line], "task_id": submission.task_id},
                durable=True,
            )
            summary.submitted += 1
            return line, submission.task_id

        for window in _windows(todo, max_in_flight):
            outcomes = await asyncio.gather(
                *(submit(line) for line in window), return_exceptions=True
            )
            started = [o for o in outcomes if isinstance(o, tuple)]
            errors = [o for o in outcomes if isinstance(o, BaseException)]
            line_of = {task_id: line for line, task_id in started}
            try:
                async with aclosing(client.as_completed(line_of, timeout=timeout)) as tasks:
                    async for task in tasks:
                        state = "failed" if task.failure is not None else "succeeded"
                        record_result(line_of.pop(task.id), task.id, state, task)
            except TaskTimeoutError:
                say(
                    f"{len(line_of)} task(s) still running after {timeout:g} s; "
                    "run again to pick them up"
                )
            if errors:
                raise errors[0]
            if line_of:
                break
    summary.pending = total - summary.skipped - summary.succeeded - summary.failed
    return summary


def _windows(items: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate an image per line of a file.")
    parser.add_argument("prompts", type=Path, help="a text file, one prompt per line")
    parser.add_argument("--out", type=Path, default=Path("results.jsonl"))
    parser.add_argument("--max-in-flight", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=600.0, help="per window, seconds")
    parser.add_argument("--model")
    parser.add_argument("--base-url", default=os.environ.get("ACEDATACLOUD_API_BASE_URL"))
    parser.add_argument(
        "--token",
        default=os.environ.get("ACEDATACLOUD_API_TOKEN"),
        help="API token (better: the ACEDATACLOUD_API_TOKEN environment variable)",
    )
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("pass --token or set ACEDATACLOUD_API_TOKEN")
    if args.max_in_flight < 1:
        parser.error("--max-in-flight must be at least 1")
    return args


async def amain(argv: Sequence[str] | None = None) -> int:
    """The script as a coroutine; the exit status is 0 once every prompt is finished."""
    args = parse_args(argv)
    async with NanoBananaClient(args.token, base_url=args.base_url) as client:
        try:
            summary = await run(
                client,
                args.prompts,
                args.out,
                max_in_flight=args.max_in_flight,
                timeout=args.timeout,
                model=args.model,
            )
        except (NanoBananaError, ValueError) as exc:
            print(f"stopped: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(attrs.asdict(summary)))
    return 0 if summary.pending == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(amain()))
