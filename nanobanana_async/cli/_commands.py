"""The commands of ``nanobanana``, each an async function of the run's :class:`Context`.

A command records each task it submits or reads in the context as it goes (see
``_context``), and returns its exit code after printing its results; library errors it
does not expect propagate to ``_main``, which prints what the context holds, then one
line and a code.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
from rich import box
from rich.table import Table

from .._client import NanoBananaClient
from .._concurrency import gather_or_cancel
from .._errors import (
    AuthenticationError,
    NanoBananaError,
    PermissionDeniedError,
    TaskNotFoundError,
)
from .._models import Submission, Task
from ..testing import FakeNanoBanana
from ._batch import batch
from ._catalog import DEFAULT_MODEL, MODELS, ignored_resolution
from ._console import Tracker
from ._context import Context, make_client
from ._exit import ExitCode
from ._report import NOT_FOUND, PENDING, TaskReport

__all__ = ["Command", "command_for"]


# The demo's prompts: (prompt, count, aspect ratio). The last one fails on purpose,
# to show how a refused prompt looks.
_DEMO_PROMPTS: Final = (
    ("a lighthouse on a cliff at dawn, watercolour", 1, "3:2"),
    ("a red fox curled up in fresh snow", 2, "1:1"),
    ("a steaming bowl of ramen, studio photo", 1, "4:3"),
    ("a city skyline drawn in ink", 1, "16:9"),
    ("something the content filter refuses [fail]", 1, "1:1"),
)
_STOPPED: Final = "Fake server stopped."
#: The error code of a task whose images were not all saved when the command stopped.
INCOMPLETE: Final = "incomplete"
_READ_ERROR: Final = "read_failed"
_DOWNLOAD_ERROR: Final = "download_failed"

Command = Callable[[Context], Awaitable[int]]


def command_for(args: object) -> Command:
    """The function that runs the command the arguments name."""
    command = getattr(args, "command", None)
    if command == "tasks":
        return {"get": tasks_get, "wait": tasks_wait, "download": tasks_download}[
            getattr(args, "tasks_command", "get")
        ]
    commands: dict[str, Command] = {
        "generate": generate,
        "edit": edit,
        "batch": batch,
        "models": models,
        "demo": demo,
        "fake-server": fake_server,
    }
    return commands[str(command)]


# --- generate / edit ------------------------------------------------------------------


async def generate(ctx: Context) -> int:
    """``nanobanana generate``: submit, wait with a status line, report, maybe download."""
    return await _submit_and_wait(ctx, None)


async def edit(ctx: Context) -> int:
    """``nanobanana edit``: like generate, with the images given by ``--image``."""
    image_urls: list[str] = ctx.args.image_urls
    return await _submit_and_wait(ctx, image_urls)


async def _submit_and_wait(ctx: Context, image_urls: list[str] | None) -> int:
    args, output = ctx.args, ctx.output
    options = {
        "model": args.model,
        "aspect_ratio": args.aspect_ratio,
        "resolution": args.resolution,
        "count": args.count,
    }
    warning = ignored_resolution(args.model, args.resolution)
    if warning:
        output.note(f"Note: {warning}", style="yellow")
    async with make_client(args) as client:
        if image_urls is None:
            request = client.generate(args.prompt, **options)
        else:
            request = client.edit(args.prompt, image_urls, **options)
        submission = await _submit(ctx, request)
        task_id = submission.task_id
        if args.no_wait:
            ctx.print_reports()
            output.note(f"Wait for it with: {ctx.wait_command([task_id])}")
            return ExitCode.OK
        # The submission itself, not its id: the poll loop then knows the task is new.
        timed_out = await _follow(
            client, ctx, [submission], args.out_path, _deadline(args.timeout), single=True
        )
    return _conclude(ctx, timed_out=timed_out)


async def _submit(ctx: Context, request: Coroutine[Any, Any, Submission]) -> Submission:
    """Send the submission; its task id is recorded and shown the moment it is known.

    A stop (Ctrl-C, SIGTERM) during the request lets it finish first, so the id of a
    task that may be paid for is not lost; a second Ctrl-C gives up on it.
    """
    ctx.submitting = True
    sending = asyncio.ensure_future(request)
    stopped = False
    try:
        submission = await asyncio.shield(sending)
    except asyncio.CancelledError:
        stopped = True
        ctx.output.note(
            "Stopping: waiting for the submission in flight to answer, so its task id is "
            "not lost (Ctrl-C again to give up).",
            style="yellow",
        )
        try:
            submission = await sending
        except NanoBananaError:
            raise asyncio.CancelledError from None
    ctx.submitting = False
    ctx.track(TaskReport.pending(submission.task_id, prompt=ctx.args.prompt))
    # At once, on any stderr: the id of a paid task must survive whatever comes next.
    ctx.output.note(f"Submitted task {submission.task_id}")
    if stopped:
        ctx.waiting = [submission.task_id]
        raise asyncio.CancelledError
    return submission


# --- waiting, saving, concluding --------------------------------------------------------


async def _follow(
    client: NanoBananaClient,
    ctx: Context,
    targets: Sequence[str | Submission | Task],
    folder: Path | None,
    when: float,
    *,
    single: bool = False,
) -> bool:
    """Wait for every task and save each one's images as it succeeds, all before
    ``when`` (the loop's clock: the command's ``--timeout``); returns whether that
    deadline ran out."""
    ids = [_id_of(target) for target in targets]
    ctx.waiting = [
        task_id
        for task_id, target in zip(ids, targets, strict=True)
        if not isinstance(target, Task) or not target.done
    ]
    show = ctx.output.waiting_for(ids[0]) if single else ctx.output.waiting_for_many(len(ids))
    deadline = asyncio.timeout_at(when)
    try:
        with show as tracker:
            async with deadline:
                await gather_or_cancel(
                    _follow_one(client, ctx, target, folder, tracker) for target in targets
                )
    except TimeoutError:
        if not deadline.expired():
            raise
        return True
    return False


def _deadline(timeout: float) -> float:
    """When the command's ``--timeout`` runs out, on the event loop's clock: one
    deadline for every step of a command (a first read, the waits, the downloads)."""
    return asyncio.get_running_loop().time() + timeout


def _id_of(target: str | Submission | Task) -> str:
    if isinstance(target, str):
        return target
    return target.task_id if isinstance(target, Submission) else target.id


async def _follow_one(
    client: NanoBananaClient,
    ctx: Context,
    target: str | Submission | Task,
    folder: Path | None,
    tracker: Tracker,
) -> None:
    task_id = _id_of(target)

    def on_update(task: Task) -> None:
        ctx.track(TaskReport.of(task))
        tracker.update(task)

    try:
        task = await client.wait(target, timeout=None, on_update=on_update)
    except TaskNotFoundError:
        report = TaskReport.not_found(task_id)
        ctx.track(report)
        ctx.waiting.remove(task_id)
        tracker.finished(report)
        return
    except (AuthenticationError, PermissionDeniedError):
        raise  # the same for every task: one error line says it
    except NanoBananaError as exc:
        # This task's record could not be read: it stays pending, with the reason.
        current = ctx.known.get(task_id) or TaskReport.pending(task_id)
        ctx.track(current.with_problem(_READ_ERROR, str(exc)))
        return
    if task_id in ctx.waiting:
        ctx.waiting.remove(task_id)
    report = TaskReport.of(task)
    ctx.track(report)
    tracker.finished(report)
    if folder is not None and task.failure is None:
        tracker.saving(task_id, len(task.image_urls))
        await _save(client, ctx, task_id, task.image_urls, folder)


async def _save(
    client: NanoBananaClient, ctx: Context, task_id: str, urls: Sequence[str], folder: Path
) -> None:
    """Save a task's images; the report keeps what was saved and what went wrong."""
    saved: dict[int, Path] = {}
    problem: str | None = None

    async def one(index: int, url: str) -> None:
        # The trailing separator says "a folder" even before it exists.
        saved[index] = await client.download(url, f"{folder}{os.sep}")

    try:
        await gather_or_cancel(one(index, url) for index, url in enumerate(urls))
    except (NanoBananaError, OSError, ValueError) as exc:
        problem = str(exc)
    except asyncio.CancelledError:
        # A stop or the --timeout: keep the URLs and the files saved so far.
        files = [saved[index] for index in sorted(saved)]
        message = (
            f"stopped with {len(files)} of {len(urls)} images saved; save them with: "
            + ctx.command_line(["tasks", "download"], [task_id, "--out", str(folder)])
        )
        ctx.track(ctx.known[task_id].with_problem(INCOMPLETE, message, files))
        raise
    files = [saved[index] for index in sorted(saved)]
    report = ctx.known[task_id]
    if problem is None:
        ctx.track(attrs.evolve(report, files=files))
    else:
        ctx.track(report.with_problem(_DOWNLOAD_ERROR, problem, files))


