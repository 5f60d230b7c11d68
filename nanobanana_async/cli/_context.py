"""One run of the command line: its arguments, its output, and what it has read so far.

Commands record every task they submit or read here as they go, so that whatever
ends the run (success, an error, a timeout, Ctrl-C, SIGTERM) stdout still shows every
task id and image URL known at that moment.
"""

from __future__ import annotations

import argparse
import shlex
import signal

import attrs

from .._client import NanoBananaClient
from .._errors import NanoBananaError
from ._console import Output
from ._exit import ExitCode
from ._report import TaskReport

__all__ = ["Context", "make_client"]


@attrs.define
class Context:
    """One run of the command line: its arguments, its output, what a stop leaves behind."""

    args: argparse.Namespace
    output: Output
    #: The task ids to show, in order, and what is known of each (submitted or read).
    order: list[str] = attrs.field(factory=list)
    known: dict[str, TaskReport] = attrs.field(factory=dict)
    #: Task ids still running on the service: a stop or a timeout tells how to resume.
    waiting: list[str] = attrs.field(factory=list)
    #: Whether a submission is in flight (a stop may then have created a task).
    submitting: bool = False
    #: False when the tasks live in this process only (the demo's fake server).
    resumable: bool = True
    #: What a stop means for this command: the exit code (None: 130 for SIGINT, 143
    #: for SIGTERM) and the line to print instead of the usual one.
    interrupt_code: ExitCode | None = None
    interrupt_message: str | None = None
    interrupt_reported: bool = False
    stop_signal: signal.Signals = signal.SIGINT
    reports_printed: bool = False

    # --- what the run knows -------------------------------------------------------------

    def track(self, report: TaskReport) -> None:
        """Record what is known of a task (a later report keeps an earlier prompt)."""
        if report.id not in self.order:
            self.order.append(report.id)
        earlier = self.known.get(report.id)
        if earlier is not None and report.prompt is None and earlier.prompt is not None:
            report = attrs.evolve(report, prompt=earlier.prompt)
        self.known[report.id] = report

    def reports(self) -> list[TaskReport]:
        """A report per task, in order; tasks not read yet are pending."""
        return [self.known.get(task_id) or TaskReport.pending(task_id) for task_id in self.order]

    def print_reports(self) -> None:
        """Print the reports once, if any task was submitted or read."""
        if self.reports_printed or not self.known:
            return
        self.reports_printed = True
        self.output.report(self.reports())

    # --- stopping -----------------------------------------------------------------------

    @property
    def exit_code_when_stopped(self) -> int:
        if self.interrupt_code is not None:
            return self.interrupt_code
        if self.stop_signal == signal.SIGTERM:
            return ExitCode.TERMINATED
        return ExitCode.INTERRUPTED

    def wait_command(self, task_ids: list[str], *extra: str) -> str:
        """The command that waits for ``task_ids`` again (never with the token)."""
        return self.command_line(["tasks", "wait"], [*extra, *task_ids])

    def command_line(self, command: list[str], rest: list[str]) -> str:
        """``nanobanana COMMAND`` with the base URL in use (never the token), then ``rest``."""
        words = ["nanobanana", *command]
        base_url = getattr(self.args, "base_url", None)
        if base_url:
            words += ["--base-url", base_url]
        return shlex.join([*words, *rest])

    def report_interrupt(self) -> None:
        """Say what a stop left running and how to pick it up; once."""
        if self.interrupt_reported:
            return
        self.interrupt_reported = True
        if self.interrupt_message is not None:
            self.output.note(self.interrupt_message)
            return
        what = "Terminated" if self.stop_signal == signal.SIGTERM else "Interrupted"
        if self.waiting and self.resumable:
            tasks = "The task keeps" if len(self.waiting) == 1 else "The tasks keep"
            self.output.note(
                f"{what}. {tasks} running on the service; wait again with: "
                + self.wait_command(self.waiting),
                style="yellow",
            )
        elif self.submitting:
            self.output.note(
                f"{what} while submitting: the service may already have created the task.",
                style="yellow",
            )
        else:
            self.output.note(f"{what}.", style="yellow")


def make_client(args: argparse.Namespace) -> NanoBananaClient:
    """The client the connection options describe."""
    interval: float = args.poll_interval
    try:
        return NanoBananaClient(
            args.token,  # None: the client reads ACEDATACLOUD_API_TOKEN and says so if unset
            base_url=args.base_url,
            poll_interval=interval,
            max_poll_interval=1.5 * interval,  # the client's own ratio (1 s, 1.5 s)
            not_found_grace=getattr(args, "not_found_grace", 30.0),
        )
    except NanoBananaError as exc:
        exc.add_note("(pass --token, or try 'nanobanana demo', which needs none)")
        raise
