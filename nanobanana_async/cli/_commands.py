"""The commands of ``nanobanana``, each an async function of the run's :class:`Context`.

A command returns its exit code after printing its results; library errors it does
not expect propagate to ``_main``, which turns them into one line and a code.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from pathlib import Path
from typing import Final

import attrs

from .._client import NanoBananaClient
from .._concurrency import gather_or_cancel
from .._errors import NanoBananaError, TaskNotFoundError, TaskTimeoutError
from .._models import Task
from ..testing import FakeNanoBanana
from ._console import Output
from ._exit import ExitCode
from ._report import NOT_FOUND, TaskReport

__all__ = ["Command", "Context", "command_for"]


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


@attrs.define
class Context:
    """One run of the command line: its arguments, its output, what a Ctrl-C leaves behind."""

    args: argparse.Namespace
    output: Output
    #: Task ids still running on the service: a Ctrl-C or a timeout tells how to resume.
    waiting: list[str] = attrs.field(factory=list)
    #: Whether a submission is in flight (a Ctrl-C may then have created a task).
    submitting: bool = False
    #: False when the tasks live in this process only (the demo's fake server).
    resumable: bool = True
    #: What a Ctrl-C means for this command: the exit code and the line to print.
    interrupt_code: ExitCode = ExitCode.INTERRUPTED
    interrupt_message: str | None = None
    interrupt_reported: bool = False

    def wait_command(self, task_ids: Sequence[str]) -> str:
        """The command that waits for ``task_ids`` again (never with the token)."""
        words = ["nanobanana", "tasks", "wait"]
        base_url = getattr(self.args, "base_url", None)
        if base_url:
            words += ["--base-url", base_url]
        return shlex.join([*words, *task_ids])

    def report_interrupt(self) -> None:
        """Say what a Ctrl-C left running and how to pick it up; once."""
        if self.interrupt_reported:
            return
        self.interrupt_reported = True
        if self.interrupt_message is not None:
            self.output.note(self.interrupt_message)
            return
        if self.waiting and self.resumable:
            tasks = "The task keeps" if len(self.waiting) == 1 else "The tasks keep"
            self.output.note(
                f"Interrupted. {tasks} running on the service; wait again with: "
                + self.wait_command(self.waiting),
                style="yellow",
            )
        elif self.submitting:
            self.output.note(
                "Interrupted while submitting: the service may already have created the task.",
                style="yellow",
            )
        else:
            self.output.note("Interrupted.", style="yellow")


Command = Callable[[Context], Awaitable[int]]


def command_for(args: argparse.Namespace) -> Command:
    """The function that runs the command the arguments name."""
    if args.command == "tasks":
        return tasks_get if args.tasks_command == "get" else tasks_wait
    commands: dict[str, Command] = {
        "generate": generate,
        "edit": edit,
        "demo": demo,
        "fake-server": fake_server,
    }
    return commands[args.command]


def _client(args: argparse.Namespace) -> NanoBananaClient:
    interval: float = args.poll_interval
    try:
        return NanoBananaClient(
            args.token,  # None: the client reads ACEDATACLOUD_API_TOKEN and says so if unset
            base_url=args.base_url,
            poll_interval=interval,
            max_poll_interval=max(interval, 5.0),
        )
    except NanoBananaError as exc:
        exc.add_note("(pass --token, or try 'nanobanana demo', which needs none)")
        raise


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
    async with _client(args) as client:
        ctx.submitting = True
        if image_urls is None:
            submission = await client.generate(args.prompt, **options)
        else:
            submission = await client.edit(args.prompt, image_urls, **options)
        ctx.submitting = False
        task_id = submission.task_id
        if args.no_wait:
            output.report([TaskReport.pending(task_id)])
            output.note(f"Submitted. Wait for it with: {ctx.wait_command([task_id])}")
            return ExitCode.OK
        ctx.waiting = [task_id]
        try:
            with output.waiting_for(task_id) as on_update:
                task = await client.wait(submission, timeout=args.timeout, on_update=on_update)
        except TaskTimeoutError as exc:
            report = TaskReport.of(exc.last) if exc.last else TaskReport.pending(task_id)
            return _conclude(ctx, [report], timeout=args.timeout)
        ctx.waiting = []
        files = await _save(client, ctx, task, args.out_path)
    return _conclude(ctx, [TaskReport.of(task, files)])


async def _save(
    client: NanoBananaClient, ctx: Context, task: Task, folder: Path | None
) -> list[Path]:
    """Download a succeeded task's images into ``folder``, if one was asked for."""
    if folder is None or task.failure is not None:
        return []
    count = len(task.image_urls)
    with ctx.output.busy(f"Downloading {count} image{'s' * (count != 1)} to {folder}"):
        return await client.download_all(task, folder)


# --- tasks get / wait -----------------------------------------------------------------


