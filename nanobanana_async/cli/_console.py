"""Where ``nanobanana`` writes: results on stdout, progress and messages on stderr.

Everything human goes through rich; ``--json`` writes one document with the json
module, so stdout stays parseable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from .._models import Task
from ._report import TaskReport, document

__all__ = ["BatchProgress", "Output", "StatusLine", "Tracker", "WaitTracker"]

_STATE_STYLES = {
    "succeeded": "green",
    "failed": "red",
    "pending": "yellow",
    "not_found": "red",
}


class Tracker(Protocol):
    """What a wait shows while tasks finish: a status line, or a progress bar."""

    def update(self, task: Task) -> None:
        """A task's record changed."""

    def finished(self, report: TaskReport) -> None:
        """A task finished (or turned out unknown)."""

    def saving(self, task_id: str, count: int) -> None:
        """A task's images are being saved."""


class StatusLine:
    """The live status line of a one-task wait."""

    def __init__(self, progress: Progress, line: TaskID) -> None:
        self._progress = progress
        self._line = line

    def update(self, task: Task) -> None:
        self._progress.update(self._line, description=f"Task {task.id}: {task.state.value}")

    def finished(self, report: TaskReport) -> None:
        self._progress.update(self._line, description=f"Task {report.id}: {report.state}")

    def saving(self, task_id: str, count: int) -> None:
        images = f"{count} image{'s' * (count != 1)}"
        self._progress.update(self._line, description=f"Task {task_id}: saving {images}")


class WaitTracker:
    """The progress bar of a many-task wait: finished, succeeded and failed counts."""

    def __init__(self, progress: Progress, bar: TaskID) -> None:
        self._progress = progress
        self._bar = bar
        self._succeeded = 0
        self._failed = 0

    def update(self, task: Task) -> None:
        pass

    def finished(self, report: TaskReport) -> None:
        """Count one more finished task (counted when it finishes, before any download)."""
        if report.state == "succeeded":
            self._succeeded += 1
        else:
            self._failed += 1
        self._progress.update(self._bar, advance=1, succeeded=self._succeeded, failed=self._failed)

    def saving(self, task_id: str, count: int) -> None:
        pass


class BatchProgress:
    """The progress of ``nanobanana batch``: a bar with counts and an ETA on a terminal,
    one plain line per event in a pipe (a log reader or CI sees each as it happens)."""

    def __init__(self, output: Output, progress: Progress | None, bar: TaskID | None) -> None:
        self._output = output
        self._progress = progress
        self._bar = bar

    def line(self, text: str, style: str | None = None) -> None:
        if self._progress is not None:
            self._progress.console.print(Text(text, style=style or ""), soft_wrap=True)
        else:
            self._output.note(text, style=style)

    def show(self, done: int, failed: int, pending: int) -> None:
        if self._progress is not None and self._bar is not None:
            self._progress.update(
                self._bar, completed=done + failed, done=done, failed=failed, pending=pending
            )


