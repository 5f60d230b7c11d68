"""``nanobanana batch``: the durable batch runner of the library, with progress and a summary.

The journal is ``DIR/.nanobanana/journal.sqlite3``, the manifest ``DIR/manifest.jsonl``,
the images go in ``DIR``. Running the same command again resumes; a stop (Ctrl-C,
SIGTERM) lets the submission in flight end and leaves the journal consistent.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import sys
from pathlib import Path
from typing import Any, Final

from rich import box
from rich.table import Table
from rich.text import Text

from .._errors import NanoBananaError
from .._models import Submission
from ..batch import (
    BatchChangedError,
    BatchJob,
    BatchResult,
    BatchRunner,
    JobState,
    JournalError,
)
from ._catalog import ignored_resolution
from ._console import BatchProgress
from ._context import Context, make_client
from ._exit import ExitCode

__all__ = ["JOURNAL_NAME", "MANIFEST_NAME", "batch"]

JOURNAL_NAME: Final = ".nanobanana/journal.sqlite3"
MANIFEST_NAME: Final = "manifest.jsonl"
_SHOWN_CHANGES: Final = 10
_STYLES: Final = {
    JobState.SUCCEEDED: "green",
    JobState.FAILED: "red",
    JobState.DOWNLOAD_FAILED: "red",
    JobState.OUTCOME_UNKNOWN: "bold red",
    JobState.PENDING: "yellow",
}


async def batch(ctx: Context) -> int:
    """``nanobanana batch PROMPTS --out DIR``."""
    args, output = ctx.args, ctx.output
    jobs: list[BatchJob] = args.jobs
    folder: Path = args.out_path
    for job in jobs[:1]:
        warning = ignored_resolution(job.model, job.resolution)
        if warning:
            output.note(f"Note: {warning}", style="yellow")
    ctx.resumable = False  # the resume hint is this command, not "tasks wait"
    async with make_client(args) as client:
        progress: BatchProgress | None = None

        def on_submit(job: BatchJob, submission: Submission) -> None:
            # At once, on any stderr: the journal has it too, but a log reader sees it here.
            # Again: its second submission or later, in this run or over earlier ones.
            again = " again" if runner.result(job.key).attempts > 1 else ""
            line = f"submitted job {job.key}{again}: task {submission.task_id}"
            if progress is not None:
                progress.line(line)
            else:
                output.note(line)

        runner = BatchRunner(
            client,
            jobs,
            journal=folder / JOURNAL_NAME,
            out=None if args.no_download else folder,
            manifest=folder / MANIFEST_NAME,
            max_in_flight=args.max_in_flight,
            retries=args.retries,
            resubmit_unknown=args.resubmit_unknown,
            on_submit=on_submit,
        )
        try:
            await runner.open()
        except BatchChangedError as exc:
            _report_changes(ctx, exc)
            return ExitCode.USAGE
        except JournalError as exc:  # busy, or not a journal at all
            output.error(str(exc))
            return ExitCode.USAGE
        try:
            _say_plan(ctx, runner)
            start = runner.summary
            already = (start.succeeded, start.failed + start.download_failed, start.pending)
            with output.batch_progress(len(jobs), already) as progress:
                async for result in runner:
                    _show_result(progress, runner, result)
        except asyncio.CancelledError:
            await runner.aclose()
            _print_batch(ctx, runner)
            summary = runner.summary
            what = "Terminated" if ctx.stop_signal == signal.SIGTERM else "Interrupted"
            running = sum(1 for r in runner.results() if r.state is JobState.PENDING and r.task_id)
            unknown = ""
            if summary.outcome_unknown:
                unknown = (
                    f" {summary.outcome_unknown} job(s) have an unknown outcome (a task may "
                    "have been made and paid for; see above): the next run reports them and "
                    "submits them again only with --resubmit-unknown."
                )
            ctx.interrupt_message = (
                f"{what}. The journal is consistent: {summary.succeeded} of {summary.total} "
                f"jobs done, {running} task(s) keep running on the service and are waited "
                f"on by the next run.{unknown} Resume with: {_resume_command(ctx)}"
            )
            raise
        except NanoBananaError as exc:
            await runner.aclose()
            _print_batch(ctx, runner)
            notes = " ".join(getattr(exc, "__notes__", []))
            output.error(
                f"the batch stopped: {exc}{' ' + notes if notes else ''}. The journal is "
                f"consistent; once that is fixed, resume with: {_resume_command(ctx)}"
            )
            return ExitCode.API_ERROR
        finally:
            await runner.aclose()
    _print_batch(ctx, runner)
    return _conclude(ctx, runner)


def _say_plan(ctx: Context, runner: BatchRunner) -> None:
    plan = runner.planned
    total = sum(plan.values())
    fresh = plan["first"]
    again = plan["retry"] + plan["resubmit"]
    parts = [f"Batch of {total} jobs in {ctx.args.out_path}"]
    if fresh != total:
        words = [
            f"{plan['done']} finished earlier",
            f"{plan['wait']} submitted earlier (waiting on them)",
            f"{fresh} to submit",
        ]
        if again:
            words.append(f"{again} to submit again (each a new paid submission)")
        if plan["save"]:
            words.append(f"{plan['save']} with images still to save")
        if plan["unknown"]:
            words.append(f"{plan['unknown']} with an unknown outcome")
        parts.append("resuming: " + ", ".join(words))
    ctx.output.note("; ".join(parts) + ".")


def _show_result(progress: BatchProgress, runner: BatchRunner, result: BatchResult) -> None:
    summary = runner.summary
    done = summary.succeeded
    failed = summary.failed + summary.download_failed + summary.outcome_unknown
    finished = summary.total - summary.pending
    head = f"[{finished}/{summary.total}] job {result.job.key}"
    state = result.state
    error = ""
    if result.error is not None:
        error = ": " + ": ".join(part for part in (result.error.code, result.error.message) if part)
    if state is JobState.SUCCEEDED:
        count = len(result.files) or len(result.image_urls)
        what = "file" if result.files else "image"
        text = f"{head}: succeeded, task {result.task_id}, {count} {what}{'s' * (count != 1)}"
    elif state is JobState.OUTCOME_UNKNOWN:
        text = f"{head}: OUTCOME UNKNOWN for prompt {result.job.prompt!r}{error}"
    elif state is JobState.PENDING:
        text = f"{head}: could not read task {result.task_id}{error}"
    else:
        task = f" (task {result.task_id})" if result.task_id else ""
        text = f"{head}: {state.value}{task}{error}"
    progress.line(text, style=_STYLES[state] if state is not JobState.SUCCEEDED else None)
    progress.show(done, failed, summary.pending)


def _print_batch(ctx: Context, runner: BatchRunner) -> None:
    """The summary on stdout: a JSON document, or counts and the jobs needing attention."""
    if ctx.reports_printed:
        return
    ctx.reports_printed = True
    folder: Path = ctx.args.out_path
    summary = runner.summary
    results = runner.results()
    if ctx.args.json:
        document: dict[str, Any] = {
            "summary": summary.to_json(),
            "out": str(folder),
            "manifest": str(folder / MANIFEST_NAME),
            "journal": str(runner.journal_path),
            "jobs": [result.to_json(folder) for result in results],
        }
        sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return
    out = ctx.output.out
    out.print(
        Text(
            f"{summary.total} jobs: {summary.succeeded} succeeded, {summary.failed} failed, "
            f"{summary.download_failed} download failed, {summary.outcome_unknown} outcome "
            f"unknown, {summary.pending} pending. This run: {summary.submitted} submitted "
            f"({summary.retried} retries, {summary.resubmitted} resubmitted), "
            f"{summary.resumed} resumed, {summary.skipped} finished earlier."
        ),
        soft_wrap=True,
    )
    out.print(Text(f"Manifest: {folder / MANIFEST_NAME}"), soft_wrap=True)
    attention = [result for result in results if result.state is not JobState.SUCCEEDED]
    if attention:
        table = Table(box=box.SIMPLE_HEAD)
        table.add_column("Job", no_wrap=True)
        table.add_column("State", no_wrap=True)
        table.add_column("Task", no_wrap=True)
        table.add_column("Prompt", overflow="fold")
        table.add_column("Error", overflow="fold")
        for result in attention:
            error = result.error
            text = ": ".join(part for part in (error.code, error.message) if part) if error else ""
            table.add_row(  # Text: a prompt such as "a cat [blue]" is not rich markup
                Text(result.job.key),
                Text(result.state.value, style=_STYLES[result.state]),
                Text(result.task_id or ""),
                Text(result.job.prompt),
                Text(text),
            )
        out.print(table)


def _conclude(ctx: Context, runner: BatchRunner) -> int:
    summary = runner.summary
    output = ctx.output
    if summary.download_failed or summary.pending:
        problems = []
        if summary.download_failed:
            problems.append(f"the images of {summary.download_failed} job(s) could not be saved")
        if summary.pending:
            problems.append(f"{summary.pending} job(s) could not be finished")
        output.error(
            " and ".join(problems) + f" (see above); run again to retry: {_resume_command(ctx)}"
        )
        return ExitCode.API_ERROR
    if summary.outcome_unknown:
        output.error(
            f"{summary.outcome_unknown} job(s) have an unknown outcome: the run stopped, or "
            "the service failed, during their submission, so a task may exist (and be paid "
            "for) whose id never came back. They are listed above with their prompts. To "
            "submit them again (each may then be paid twice), run: "
            + _resume_command(ctx, "--resubmit-unknown")
        )
        return ExitCode.TASK_FAILED
    if summary.failed:
        output.error(f"{summary.failed} of {summary.total} jobs failed (see above)")
        return ExitCode.TASK_FAILED
    return ExitCode.OK


def _resume_command(ctx: Context, *extra: str) -> str:
    """This same command again (without the token), to resume the batch."""
    words: list[str] = []
    skip = False
    for word in ctx.args.argv:
        if skip:
            skip = False
            continue
        if word == "--token":
            skip = True
            continue
        if word.startswith("--token="):
            continue
        words.append(word)
    words += [word for word in extra if word not in words]
    command = shlex.join(["nanobanana", *words])
    if ctx.args.prompts == "-":
        command += "  (with the same prompts on stdin)"
    return command


def _report_changes(ctx: Context, exc: BatchChangedError) -> None:
    prompts = ctx.args.prompts if ctx.args.prompts != "-" else "the prompts on stdin"
    lines = [
        f"nanobanana: error: {prompts} changed since the batch in {ctx.args.out_path} "
        f"submitted these jobs ({len(exc.changes)} changed):"
    ]
    for change in exc.changes[:_SHOWN_CHANGES]:
        before, after = change.before, change.after
        if after is None:
            task = f" (its task {change.task_id} is in the journal)" if change.task_id else ""
            what = f"was {before.get('prompt')!r}, now missing from the input{task}"
        elif before.get("prompt") != after.get("prompt"):
            what = f"was {before.get('prompt')!r}, now {after.get('prompt')!r}"
        else:
            fields = sorted(
                name for name in set(before) | set(after) if before.get(name) != after.get(name)
            )
            what = "; ".join(
                f"{name} was {before.get(name)!r}, now {after.get(name)!r}" for name in fields
            )
        lines.append(f"  job {change.key}: {what}")
    if len(exc.changes) > _SHOWN_CHANGES:
        lines.append(f"  ... and {len(exc.changes) - _SHOWN_CHANGES} more")
    lines.append(
        "Nothing was submitted. Jobs are known by their line number (or key), so an edited "
        "file would mix two batches and a removed line would drop its task from the "
        "manifest: put the file back as it was (and add new prompts at the end), or use "
        "another --out folder."
    )
    for line in lines:
        ctx.output.note(line, style="bold red" if line is lines[0] else None)