def _conclude(ctx: Context, *, timed_out: bool = False, pending_hint: str | None = None) -> int:
    """Print every report, then the one line that explains a non-zero exit code."""
    output = ctx.output
    ctx.print_reports()
    reports = ctx.reports()
    pending = [report.id for report in reports if report.state == PENDING]
    incomplete = [r.id for r in reports if r.error is not None and r.error.code == INCOMPLETE]
    if timed_out and (pending or incomplete):
        parts = [f"timed out after {ctx.args.timeout:g} s"]
        if pending:
            tasks = "task" if len(pending) == 1 else "tasks"
            parts.append(
                f"with {len(pending)} {tasks} still pending; they keep running on the service. "
                f"Wait again with: {ctx.wait_command(pending, *_out_words(ctx))}"
            )
        if incomplete:
            parts.append(
                "before every image was saved; the image URLs are on stdout. Save them with: "
                + ctx.command_line(["tasks", "download"], [*incomplete, *_out_words(ctx)])
            )
        output.error(" ".join([parts[0], " and ".join(parts[1:])]))
        return ExitCode.TIMEOUT
    if pending and pending_hint is not None:
        output.error(pending_hint.format(ids=shlex.join(pending), count=len(pending)))
        return ExitCode.TIMEOUT
    missing = [report.id for report in reports if report.state == NOT_FOUND]
    problems = [report for report in reports if report.problem and report.state != NOT_FOUND]
    if missing or problems:
        lines = []
        if missing:
            lines.append("the service does not know task id(s): " + ", ".join(missing))
        for report in problems:
            assert report.error is not None
            if report.error.code == _DOWNLOAD_ERROR:
                lines.append(
                    f"could not save the images of task {report.id} ({report.error.message}); "
                    "the image URLs are on stdout. Save them later with: "
                    + ctx.command_line(["tasks", "download"], [report.id, *_out_words(ctx)])
                )
            else:
                lines.append(f"could not read task {report.id}: {report.error.message}")
        output.error("; ".join(lines))
        return ExitCode.API_ERROR
    failed = [report for report in reports if report.failed]
    if failed:
        if len(reports) == 1:
            output.error(f"task {failed[0].id} failed: {failed[0].error_text}")
        else:
            output.error(f"{len(failed)} of {len(reports)} tasks failed")
        return ExitCode.TASK_FAILED
    return ExitCode.OK


