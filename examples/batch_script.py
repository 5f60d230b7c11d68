"""A batch script: a file of prompts in, images and a manifest out, resumable.

A thin use of :mod:`nanobanana_async.batch` (the ``nanobanana batch`` command is the
same runner with progress bars). Each non-blank line of the prompts file (``#`` starts
a comment) is one job, known by its line number. At most ``--max-in-flight`` tasks are
pending at once; a new one is submitted as soon as one finishes.

Everything lives in the ``--out`` folder: the images (``<line>-<index>.png``),
``manifest.jsonl`` (one line per prompt: state, task ids, image URLs, files, error)
and the journal (``.journal.sqlite3``), which records each submission before it is
sent and its task id as soon as the service answers. Run it again after a crash, a
kill or a Ctrl-C and it skips finished prompts, waits on the tasks it already
submitted (never paying for them twice) and submits the rest. Try it against the
fake server::

    ACEDATACLOUD_API_TOKEN=test-token python examples/batch_script.py prompts.txt \\
        --base-url http://127.0.0.1:8765 --out results/
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nanobanana_async import NanoBananaClient, NanoBananaError
from nanobanana_async.batch import BatchJob, BatchRunner, BatchSummary


def read_jobs(path: Path, model: str | None = None) -> list[BatchJob]:
    """One job per prompt line, keyed by its line number; blanks and ``#`` comments skipped."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [
        BatchJob(str(number), line.strip(), model=model)
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.strip().startswith("#")
    ]


async def run(
    client: NanoBananaClient,
    prompts_path: Path,
    out: Path,
    *,
    max_in_flight: int = 8,
    retries: int = 0,
    model: str | None = None,
    echo: bool = True,
) -> BatchSummary:
    """Process the prompts file into ``out``, resuming from earlier runs."""
    jobs = await asyncio.to_thread(read_jobs, prompts_path, model)
    runner = BatchRunner(
        client,
        jobs,
        journal=out / ".journal.sqlite3",
        out=out,
        manifest=out / "manifest.jsonl",
        max_in_flight=max_in_flight,
        retries=retries,
    )
    async with runner:
        async for result in runner:
            if echo:
                error = f" ({result.error.code})" if result.error else ""
                print(f"line {result.job.key}: {result.state.value}{error}", flush=True)
    return runner.summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate an image per line of a file.")
    parser.add_argument("prompts", type=Path, help="a text file, one prompt per line")
    parser.add_argument("--out", type=Path, default=Path("results"), help="the output folder")
    parser.add_argument("--max-in-flight", type=int, default=8)
    parser.add_argument("--retries", type=int, default=0, help="new tries of a failed task")
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
    """The script as a coroutine; the exit status is 0 once every prompt succeeded."""
    args = parse_args(argv)
    async with NanoBananaClient(args.token, base_url=args.base_url) as client:
        try:
            summary = await run(
                client,
                args.prompts,
                args.out,
                max_in_flight=args.max_in_flight,
                retries=args.retries,
                model=args.model,
            )
        except (NanoBananaError, ValueError, OSError) as exc:
            print(f"stopped: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(summary.to_json()))
    return 0 if summary.complete else 1


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(amain()))
    except KeyboardInterrupt:  # the runner stopped cleanly; the journal is consistent
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
