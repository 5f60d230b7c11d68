"""Durable batches: many jobs, a bounded number in flight, a journal that survives a crash.

Every image is paid for when it is submitted, so a batch must never submit a job twice
by accident, and must never lose a task id the service gave. [`BatchRunner`][] keeps
a journal (SQLite, through the standard library, in a thread of its own) where it
writes, for each job:

1. the intent to submit, *before* the request goes out;
2. the task id, as soon as the service answers;
3. the outcome, then the files saved.

Run the same batch again (after a crash, a kill, a Ctrl-C) and it skips finished jobs,
waits on the tasks already submitted, and submits only the rest. A job whose intent is
in the journal without a task id (the process died during the request) may or may not
have created a task: it is reported as ``outcome_unknown``, with its prompt, and
submitted again only with ``resubmit_unknown=True``. Submissions go out one at a time,
so a crash leaves at most one such job; a clean stop (a cancel) lets the request in
flight finish and journals its task id, so it leaves none.

Use::

    from nanobanana_async.batch import BatchJob, BatchRunner

    jobs = [BatchJob(str(n), prompt) for n, prompt in enumerate(prompts, start=1)]
    async with BatchRunner(client, jobs, journal="out/.journal.sqlite3", out="out",
                           manifest="out/manifest.jsonl", max_in_flight=10, retries=1) as batch:
        async for result in batch:        # as each job finishes
            print(result.job.key, result.state.value, result.files)
    print(batch.summary)

At most ``max_in_flight`` tasks are pending at once: a new submission goes out as soon
as one finishes, and every wait shares the client's one poll loop. A task that fails
is submitted again up to ``retries`` times (each a new paid submission, counted in
``BatchSummary.retried``); a prompt the service refuses (``forbidden``) is not.
An error that no job can get past (a bad token, no balance, a 429 after the client's
retries, an unreachable service) stops the batch and is raised from the ``async for``;
the journal is left consistent, so running again continues.

Images are saved into ``out`` under ``name_template`` (default ``{key}-{index}{ext}``:
the job key, the image's 0-based index, and the extension of what the image's bytes
are when the template ends with ``{ext}``, else of the image URL), with the umask's
permissions. The manifest (JSON lines, one per job, see
[`BatchResult.to_json`][]) holds each job's prompt, options, task ids, trace id,
image URLs, files, state and error. It is rewritten from the journal at the start and
end of every run and appended to as jobs finish, so it lists each job at most once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import string
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import attrs
from yarl import URL

from . import _images
from ._batch_records import (
    BatchChangedError,
    BatchJob,
    BatchResult,
    BatchSummary,
    JobChange,
    JobState,
    spec_text,
)
from ._checks import check_count, check_number
from ._client import NanoBananaClient
from ._concurrency import cancel_and_wait
from ._download import safe_stem as _safe_stem
from ._errors import (
    APIConnectionError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    DownloadError,
    NanoBananaError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
)
from ._journal import Journal, JournalBusyError, JournalEntry, JournalError
from ._models import ErrorDetail, Submission, Task
from ._retry import POLL_FATAL, REFUSED_CONTENT, is_account_error, may_have_created_task

__all__ = [
    "DEFAULT_NAME_TEMPLATE",
    "BatchChangedError",
    "BatchJob",
    "BatchResult",
    "BatchRunner",
    "BatchSummary",
    "JobChange",
    "JobState",
    "JournalBusyError",
    "JournalError",
    "run_batch",
]

logger = logging.getLogger("nanobanana_async.batch")

#: File name of each saved image: the job key, the image's index, the URL's extension.
DEFAULT_NAME_TEMPLATE: Final = "{key}-{index}{ext}"

_IMAGE_SUFFIXES: Final = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".gif", ".avif", ".heic", ".heif"}
)
# A file key leaves room in the download's 100-character stem for "-{index}" and more.
_MAX_KEY: Final = 80
_KEY_DIGEST: Final = 10


def _error(code: str | None, message: str | None) -> ErrorDetail:
    return ErrorDetail(code=code, message=message)


def _error_of(exc: BaseException) -> ErrorDetail:
    code = getattr(exc, "code", None)
    message = getattr(exc, "message", None)
    if not isinstance(code, str):
        code = type(exc).__name__
    if not isinstance(message, str) or not message:
        message = str(exc) or type(exc).__name__
    return ErrorDetail(code=code, message=message)


def _error_json(error: ErrorDetail) -> dict[str, str | None]:
    return {"code": error.code, "message": error.message}


def _check_template(template: str) -> None:
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    unknown = fields - {"key", "index", "ext", "task_id"}
    if unknown:
        raise ValueError(f"name_template: unknown field(s) {sorted(unknown)}")
    if not {"key", "index"} <= fields:
        raise ValueError("name_template must contain {key} and {index}, so names are unique")
    sample = template.format(key="k", index=0, ext=".png", task_id="t")
    if os.sep in sample or "/" in sample or sample.startswith("."):
        raise ValueError(f"name_template must make a plain, visible file name, got {sample!r}")


def _extension(url: str) -> str:
    suffix = Path(URL(url).path).suffix.lower()
    return suffix if suffix in _IMAGE_SUFFIXES else ".img"


def _check_jobs(jobs: Sequence[BatchJob], *, downloads: bool) -> None:
    """Every job valid, every key unique (and, with downloads, unique as a file name)."""
    keys: dict[str, str] = {}  # file-name form -> key
    seen: set[str] = set()
    for job in jobs:
        if not isinstance(job, BatchJob):
            raise TypeError(f"jobs must be BatchJob records, got {type(job).__name__}")
        job.check()
        if job.key in seen:
            raise ValueError(f"two jobs have the key {job.key!r}")
        seen.add(job.key)
        safe = _file_key(job.key).lower()  # case-insensitive file systems
        if downloads and safe in keys:
            raise ValueError(f"jobs {keys[safe]!r} and {job.key!r} would get the same file names")
        keys[safe] = job.key


def _file_key(key: str) -> str:
    """A job key as it goes into file names: the download's own safe stem (letters,
    digits, ``._-``, nothing hidden), so the name checked here is the name written.
    A key that had to change (or is over 80 characters) gets a digest of itself, so
    two keys never meet in one name ("a/b" and "a_b", or two long keys alike at first),
    and the name keeps room for the template's ``-{index}`` within the 100 allowed."""
    safe = _safe_stem(key)
    if safe == key and len(key) <= _MAX_KEY:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:_KEY_DIGEST]
    return f"{safe[: _MAX_KEY - _KEY_DIGEST - 1]}-{digest}" if safe else digest