def _out_words(ctx: Context) -> list[str]:
    folder = getattr(ctx.args, "out_path", None)
    return ["--out", str(folder)] if folder is not None else []


# --- tasks get / wait / download --------------------------------------------------------


async def _read(client: NanoBananaClient, task_ids: list[str]) -> dict[str, Task]:
    """Read tasks once: one ``retrieve``, or ``retrieve_batch`` for several."""
    if len(task_ids) == 1:
        try:
            return {task_ids[0]: await client.retrieve(task_ids[0])}
        except TaskNotFoundError:
            return {}
    batch_read = await client.retrieve_batch(task_ids)
    return {task.id: task for task in batch_read.items}


async def tasks_get(ctx: Context) -> int:
    """``nanobanana tasks get``: read each task once."""
    ids: list[str] = ctx.args.ids
    ctx.order = list(ids)
    async with make_client(ctx.args) as client:
        found = await _read(client, ids)
    for task_id in ids:
        task = found.get(task_id)
        ctx.track(TaskReport.of(task) if task is not None else TaskReport.not_found(task_id))
    return _conclude(ctx)


async def tasks_wait(ctx: Context) -> int:
    """``nanobanana tasks wait``: a progress bar while the tasks finish, then a summary."""
    args = ctx.args
    ids: list[str] = args.ids
    ctx.order = list(ids)
    ctx.waiting = list(ids)  # a stop during the first look still says how to resume
    when = _deadline(args.timeout)
    async with make_client(args) as client:
        targets = await _first_look(client, ctx, ids, when)
        timed_out = await _follow(client, ctx, targets, args.out_path, when)
    return _conclude(ctx, timed_out=timed_out)