async def tasks_get(ctx: Context) -> int:
    """``nanobanana tasks get``: read each task once."""
    ids: list[str] = ctx.args.ids
    async with _client(ctx.args) as client:
        if len(ids) == 1:
            try:
                found = {ids[0]: await client.retrieve(ids[0])}
            except TaskNotFoundError:
                found = {}
        else:
            batch = await client.retrieve_batch(ids)
            found = {task.id: task for task in batch.items}
    reports = [
        TaskReport.of(found[task_id]) if task_id in found else TaskReport.not_found(task_id)
        for task_id in ids
    ]
    return _conclude(ctx, reports)


async def tasks_wait(ctx: Context) -> int:
    """``nanobanana tasks wait``: a progress bar while the tasks finish, then a summary."""
    args = ctx.args
    async with _client(args) as client:
        reports, timed_out = await _wait_all(client, ctx, args.ids, args.timeout, args.out_path)
    return _conclude(ctx, reports, timeout=args.timeout if timed_out else None)


async def _wait_all(
    client: NanoBananaClient,
    ctx: Context,
    task_ids: list[str],
    timeout: float,
    folder: Path | None,
) -> tuple[list[TaskReport], bool]:
    """Wait for every task, downloading as each succeeds; reports in the given order.

    Returns whether the timeout ran out; the tasks not finished then are reported
    as pending.
    """
    ctx.waiting = list(task_ids)
    done: dict[str, TaskReport] = {}
    timed_out = False
    with ctx.output.waiting_for_many(len(task_ids)) as tracker:
        try:
            async with aclosing(client.as_completed(task_ids, timeout=timeout)) as finished:
                async for task in finished:
                    ctx.waiting.remove(task.id)
                    files = await _save(client, ctx, task, folder)
                    done[task.id] = TaskReport.of(task, files)
                    tracker.finished(task)
        except TaskTimeoutError:
            timed_out = True
    return [done.get(task_id) or TaskReport.pending(task_id) for task_id in task_ids], timed_out


def _conclude(ctx: Context, reports: list[TaskReport], *, timeout: float | None = None) -> int:
    """Print the reports and the one line that explains a non-zero exit code."""
    output = ctx.output
    output.report(reports)
    pending = [report.id for report in reports if report.state == "pending"]
    missing = [report.id for report in reports if report.state == NOT_FOUND]
    failed = [report for report in reports if report.failed]
    if timeout is not None and pending:
        tasks = "task" if len(pending) == 1 else "tasks"
        output.error(
            f"timed out after {timeout:g} s with {len(pending)} {tasks} still pending; "
            f"they keep running on the service. Wait again with: {ctx.wait_command(pending)}"
        )
        return ExitCode.TIMEOUT
    if missing:
        output.error("the service does not know task id(s): " + ", ".join(missing))
        return ExitCode.API_ERROR
    if failed:
        if len(reports) == 1:
            output.error(f"task {failed[0].id} failed: {failed[0].error_text}")
        else:
            output.error(f"{len(failed)} of {len(reports)} tasks failed")
        return ExitCode.TASK_FAILED
    return ExitCode.OK


# --- demo / fake-server ---------------------------------------------------------------


async def demo(ctx: Context) -> int:
    """``nanobanana demo``: the real client against the fake server, in this process."""
    output = ctx.output
    ctx.resumable = False  # the tasks die with this process's fake server
    folder: Path = ctx.args.out_path or Path(tempfile.mkdtemp(prefix="nanobanana-demo-"))
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
            output.note(
                f"Submitted {len(submissions)} tasks; one shared poll loop reads them all "
                f"with retrieve_batch, and saves the images to {folder}."
            )
            ids = [submission.task_id for submission in submissions]
            reports, timed_out = await _wait_all(client, ctx, ids, 30.0, folder)
    output.report(reports)
    failed = sum(report.failed for report in reports)
    output.note(
        "This ran against a local simulated server (nanobanana_async.testing.FakeNanoBanana): "
        "no real images were made and no account was used"
        + (f"; {failed} task failed on purpose, to show how failures look" if failed else "")
        + f". The placeholder images are in {folder}.",
        style="bold",
    )
    return ExitCode.TIMEOUT if timed_out else ExitCode.OK


async def fake_server(ctx: Context) -> int:
    """``nanobanana fake-server``: serve the fake API in the foreground until Ctrl-C."""
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
        stop = asyncio.Event()
        with _on_sigterm(stop.set):
            await stop.wait()  # until SIGTERM, or Ctrl-C cancels the command
    output.note(_STOPPED)
    return ExitCode.OK


@contextmanager
def _on_sigterm(callback: Callable[[], object]) -> Iterator[None]:
    """Call ``callback`` on SIGTERM while the block runs (where the loop can; else not)."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        loop.add_signal_handler(signal.SIGTERM, callback)
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not main thread
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