class Output:
    """The two streams of one command run, and how results are shown on them."""

    def __init__(self, *, json_mode: bool = False) -> None:
        self.json_mode = json_mode
        # Consoles look up sys.stdout / sys.stderr when they write, so captures work.
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    # --- messages (stderr) ------------------------------------------------------------

    def note(self, text: str, *, style: str | None = None) -> None:
        """One line for people, on stderr; never wrapped, never read as markup."""
        self.err.print(Text(text, style=style or ""), soft_wrap=True)

    def error(self, text: str) -> None:
        """The one line that says why the command failed."""
        self.note(f"nanobanana: error: {text}", style="bold red")

    # --- progress (stderr) ------------------------------------------------------------

    @contextmanager
    def waiting_for(self, task_id: str) -> Iterator[StatusLine]:
        """A live status line for one task."""
        progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", markup=False),
            TimeElapsedColumn(),
            console=self.err,
            transient=True,
            # Off a terminal, a transient line can only leave a blank line behind.
            disable=not self.err.is_terminal,
        )
        line = progress.add_task(f"Task {task_id}: submitted", total=None)
        with progress:
            yield StatusLine(progress, line)

    @contextmanager
    def waiting_for_many(self, total: int) -> Iterator[WaitTracker]:
        """A progress bar over ``total`` tasks, with succeeded and failed counts."""
        progress = Progress(
            SpinnerColumn(),
            TextColumn("Waiting"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[green]{task.fields[succeeded]} done[/] [red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            console=self.err,
        )
        bar = progress.add_task("wait", total=total, succeeded=0, failed=0)
        with progress:
            yield WaitTracker(progress, bar)

    @contextmanager
    def batch_progress(self, total: int, already: tuple[int, int, int]) -> Iterator[BatchProgress]:
        """The progress of a batch of ``total`` jobs; ``already`` is (done, failed, pending)."""
        if not self.err.is_terminal:
            yield BatchProgress(self, None, None)
            return
        done, failed, pending = already
        progress = Progress(
            SpinnerColumn(),
            TextColumn("Batch"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "[green]{task.fields[done]} done[/] [red]{task.fields[failed]} failed[/] "
                "[yellow]{task.fields[pending]} pending"
            ),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.err,
        )
        bar = progress.add_task(
            "batch",
            total=total,
            completed=done + failed,
            done=done,
            failed=failed,
            pending=pending,
        )
        with progress:
            yield BatchProgress(self, progress, bar)

    @contextmanager
    def busy(self, text: str) -> Iterator[None]:
        """A spinner with ``text`` while something short happens (a download)."""
        with self.err.status(Text(text)):
            yield

    # --- results (stdout) -------------------------------------------------------------

    def line(self, text: str) -> None:
        """One plain line on stdout."""
        self.out.print(Text(text), soft_wrap=True)

    def report(self, reports: list[TaskReport]) -> None:
        """Show the tasks: the JSON document, or a table (for several) and their images."""
        if self.json_mode:
            sys.stdout.write(json.dumps(document(reports), indent=2) + "\n")
            sys.stdout.flush()
            return
        if len(reports) > 1:
            self.out.print(_table(reports))
        else:
            self._summary(reports[0])
        # Each task's saved files (when all are), else its image URLs, else its id:
        # whatever happened, stdout holds everything that was read.
        for report in reports:
            items: list[object] = list(report.image_urls) or [report.id]
            if report.files and len(report.files) >= len(report.image_urls):
                items = list(report.files)
            for item in items:
                self.out.print(Text(str(item)), soft_wrap=True)

    def _summary(self, report: TaskReport) -> None:
        if report.state == "succeeded":
            took = f" in {report.elapsed:.1f} s" if report.elapsed is not None else ""
            count = len(report.image_urls)
            images = f"{count} image" + ("" if count == 1 else "s")
            saved = f", saved {len(report.files)}" if report.files else ""
            self.note(f"Task {report.id} succeeded{took}: {images}{saved}", style="green")
        elif report.state == "pending":
            self.note(f"Task {report.id} is still pending", style="yellow")


def _table(reports: list[TaskReport]) -> Table:
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("Task", no_wrap=True)
    table.add_column("State", no_wrap=True)
    table.add_column("Time", justify="right", no_wrap=True)
    table.add_column("Result", overflow="fold")
    for report in reports:
        elapsed = f"{report.elapsed:.1f} s" if report.elapsed is not None else ""
        table.add_row(
            report.id,
            Text(report.state, style=_STATE_STYLES.get(report.state, "")),
            elapsed,
            Text(_result(report)),
        )
    return table


def _result(report: TaskReport) -> str:
    """A table cell: how many images (and files), or why the task failed."""
    if report.error is not None:
        return report.error_text
    if not report.image_urls:
        return ""
    count = len(report.image_urls)
    text = f"{count} image" + ("" if count == 1 else "s")
    return text + (f", {len(report.files)} saved" if report.files else "")