async def _first_look(
    client: NanoBananaClient, ctx: Context, ids: list[str], when: float
) -> list[str | Task]:
    """Read the tasks once before waiting: finished ones need no more requests, and an
    id the service does not list (yet) is named, with how long it is waited for."""
    deadline = asyncio.timeout_at(when)
    try:
        async with deadline:
            found = (await client.retrieve_batch(ids)).items
    except (AuthenticationError, PermissionDeniedError):
        raise
    except NanoBananaError:
        # The waits will read them; this look was only a courtesy. (Before the
        # TimeoutError clause: an APITimeoutError is a TimeoutError too.)
        return list(ids)
    except TimeoutError:
        if not deadline.expired():
            raise
        return list(ids)  # the --timeout ran out: the waits report every id pending
    records = {task.id: task for task in found}
    for task in found:
        ctx.track(TaskReport.of(task))
    missing = [task_id for task_id in ids if task_id not in records]
    if missing:
        grace = ctx.args.not_found_grace
        names = ", ".join(missing)
        ctx.output.note(
            f"The service does not know {names} (yet); waiting up to {grace:g} s for "
            f"{'it' if len(missing) == 1 else 'them'} to appear (--not-found-grace).",
            style="yellow",
        )
    return [records.get(task_id, task_id) for task_id in ids]


async def tasks_download(ctx: Context) -> int:
    """``nanobanana tasks download``: read the tasks once and save the succeeded ones."""
    args = ctx.args
    ids: list[str] = args.ids
    folder: Path = args.out_path
    ctx.order = list(ids)
    # One deadline for the read and the downloads: the --timeout covers the command.
    deadline = asyncio.timeout(args.timeout)
    timed_out = False
    async with make_client(args) as client:
        try:
            async with deadline:
                found = await _read(client, ids)
                for task_id in ids:
                    task = found.get(task_id)
                    ctx.track(
                        TaskReport.of(task) if task is not None else TaskReport.not_found(task_id)
                    )
                done = [task for task in found.values() if task.failure is None and task.done]
                with ctx.output.busy(f"Saving the images of {len(done)} task(s) to {folder}"):
                    await gather_or_cancel(
                        _save(client, ctx, task.id, task.image_urls, folder) for task in done
                    )
        except TimeoutError:
            if not deadline.expired():
                raise
            timed_out = True  # a task not read in time is reported as still pending
    hint = (
        "{count} task(s) still pending: nothing to save yet. Wait for them and save "
        f"their images with: {ctx.command_line(['tasks', 'wait'], ['--out', str(folder)])} "
        "{ids}"
    )
    return _conclude(ctx, timed_out=timed_out, pending_hint=hint)


# --- models ---------------------------------------------------------------------------------