#: What ``on_submit`` receives: the job and the service's acknowledgment.
OnSubmit = Callable[[BatchJob, Submission], object]

_DOWNLOADS_AT_ONCE: Final = 8
_ABANDONED: Final = (
    "the run stopped during the submission: a task may have been made (and paid for) "
    "whose id never came back"
)
_STATES: Final = {
    "pending": JobState.PENDING,
    "failed": JobState.FAILED,
    "download_failed": JobState.DOWNLOAD_FAILED,
    "succeeded": JobState.SUCCEEDED,
}


class _Fatal(Exception):
    """Carries the error that stops the whole batch out of a job's coroutine."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class BatchRunner:
    """Runs a batch of [`BatchJob`][] durably; see the module docstring.

    Open it with ``async with``, iterate it once for the results as jobs finish (or
    call [`run`][]), then read [`summary`][] and [`results`][]. Iteration yields
    each job that reaches an end in this run (succeeded, failed, download failed,
    outcome unknown; pending with an ``error`` when reading its task failed), and, first,
    the jobs the journal holds with an unknown outcome. Jobs finished by an earlier run
    are not yielded; [`results`][] has them all.

    ``journal``: the SQLite file (created if needed; one runner at a time may hold it).
    ``out``: the folder for the images, or None to save nothing. ``manifest``: the
    JSON-lines file to write, or None. ``max_in_flight``: tasks pending at once.
    ``retries``: new submissions allowed per job after a failed task (over all runs).
    ``resubmit_unknown``: submit again jobs whose outcome is unknown (may pay twice).
    ``name_template``: image file names; fields ``{key}``, ``{index}``, ``{ext}``,
    ``{task_id}``. ``download_timeout``: seconds allowed per image, or None. ``on_submit``:
    called with each job and its [`Submission`][nanobanana_async.Submission] as soon as
    the service answers, just before the journal records the task id (so the id gets
    out even if that write fails).
    """

    def __init__(
        self,
        client: NanoBananaClient,
        jobs: Iterable[BatchJob],
        *,
        journal: str | os.PathLike[str],
        out: str | os.PathLike[str] | None = None,
        manifest: str | os.PathLike[str] | None = None,
        max_in_flight: int = 8,
        retries: int = 0,
        resubmit_unknown: bool = False,
        name_template: str = DEFAULT_NAME_TEMPLATE,
        download_timeout: float | None = 300.0,
        on_submit: OnSubmit | None = None,
    ) -> None:
        check_count("max_in_flight", max_in_flight)
        check_count("retries", retries, minimum=0)
        if download_timeout is not None:
            # A NaN or a bool would pass a bare "> 0"; a NaN deadline stalls the loop.
            download_timeout = check_number("download_timeout", download_timeout)
        _check_template(name_template)
        self._jobs = list(jobs)
        _check_jobs(self._jobs, downloads=out is not None)
        self._client = client
        self._journal = Journal(journal)
        self._out = Path(out) if out is not None else None
        self._manifest = Path(manifest) if manifest is not None else None
        self._max_in_flight = max_in_flight
        self._retries = retries
        self._resubmit_unknown = resubmit_unknown
        self._template = name_template
        self._download_timeout = download_timeout
        self._on_submit = on_submit

        self._opened = self._iterated = self._closed = False
        self._entries: dict[str, JournalEntry] = {}
        self._plans: dict[str, str] = {}
        self._results: dict[str, BatchResult] = {}
        self._state_counts = dict.fromkeys(JobState, 0)
        self._retries_done: dict[str, int] = {}
        self._counts = dict.fromkeys(
            ("skipped", "resumed", "submitted", "retried", "resubmitted"), 0
        )
        self._finished: asyncio.Queue[BatchResult] = asyncio.Queue()
        # The sliding window: tasks pending now, and a wake-up for the driver.
        self._in_flight = 0
        self._room = asyncio.Event()
        # One submission at a time: a crash can then leave at most one unknown outcome.
        self._submit_lock = asyncio.Lock()
        self._downloads = asyncio.Semaphore(_DOWNLOADS_AT_ONCE)
        self._fatal: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._driver: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def journal_path(self) -> Path:
        """Where the journal is."""
        return self._journal.path

    async def __aenter__(self) -> BatchRunner:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Open and lock the journal, check that no journaled job changed, tidy ``out``.

        Raises [`BatchChangedError`][] (nothing submitted) if jobs changed, and
        [`JournalBusyError`][] if another runner holds the journal.
        """
        if self._opened:
            raise RuntimeError("this BatchRunner was already opened")
        self._opened = True
        try:
            entries = await self._journal.open()
            changes = [
                JobChange(job.key, json.loads(entry.spec), job.describe(), entry.task_id)
                for job in self._jobs
                if (entry := entries.get(job.key)) is not None and entry.spec != spec_text(job)
            ]
            # A journaled job left out of the input would vanish from the manifest, with
            # its task (and any images still to come): a change like any other.
            given = {job.key for job in self._jobs}
            changes += [
                JobChange(key, json.loads(entry.spec), None, entry.task_id)
                for key, entry in entries.items()
                if key not in given
            ]
            if changes:
                raise BatchChangedError(self._journal.path, changes)
            self._entries = entries
            self._retries_done = {key: entry.retries for key, entry in entries.items()}
            missing: set[str] = set()
            if self._out is not None:
                saved = {
                    key: [self._out / name for name in entry.files]
                    for key, entry in entries.items()
                    if entry.state == "succeeded"
                }
                missing = await self._journal.run_io(_prepare_out, self._out, saved)
            for job in self._jobs:
                entry = entries.get(job.key)
                self._plans[job.key] = self._plan(entry, files_missing=job.key in missing)
                self._set(self._result_from_entry(job, entry))
            # Start from the journal's view: each job this run will not touch, once.
            await self._write_manifest(lambda key: self._plans[key] in ("done", "unknown"))
        except BaseException:
            self._closed = True
            await self._journal.aclose()
            raise

    async def aclose(self) -> None:
        """Rewrite the manifest with every job, and close the journal (idempotent)."""
        if self._closed or not self._opened:
            self._closed = True
            return
        self._closed = True
        try:
            if self._driver is not None and not self._driver.done():
                # The loop was left without closing it: stop the jobs before the journal.
                await cancel_and_wait({self._driver})
            # Jobs still running (the driver itself was stopped twice): the journal must
            # outlive every one of them, or a task id answered now could not be recorded.
            await cancel_and_wait(self._tasks)
        finally:
            try:
                await self._write_manifest(lambda key: True)
            finally:
                await self._journal.aclose()

    async def run(self) -> BatchSummary:
        """Run the batch to its end (inside ``async with``) and return the summary."""
        async for _ in self:
            pass
        return self.summary

    # --- what it has to say -----------------------------------------------------------------

    @property
    def summary(self) -> BatchSummary:
        """The accounting so far (live while the batch runs, final after)."""
        states = self._state_counts
        return BatchSummary(
            total=len(self._jobs),
            succeeded=states[JobState.SUCCEEDED],
            failed=states[JobState.FAILED],
            download_failed=states[JobState.DOWNLOAD_FAILED],
            outcome_unknown=states[JobState.OUTCOME_UNKNOWN],
            pending=states[JobState.PENDING],
            **self._counts,
        )

    def _set(self, result: BatchResult) -> None:
        """Keep a job's current result, and the count of jobs in each state."""
        earlier = self._results.get(result.job.key)
        if earlier is not None:
            self._state_counts[earlier.state] -= 1
        self._state_counts[result.state] += 1
        self._results[result.job.key] = result

    def results(self) -> list[BatchResult]:
        """Every job's current result, in the order the jobs were given."""
        return [self._results[job.key] for job in self._jobs]

    def result(self, key: str) -> BatchResult:
        """One job's current result, by its key (KeyError for a key not in the batch)."""
        return self._results[key]

    @property
    def planned(self) -> dict[str, int]:
        """What this run does with the jobs, counted (known once opened): ``first``,
        ``retry`` and ``resubmit`` (new submissions), ``wait`` (on a task submitted
        earlier), ``save`` (images of a task that succeeded earlier), ``unknown``
        (reported, not submitted) and ``done`` (nothing to do)."""
        counts = dict.fromkeys(("first", "retry", "resubmit", "wait", "save", "unknown", "done"), 0)
        for plan in self._plans.values():
            counts[plan] += 1
        return counts

    # --- the run --------------------------------------------------------------------------------

    def __aiter__(self) -> AsyncGenerator[BatchResult, None]:
        if not self._opened or self._closed:
            raise RuntimeError("open the BatchRunner first: async with BatchRunner(...) as b")
        if self._iterated:
            raise RuntimeError("a BatchRunner runs once; make a new one to run again")
        self._iterated = True
        return self._iterate()

    async def _iterate(self) -> AsyncGenerator[BatchResult, None]:
        driver = self._driver = asyncio.create_task(self._drive())
        try:
            while True:
                getter = asyncio.ensure_future(self._finished.get())
                try:
                    await asyncio.wait({getter, driver}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    getter.cancel()
                if getter.done() and not getter.cancelled():
                    yield getter.result()
                    continue
                while not self._finished.empty():
                    yield self._finished.get_nowait()
                driver.result()  # raises the error that stopped the batch
                return
        finally:
            # Leaving early (a break, a cancel) stops the jobs; the journal stays consistent.
            await cancel_and_wait({driver})

    async def _drive(self) -> None:
        """Start every job: waits at once, new submissions whenever the window has room."""
        tasks = self._tasks

        def start(work: Coroutine[Any, Any, None]) -> None:
            tasks.add(asyncio.create_task(self._guard(work)))

        try:
            fresh = []
            for job in self._jobs:
                plan = self._plans[job.key]
                entry = self._entries.get(job.key)
                if plan == "wait":
                    assert entry is not None
                    assert entry.task_id is not None
                    self._counts["resumed"] += 1
                    self._in_flight += 1
                    start(self._run_job(job, "", entry.task_id))
                elif plan == "save":
                    assert entry is not None
                    self._counts["resumed"] += 1
                    start(self._save(job, entry.image_urls))
                elif plan == "unknown":
                    self._finished.put_nowait(self._results[job.key])
                elif plan == "done":
                    self._counts["skipped"] += 1
                else:
                    fresh.append((job, plan))
            for job, kind in fresh:
                while self._fatal is None and self._in_flight >= self._max_in_flight:
                    self._room.clear()
                    await self._room.wait()
                if self._fatal is not None:
                    break
                self._in_flight += 1
                start(self._run_job(job, kind, None))
            while tasks and self._fatal is None:
                self._room.clear()
                await self._room.wait()
        finally:
            await cancel_and_wait(tasks)
        if self._fatal is not None:
            raise self._fatal

    def _plan(self, entry: JournalEntry | None, *, files_missing: bool) -> str:
        """What this run does with a job: first | retry | resubmit (submit), wait (on an
        earlier task), save (its images), unknown (report it), done (nothing)."""
        if entry is None:
            return "first"
        if entry.state == "submitting":
            return "resubmit" if self._resubmit_unknown else "unknown"
        if entry.state == "pending":
            return "wait"
        if entry.state == "failed":
            retry = entry.retryable and entry.retries < self._retries
            return "retry" if retry else "done"
        if self._out is not None and (entry.state == "download_failed" or files_missing):
            return "save"
        return "done"

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        """Run one job; an error that stops the batch is kept and wakes the driver."""
        try:
            await work
        except _Fatal as stop:
            self._fatal = self._fatal or stop.error
        except Exception as exc:  # a bug or an OS error: stop the batch, show it
            self._fatal = self._fatal or exc
        finally:
            # Out of the set before the driver wakes, so it sees the job gone.
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
            self._room.set()

    async def _finish(self, result: BatchResult, *, final: bool = True) -> None:
        """A job reached an end in this run: keep it, add it to the manifest, yield it."""
        self._set(result)
        if final and self._manifest is not None:
            line = json.dumps(result.to_json(self._manifest.parent), ensure_ascii=False)
            await self._journal.run_io(_append_line, self._manifest, line)
        self._finished.put_nowait(result)

    def _release(self) -> None:
        self._in_flight -= 1
        self._room.set()

    # --- one job ---------------------------------------------------------------------------------

    async def _run_job(self, job: BatchJob, kind: str, task_id: str | None) -> None:
        """Submit (unless ``task_id`` is known) and wait, again for a retry; then save.

        Holds a window slot until the task is finished.
        """
        holding = True
        # A task id read back from the journal, or the submission just made (the poll
        # loop then knows the task is new, and reads it when it could be done).
        ref: str | Submission | None = task_id
        try:
            while True:
                if ref is None:
                    ref = await self._submit(job, kind)
                    if ref is None:
                        return
                task = await self._wait(job, ref)
                if task is None:
                    return
                failure = task.failure
                if failure is None:
                    self._release()
                    holding = False
                    await self._save(job, task.image_urls)
                    return
                if (
                    failure.code == REFUSED_CONTENT
                    or self._retries_done.get(job.key, 0) >= self._retries
                ):
                    await self._finish(attrs.evolve(self._results[job.key], state=JobState.FAILED))
                    return
                kind, ref = "retry", None
        finally:
            if holding:
                self._release()

    async def _submit(self, job: BatchJob, kind: str) -> Submission | None:
        """Journal the intent, submit, journal the answer; the submission, or None when
        the job ended here (refused, or outcome unknown)."""
        async with self._submit_lock:
            if self._fatal is not None:
                return None  # the batch is stopping: leave the job as it is
            try:
                # Local files are read before the intent: a file that cannot be read
                # fails this job alone, with nothing journaled (nothing was sent), so
                # the next run tries it again once the file is fixed.
                images = await _images.image_urls(job.image_urls) if job.image_urls else []
            except (OSError, ValueError) as exc:
                await self._finish(
                    attrs.evolve(
                        self._results[job.key],
                        state=JobState.FAILED,
                        error=_error("bad_image", str(exc)),
                    )
                )
                return None
            attempt = self._results[job.key].attempts + 1
            try:
                await self._journal.intend(job.key, spec_text(job), kind, attempt)
            except asyncio.CancelledError:
                # Stopped before the request went out: take the intent back.
                await self._journal.withdraw(job.key, attempt)
                raise
            request = asyncio.ensure_future(self._request(job, images))
            stopping = False
            try:
                outcome: Submission | NanoBananaError = await asyncio.shield(request)
            except asyncio.CancelledError:
                # A stop: let the request in flight end, so that its task id is
                # journaled and no outcome is left unknown; then stop.
                stopping = True
                try:
                    outcome = await request
                except NanoBananaError as exc:
                    outcome = exc
                except asyncio.CancelledError:
                    # Stopped again: the request is abandoned with its intent journaled
                    # (the next run reports it). Say so now too: a task may exist.
                    self._set(
                        attrs.evolve(
                            self._results[job.key],
                            state=JobState.OUTCOME_UNKNOWN,
                            error=_error("outcome_unknown", _ABANDONED),
                            attempts=attempt,
                        )
                    )
                    raise
            except NanoBananaError as exc:
                outcome = exc
            task_id = await self._answered(job, kind, attempt, outcome)
        if stopping:
            raise asyncio.CancelledError
        if task_id is None:
            return None
        assert isinstance(outcome, Submission)
        return outcome

    async def _request(self, job: BatchJob, images: Sequence[str]) -> Submission:
        if images:
            return await self._client.edit(job.prompt, images, **job.options)
        return await self._client.generate(job.prompt, **job.options)

    async def _answered(
        self, job: BatchJob, kind: str, attempt: int, outcome: Submission | NanoBananaError
    ) -> str | None:
        """Journal what the submission came to; returns its task id, if it made one.

        In-memory results are updated before each journal write: a cancel during the
        write (which still lands) must not leave the manifest behind the journal.
        """
        previous = self._results[job.key]
        if isinstance(outcome, NanoBananaError) and not may_have_created_task(outcome):
            if _stops_the_batch(outcome):
                # Certainly no task was made (refused as a whole, or never reached the
                # service): take the intent back, so the next run submits this job anew.
                await self._journal.withdraw(job.key, attempt)
                raise _Fatal(outcome)
            if isinstance(outcome, BadRequestError | PermissionDeniedError):
                # This job's own request was refused (a bad option, a refused prompt):
                # no task, nothing paid, and trying again would change nothing.
                error = _error_of(outcome)
                result = attrs.evolve(
                    previous,
                    state=JobState.FAILED,
                    task_id=None,
                    trace_id=outcome.trace_id,
                    error=error,
                )
                self._set(result)
                await self._journal.refused(job.key, attempt, _error_json(error))
                await self._finish(result)
                return None
        self._counts["submitted"] += 1
        if kind == "retry":
            self._counts["retried"] += 1
            self._retries_done[job.key] = self._retries_done.get(job.key, 0) + 1
        elif kind == "resubmit":
            self._counts["resubmitted"] += 1
        if isinstance(outcome, Submission):
            self._set(
                attrs.evolve(
                    previous,
                    state=JobState.PENDING,
                    task_id=outcome.task_id,
                    trace_id=outcome.trace_id,
                    image_urls=(),
                    files=(),
                    error=None,
                    attempts=attempt,
                    task_ids=(*previous.task_ids, outcome.task_id),
                )
            )
            try:
                # The caller hears of the task id first (the CLI prints it): should the
                # journal write fail (a full disk), the id of a paid task still got out.
                if self._on_submit is not None:
                    self._on_submit(job, outcome)
            finally:
                try:
                    await self._journal.submitted(
                        job.key, attempt, outcome.task_id, outcome.trace_id
                    )
                except Exception as exc:
                    exc.add_note(
                        f"job {job.key!r} was submitted as task {outcome.task_id}, "
                        "which the journal could not record"
                    )
                    raise
            return outcome.task_id
        # A 5xx, a timeout, an unreadable answer: the service may have made a task.
        error = _error_of(outcome)
        notes = " ".join(getattr(outcome, "__notes__", []))
        if notes:
            error = attrs.evolve(error, message=f"{error.message} {notes}")
        result = attrs.evolve(
            previous,
            state=JobState.OUTCOME_UNKNOWN,
            task_id=None,
            trace_id=None,
            error=error,
            attempts=attempt,
        )
        self._set(result)
        await self._journal.unknown(job.key, _error_json(error))
        await self._finish(result)
        if _stops_the_batch(outcome):
            # The client was closed with the request out, say: the job is journaled as
            # an unknown outcome (a task may exist), and the batch stops.
            raise _Fatal(outcome)
        return None

    async def _wait(self, job: BatchJob, ref: str | Submission) -> Task | None:
        """Wait for the task and journal how it finished; None when the job ended
        without a record (an unknown id, or a read error that leaves it pending)."""
        try:
            task = await self._client.wait(ref, timeout=None)
        except NanoBananaError as exc:
            if _stops_the_batch_when_read(exc):
                raise _Fatal(exc) from exc
            # A read error for this task alone (an id the service does not know, or
            # refuses to read, after the poll loop's grace and bisection; a timeout): no
            # other job stops, and this one stays pending in the journal with its task
            # id, so the next run waits on it again. Failing it for good would drop a
            # task that may be paid for and finish later.
            result = attrs.evolve(
                self._results[job.key], state=JobState.PENDING, error=_error_of(exc)
            )
            await self._finish(result, final=False)
            return None
        failure = task.failure
        previous = self._results[job.key]
        self._set(
            attrs.evolve(
                previous,
                trace_id=task.trace_id or previous.trace_id,
                image_urls=tuple(task.image_urls),
                error=failure,
            )
        )
        await self._journal.finished(
            job.key,
            succeeded=failure is None,
            trace_id=task.trace_id,
            image_urls=task.image_urls,
            error=_error_json(failure) if failure is not None else None,
            retryable=failure is not None and failure.code != REFUSED_CONTENT,
        )
        return task

    async def _save(self, job: BatchJob, image_urls: Sequence[str]) -> None:
        """Save a succeeded job's images (when there is an ``out``), and journal them."""
        result = attrs.evolve(self._results[job.key], image_urls=tuple(image_urls))
        if self._out is None:
            await self._finish(attrs.evolve(result, state=JobState.SUCCEEDED, error=None))
            return
        files: list[Path] = []
        error: ErrorDetail | None = None
        file_key = _file_key(job.key)
        by_bytes = self._template.endswith("{ext}")  # the extension of the bytes
        async with self._downloads:
            for index, url in enumerate(image_urls):
                fields = {"key": file_key, "index": index, "task_id": result.task_id or ""}
                if by_bytes:
                    name = self._template[: -len("{ext}")].format(**fields, ext="")
                else:
                    name = self._template.format(**fields, ext=_extension(url))
                deadline = asyncio.timeout(self._download_timeout)
                try:
                    async with deadline:
                        if by_bytes:
                            saved = await self._client.download(url, self._out, stem=name)
                        else:
                            saved = await self._client.download(url, self._out / name)
                    files.append(saved)
                except (DownloadError, APIConnectionError, OSError, ValueError) as exc:
                    # The deadline says which timeout it was: an APITimeoutError (the
                    # client's per-request timeout) is a TimeoutError too, as is any OSError
                    # subclass of it; only ours means "took over download_timeout".
                    if deadline.expired():
                        message = f"saving {name} took over {self._download_timeout:g} s"
                        error = _error("download_timeout", message)
                    else:
                        error = _error("download_failed", str(exc))
                if error is not None:
                    break
        names = [path.name for path in files]
        await self._journal.saved(job.key, names, _error_json(error) if error else None)
        state = JobState.SUCCEEDED if error is None else JobState.DOWNLOAD_FAILED
        await self._finish(attrs.evolve(result, state=state, files=tuple(files), error=error))

    # --- from the journal, to the manifest ----------------------------------------------------

    def _result_from_entry(self, job: BatchJob, entry: JournalEntry | None) -> BatchResult:
        if entry is None:
            return BatchResult(job, JobState.PENDING)
        error = ErrorDetail(**entry.error) if entry.error else None
        plan = self._plans[job.key]
        if entry.state == "submitting":
            state = JobState.OUTCOME_UNKNOWN
            error = error or _error("outcome_unknown", _ABANDONED)
        elif entry.state == "succeeded" or (entry.state == "download_failed" and not self._out):
            # Succeeded; with images still to save (``plan == "save"``) it is not done yet.
            state = JobState.PENDING if plan == "save" else JobState.SUCCEEDED
            error = None if state is JobState.SUCCEEDED else error
        else:
            state = _STATES[entry.state]
        files: tuple[Path, ...] = ()
        if self._out is not None:
            files = tuple(self._out / name for name in entry.files)
        return BatchResult(
            job,
            state,
            task_id=entry.task_id,
            trace_id=entry.trace_id,
            image_urls=entry.image_urls,
            files=files,
            error=error,
            attempts=entry.attempts,
            task_ids=entry.task_ids,
        )

    async def _write_manifest(self, include: Callable[[str], bool]) -> None:
        """Rewrite the manifest (atomically) with the jobs ``include`` picks by key."""
        if self._manifest is None:
            return
        base = self._manifest.parent
        lines = [
            json.dumps(result.to_json(base), ensure_ascii=False)
            for result in self.results()
            if include(result.job.key)
        ]
        await self._journal.run_io(_replace_lines, self._manifest, lines)


def _stops_the_batch(exc: NanoBananaError) -> bool:
    """Errors of a submission that no other job could get past either."""
    if isinstance(exc, APIConnectionError):
        return not exc.request_sent  # the service could not be reached at all
    if is_account_error(exc):  # a bad token, no balance, a disabled API: alike for all
        return True
    if isinstance(exc, PermissionDeniedError):
        # Only the content filter's 403 is about this job's prompt; a 403 page with
        # no code (a proxy's, say) is no verdict on the job: stop, and keep it to retry.
        return exc.code != REFUSED_CONTENT
    return isinstance(exc, AuthenticationError | NotFoundError | RateLimitError | ClientClosedError)


def _stops_the_batch_when_read(exc: NanoBananaError) -> bool:
    """Errors of a wait that no other job could get past either: what the poll loop
    fails every waiter with (a refused account, a wrong base URL), or a closed client.
    A 400 for one id is not among them: the poll loop fails only the wait on it."""
    return isinstance(exc, (*POLL_FATAL, ClientClosedError)) or is_account_error(exc)


def _prepare_out(folder: Path, saved: Mapping[str, Sequence[Path]]) -> set[str]:
    """Make the image folder, remove ``.part`` files a killed run left behind, and
    return the keys of succeeded jobs whose saved images are not all there: gone since,
    or never saved (a run killed between the task's outcome and its download).

    Removing is safe: the journal's lock says no other batch writes here, and
    downloads keep a file under a hidden ``.*.part`` name only until it is complete.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob(".*.part"):
        with contextlib.suppress(OSError):
            leftover.unlink()
    # A succeeded task has at least one image, so no file at all means none was saved.
    return {key for key, paths in saved.items() if not paths or not all(p.is_file() for p in paths)}


def _append_line(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(line + "\n")


def _replace_lines(path: Path, lines: Sequence[str]) -> None:
    """Write ``lines`` to ``path`` atomically (a temp file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp")
    with temp.open("w", encoding="utf-8") as file:
        file.writelines(line + "\n" for line in lines)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


async def run_batch(
    client: NanoBananaClient, jobs: Iterable[BatchJob], **options: Any
) -> BatchSummary:
    """Run a batch to its end: ``BatchRunner(client, jobs, **options).run()``."""
    async with BatchRunner(client, jobs, **options) as runner:
        return await runner.run()
