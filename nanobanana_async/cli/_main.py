"""Running a command line: parse, prepare inputs, run the command, map errors to exit codes."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

from rich.logging import RichHandler
from rich.traceback import Traceback

from .._errors import NanoBananaError, TaskFailedError, TaskTimeoutError
from ._commands import command_for
from ._console import Output
from ._context import Context
from ._exit import ExitCode
from ._inputs import UsageError, image_reference, out_folder, read_prompt, read_task_ids
from ._jobs import read_jobs
from ._parser import build_parser

__all__ = ["main_async", "run"]


def run(argv: Sequence[str] | None = None) -> int:
    """The whole command line, in its own event loop; returns the exit code.

    Ctrl-C and SIGTERM both cancel the command: it prints what it has, says how to
    resume, and exits 130 or 143.
    """
    ctx = _start(argv, sys.stdin)
    if isinstance(ctx, int):
        return ctx
    try:
        with _logging(ctx):
            return asyncio.run(_with_signals(ctx))
    except (KeyboardInterrupt, asyncio.CancelledError):
        # asyncio.run turns Ctrl-C into cancelling the command, then raises KeyboardInterrupt.
        ctx.report_interrupt()
        return ctx.exit_code_when_stopped


async def _with_signals(ctx: Context) -> int:
    """Run the command with SIGTERM handled like Ctrl-C (where the loop can)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None

    def terminate() -> None:
        ctx.stop_signal = signal.SIGTERM
        main.cancel()

    try:
        loop.add_signal_handler(signal.SIGTERM, terminate)
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not main thread
        return await execute(ctx)
    try:
        return await execute(ctx)
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


async def main_async(argv: Sequence[str], stdin: TextIO | None = None) -> int:
    """The command line inside a running event loop (for tests and embedding).

    Cancelling it acts like Ctrl-C: the message is printed, then CancelledError raised.
    """
    ctx = _start(argv, sys.stdin if stdin is None else stdin)
    if isinstance(ctx, int):
        return ctx
    with _logging(ctx):
        return await execute(ctx)


def _start(argv: Sequence[str] | None, stdin: TextIO) -> Context | int:
    """Parse and read the inputs (files, stdin) before any event loop work: a context, or
    the exit code of a usage error."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's own usage error
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    args.argv = list(sys.argv[1:] if argv is None else argv)
    ctx = Context(args, Output(json_mode=getattr(args, "json", False)))
    try:
        _prepare(args, stdin)
    except UsageError as exc:
        ctx.output.error(str(exc))
        return ExitCode.USAGE
    except KeyboardInterrupt:
        ctx.report_interrupt()
        return ExitCode.INTERRUPTED
    return ctx


def _prepare(args: argparse.Namespace, stdin: TextIO) -> None:
    """Read what the command needs from files and stdin: image files as data: URLs,
    a prompt, task ids, a batch's jobs; check the --out folder."""
    images = getattr(args, "images", None)
    if images is not None:
        args.image_urls = [image_reference(value) for value in images]
    if args.command in ("generate", "edit"):
        args.prompt = read_prompt(args.prompt, stdin)
    if args.command == "tasks":
        args.ids = read_task_ids(args.ids, stdin)
    if args.command == "batch":
        defaults = {
            "model": args.model,
            "aspect_ratio": args.aspect_ratio,
            "resolution": args.resolution,
            "count": args.count,
        }
        args.jobs = read_jobs(args.prompts, stdin, {k: v for k, v in defaults.items() if v})
    args.out_path = out_folder(getattr(args, "out", None))


async def execute(ctx: Context) -> int:
    """Run the command; errors become one line on stderr and an exit code.

    Whatever ends the command, the tasks it submitted or read are printed first.
    """
    try:
        return await command_for(ctx.args)(ctx)
    except asyncio.CancelledError:
        ctx.print_reports()
        ctx.report_interrupt()
        raise
    except Exception as exc:
        ctx.print_reports()
        return _failed(ctx, exc)


def _failed(ctx: Context, exc: Exception) -> int:
    code = _exit_code(exc)
    message = str(exc) or type(exc).__name__
    if code == 1 and not isinstance(exc, TaskFailedError):
        message = f"unexpected {type(exc).__name__}: {message}"
    notes = getattr(exc, "__notes__", None) or []
    ctx.output.error(" ".join([message, *notes]))
    if isinstance(exc, TaskTimeoutError) and ctx.waiting and ctx.resumable:
        ctx.output.note(f"Wait again with: {ctx.wait_command(ctx.waiting)}")
    if getattr(ctx.args, "debug", False):
        ctx.output.err.print(Traceback.from_exception(type(exc), exc, exc.__traceback__))
    elif code == 1 and not isinstance(exc, TaskFailedError):
        ctx.output.note("(run again with --debug to see the traceback)")
    return code


def _exit_code(exc: Exception) -> ExitCode:
    if isinstance(exc, TaskTimeoutError):
        return ExitCode.TIMEOUT
    if isinstance(exc, TaskFailedError):
        return ExitCode.TASK_FAILED
    if isinstance(exc, NanoBananaError):
        return ExitCode.API_ERROR
    if isinstance(exc, UsageError | ValueError | OSError):
        return ExitCode.USAGE
    return ExitCode.TASK_FAILED  # a bug of ours: exit 1, as Python itself would


@contextmanager
def _logging(ctx: Context) -> Iterator[None]:
    """Send the library's log to stderr through rich: warnings, or everything with --debug."""
    logger = logging.getLogger("nanobanana_async")
    level = logging.DEBUG if getattr(ctx.args, "debug", False) else logging.WARNING
    handler = RichHandler(console=ctx.output.err, show_time=False, show_path=False, level=level)
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