async def models(ctx: Context) -> int:
    """``nanobanana models``: the known models and the resolutions each honours."""
    if ctx.args.json:
        document = {"models": [model.to_json() for model in MODELS]}
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return ExitCode.OK
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("Model", no_wrap=True)
    table.add_column("Resolutions", no_wrap=True)
    table.add_column(":official", no_wrap=True)
    table.add_column("Underlying model")
    for model in MODELS:
        name = model.name + (" (default)" if model.name == DEFAULT_MODEL else "")
        table.add_row(
            name, ", ".join(model.resolutions), "yes" if model.official else "no", model.underlying
        )
    ctx.output.out.print(table)
    ctx.output.note(
        "The list grows: other model names are passed to the service as they are. "
        "':official' variants (e.g. nano-banana-pro:official) are billed differently."
    )
    return ExitCode.OK


# --- demo / fake-server ---------------------------------------------------------------


async def demo(ctx: Context) -> int:
    """``nanobanana demo``: the real client against the fake server, in this process."""
    output = ctx.output
    ctx.resumable = False  # the tasks die with this process's fake server
    folder: Path = ctx.args.out_path or Path(tempfile.mkdtemp(prefix="nanobanana-demo-"))
    ctx.args.timeout = 30.0
    async with FakeNanoBanana(duration=(0.5, 2.0), seed=None) as server:
        output.note(
            f"Demo: started a simulated Nano Banana server at {server.base_url} "
            "in this process (no token, no network).",
            style="bold",
        )
        async with NanoBananaClient(
            server.token, base_url=server.base_url, poll_interval=0.2, max_poll_interval=0.5
        ) as client:
            submissions = await gather_or_cancel(
                client.generate(prompt, count=count, aspect_ratio=ratio)
                for prompt, count, ratio in _DEMO_PROMPTS
            )
            for submission, (prompt, _, _) in zip(submissions, _DEMO_PROMPTS, strict=True):
                ctx.track(TaskReport.pending(submission.task_id, prompt=prompt))
            output.note(
                f"Submitted {len(submissions)} tasks; one shared poll loop reads them all "
                f"with retrieve_batch, and saves the images to {folder}."
            )
            ids = [submission.task_id for submission in submissions]
            timed_out = await _follow(client, ctx, list(ids), folder, _deadline(ctx.args.timeout))
    ctx.print_reports()
    failed = sum(report.failed for report in ctx.reports())
    output.note(
        "This ran against a local simulated server (nanobanana_async.testing.FakeNanoBanana): "
        "no real images were made and no account was used"
        + (f"; {failed} task failed on purpose, to show how failures look" if failed else "")
        + f". The placeholder images are in {folder}.",
        style="bold",
    )
    return ExitCode.TIMEOUT if timed_out else ExitCode.OK


async def fake_server(ctx: Context) -> int:
    """``nanobanana fake-server``: serve the fake API in the foreground until stopped.

    Stopping it (Ctrl-C or SIGTERM) exits 0 and prints the requests it served, by
    action, as one JSON line on stdout (a test's or a benchmark's count of submissions).
    """
    args, output = ctx.args, ctx.output
    low, high = args.duration
    server = FakeNanoBanana(
        token=getattr(args, "token", None) or "test-token",
        duration=(low, high),
        fail_rate=args.fail_rate,
        host=args.host,
        port=args.port,
        seed=None,
    )
    ctx.interrupt_code = ExitCode.OK
    ctx.interrupt_message = _STOPPED
    async with server:
        lines = [
            "Fake Nano Banana server running (a local simulation: no real images, no account).",
            f"  base URL: {server.base_url}",
            f"  token:    {server.token}",
            f"  images:   {server.image_base_url}",
            "Point a client at it with:",
            f"  export ACEDATACLOUD_API_BASE_URL={shlex.quote(server.base_url)} "
            f"ACEDATACLOUD_API_TOKEN={shlex.quote(server.token)}",
            "Prompts containing [fail], [fail:top] or [fail:empty] fail on purpose. "
            "Press Ctrl-C to stop.",
        ]
        for line in lines:
            output.line(line)
        try:
            await asyncio.Event().wait()  # until Ctrl-C or SIGTERM cancels the command
        finally:
            counts = dict(sorted(server.counts.items()))
            output.line(f"Requests served: {json.dumps(counts)}")
    return ExitCode.OK
