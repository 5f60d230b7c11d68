"""The batch journal: what was asked, submitted and finished, in SQLite, off the event loop.

Every write is one transaction, committed (``synchronous=FULL``) before the caller goes
on, so the order on disk is the order of events: the intent to submit before the
request, the task id as soon as the service answers, then the outcome and the files.
A process killed at any moment leaves the journal at one of those steps.

The connection lives in one worker thread of its own: SQLite calls block, and one
thread keeps them in order. The database is opened in exclusive locking mode, so a
second batch on the same journal fails at once instead of paying for the same jobs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs

__all__ = ["JOURNAL_STATES", "Journal", "JournalBusyError", "JournalEntry", "JournalError"]

T = TypeVar("T")

logger = logging.getLogger("nanobanana_async.batch")

_SCHEMA_VERSION: Final = "1"
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
-- One row per job: where it stands now.
CREATE TABLE IF NOT EXISTS jobs (
    key        TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,               -- the job as JSON (prompt, options, images)
    state      TEXT NOT NULL,               -- see JOURNAL_STATES
    task_id    TEXT,                        -- the latest submission's task
    trace_id   TEXT,
    image_urls TEXT NOT NULL DEFAULT '[]',  -- JSON list, once succeeded
    files      TEXT NOT NULL DEFAULT '[]',  -- JSON list of file names, once saved
    error      TEXT,                        -- JSON {"code", "message"} or NULL
    retryable  INTEGER NOT NULL DEFAULT 0,  -- whether a failure may be submitted again
    updated_at REAL NOT NULL
);
-- One row per submission (each one possibly paid): the history of every task id.
CREATE TABLE IF NOT EXISTS submissions (
    key         TEXT NOT NULL,
    attempt     INTEGER NOT NULL,
    task_id     TEXT,                       -- NULL: no answer (yet); outcome unknown
    trace_id    TEXT,
    intent_at   REAL NOT NULL,
    answered_at REAL,
    kind        TEXT NOT NULL,              -- first | retry | resubmit
    prior       TEXT,                       -- the job's row before this intent (JSON)
    PRIMARY KEY (key, attempt)
);
"""

#: A job's states in the journal. "submitting": the intent is written and no task id
#: (yet); after a crash, or with an error attached, the outcome is unknown.
JOURNAL_STATES: Final = frozenset(
    {"submitting", "pending", "succeeded", "failed", "download_failed"}
)


class JournalError(Exception):
    """The journal cannot be used: not a journal (another file, a folder), unreadable,
    of another schema, or busy. About a local file, not the service, so not a
    NanoBananaError."""


class JournalBusyError(JournalError):
    """Another process holds the journal (a batch already running on it)."""


@attrs.frozen
class JournalEntry:
    """One job's row, with the task ids of all its submissions, oldest first."""

    key: str
    spec: str
    state: str
    task_id: str | None
    trace_id: str | None
    image_urls: tuple[str, ...]
    files: tuple[str, ...]
    error: Mapping[str, str | None] | None
    retryable: bool
    task_ids: tuple[str, ...]
    attempts: int  # submissions made, answered or not
    retries: int  # submissions made because a task failed


class Journal:
    """The SQLite journal of one batch; every method runs in the journal's own thread."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="nanobanana-journal"
        )
        self._db: sqlite3.Connection | None = None
        self._closed = False

    # --- running in the journal's thread ------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the journal's thread. A cancel of the caller waits for the call
        to end before it goes on: a write asked for is a write made, before the caller
        does anything else."""
        if self._closed:
            raise RuntimeError("the journal is closed")
        future = asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # Wait out the call even through further cancels (a second Ctrl-C): a
            # SQLite write takes milliseconds, and the caller must not go on before it.
            # The cancel wins over the call's own error, which is logged, not lost.
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({future})
            if not future.cancelled() and (error := future.exception()) is not None:
                logger.error("a journal write failed while the batch was stopping: %r", error)
            raise

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "journal not open"
        return self._db

    def _write(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> None:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in statements:
                db.execute(sql, params)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> dict[str, JournalEntry]:
        """Open (creating if needed) and lock the journal; returns every job's entry."""
        return await self._call(self._open)

    def _open(self) -> dict[str, JournalEntry]:
        try:
            return self._open_db()
        except JournalError:
            raise
        except (sqlite3.Error, OSError, ValueError) as exc:
            # A file that is not a journal (garbage, a folder, another schema), or one
            # that cannot be opened: say so plainly, nothing was submitted.
            raise JournalError(f"{self.path} cannot be used as a batch journal: {exc}") from None

    def _open_db(self) -> dict[str, JournalEntry]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=0.5, isolation_level=None)
        try:
            # Exclusive: the lock taken by the first write below is held until close, so
            # a second runner on the same journal is refused instead of paying twice.
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN EXCLUSIVE")
            db.execute("COMMIT")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
            if tables and "meta" not in tables:
                # Another application's database: never add our tables to it.
                raise JournalError(f"{self.path} is an SQLite database, but not a batch journal")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (_SCHEMA_VERSION,))
            elif row[0] != _SCHEMA_VERSION:
                raise ValueError(
                    f"{self.path} is a journal of schema {row[0]}; this version reads "
                    f"schema {_SCHEMA_VERSION}"
                )
        except sqlite3.OperationalError as exc:
            db.close()
            if "locked" in str(exc):
                raise JournalBusyError(
                    f"{self.path} is in use by another batch (only one may run on a journal)"
                ) from None
            raise
        except BaseException:
            db.close()
            raise
        self._db = db
        try:
            return self._entries()
        except BaseException:
            # A journal whose rows do not read: close it, so its lock goes with it.
            self._db = None
            db.close()
            raise

    def _entries(self) -> dict[str, JournalEntry]:
        db = self._conn()
        history: dict[str, list[tuple[str | None, str]]] = {}
        for key, task_id, kind in db.execute(
            "SELECT key, task_id, kind FROM submissions ORDER BY key, attempt"
        ):
            history.setdefault(key, []).append((task_id, kind))
        entries = {}
        for row in db.execute(
            "SELECT key, spec, state, task_id, trace_id, image_urls, files, error, retryable "
            "FROM jobs"
        ):
            key = row[0]
            made = history.get(key, [])
            entries[key] = JournalEntry(
                key=key,
                spec=row[1],
                state=row[2],
                task_id=row[3],
                trace_id=row[4],
                image_urls=tuple(json.loads(row[5])),
                files=tuple(json.loads(row[6])),
                error=json.loads(row[7]) if row[7] else None,
                retryable=bool(row[8]),
                task_ids=tuple(task_id for task_id, _ in made if task_id),
                attempts=len(made),
                retries=sum(kind == "retry" for _, kind in made),
            )
        return entries

    async def aclose(self) -> None:
        """Finish the writes already asked for, then close the database and the thread."""
        if self._closed:
            return
        future = asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._closed = True
        try:
            await asyncio.shield(future)
        finally:
            self._executor.shutdown(wait=False)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # --- events ----------------------------------------------------------------------------

    async def intend(self, key: str, spec: str, kind: str, attempt: int) -> None:
        """Record the intent to make submission ``attempt`` of ``key``, before the request."""
        await self._call(self._intend, key, spec, kind, attempt)

    def _intend(self, key: str, spec: str, kind: str, attempt: int) -> None:
        db = self._conn()
        db.row_factory = sqlite3.Row
        try:
            row = db.execute("SELECT * FROM jobs WHERE key = ?", (key,)).fetchone()
        finally:
            db.row_factory = None
        prior = json.dumps(dict(row)) if row is not None else None
        now = time.time()
        self._write(
            [
                (
                    "INSERT INTO jobs (key, spec, state, updated_at) "
                    "VALUES (?, ?, 'submitting', ?) "
                    "ON CONFLICT (key) DO UPDATE SET state = 'submitting', task_id = NULL, "
                    "trace_id = NULL, image_urls = '[]', files = '[]', error = NULL, "
                    "retryable = 0, updated_at = excluded.updated_at",
                    (key, spec, now),
                ),
                (
                    "INSERT INTO submissions (key, attempt, intent_at, kind, prior) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (key, attempt, now, kind, prior),
                ),
            ]
        )

    async def withdraw(self, key: str, attempt: int) -> None:
        """Take back an intent whose request certainly made no task (never sent, or
        refused as a whole): the job is left as it was before."""
        await self._call(self._withdraw, key, attempt)

    def _withdraw(self, key: str, attempt: int) -> None:
        row = (
            self._conn()
            .execute("SELECT prior FROM submissions WHERE key = ? AND attempt = ?", (key, attempt))
            .fetchone()
        )
        if row is None:
            return
        statements: list[tuple[str, Sequence[Any]]] = [
            ("DELETE FROM submissions WHERE key = ? AND attempt = ?", (key, attempt))
        ]
        if row[0] is None:
            statements.append(("DELETE FROM jobs WHERE key = ?", (key,)))
        else:
            prior: dict[str, Any] = json.loads(row[0])
            columns = [name for name in prior if name != "key"]
            assignments = ", ".join(f"{name} = ?" for name in columns)
            values = [prior[name] for name in columns]
            statements.append((f"UPDATE jobs SET {assignments} WHERE key = ?", [*values, key]))
        self._write(statements)

    async def refused(self, key: str, attempt: int, error: Mapping[str, str | None]) -> None:
        """The service refused the submission outright (a 400/403): the job failed, unpaid."""
        await self._call(self._refused, key, attempt, json.dumps(dict(error)))

    def _refused(self, key: str, attempt: int, error: str) -> None:
        self._write(
            [
                ("DELETE FROM submissions WHERE key = ? AND attempt = ?", (key, attempt)),
                (
                    "UPDATE jobs SET state = 'failed', task_id = NULL, trace_id = NULL, "
                    "error = ?, retryable = 0, updated_at = ? WHERE key = ?",
                    (error, time.time(), key),
                ),
            ]
        )

    async def unknown(self, key: str, error: Mapping[str, str | None]) -> None:
        """The submission may have created a task, but no id came back: note why."""
        await self._call(self._unknown, key, json.dumps(dict(error)))

    def _unknown(self, key: str, error: str) -> None:
        self._write(
            [("UPDATE jobs SET error = ?, updated_at = ? WHERE key = ?", (error, time.time(), key))]
        )

    async def submitted(self, key: str, attempt: int, task_id: str, trace_id: str | None) -> None:
        """Record the task id the service answered for ``attempt``."""
        await self._call(self._submitted, key, attempt, task_id, trace_id)

    def _submitted(self, key: str, attempt: int, task_id: str, trace_id: str | None) -> None:
        now = time.time()
        self._write(
            [
                (
                    "UPDATE submissions SET task_id = ?, trace_id = ?, answered_at = ? "
                    "WHERE key = ? AND attempt = ?",
                    (task_id, trace_id, now, key, attempt),
                ),
                (
                    "UPDATE jobs SET state = 'pending', task_id = ?, trace_id = ?, error = NULL, "
                    "updated_at = ? WHERE key = ?",
                    (task_id, trace_id, now, key),
                ),
            ]
        )

    async def finished(
        self,
        key: str,
        *,
        succeeded: bool,
        trace_id: str | None,
        image_urls: Sequence[str],
        error: Mapping[str, str | None] | None,
        retryable: bool,
    ) -> None:
        """Record how the job's current task finished."""
        await self._call(
            self._finished,
            key,
            "succeeded" if succeeded else "failed",
            trace_id,
            json.dumps(list(image_urls)),
            json.dumps(dict(error)) if error is not None else None,
            retryable,
        )

    def _finished(
        self,
        key: str,
        state: str,
        trace_id: str | None,
        image_urls: str,
        error: str | None,
        retryable: bool,
    ) -> None:
        self._write(
            [
                (
                    "UPDATE jobs SET state = ?, trace_id = COALESCE(?, trace_id), "
                    "image_urls = ?, files = '[]', error = ?, retryable = ?, updated_at = ? "
                    "WHERE key = ?",
                    (state, trace_id, image_urls, error, int(retryable), time.time(), key),
                )
            ]
        )

    async def saved(
        self, key: str, files: Sequence[str], error: Mapping[str, str | None] | None
    ) -> None:
        """Record the images saved for a succeeded job, or why saving them failed."""
        state = "succeeded" if error is None else "download_failed"
        await self._call(
            self._saved,
            key,
            state,
            json.dumps(list(files)),
            json.dumps(dict(error)) if error is not None else None,
        )

    def _saved(self, key: str, state: str, files: str, error: str | None) -> None:
        self._write(
            [
                (
                    "UPDATE jobs SET state = ?, files = ?, error = ?, updated_at = ? WHERE key = ?",
                    (state, files, error, time.time(), key),
                )
            ]
        )

    # --- files beside the journal ------------------------------------------------------------

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run other file I/O (the manifest) in the journal's thread, in order with it."""
        return await self._call(fn, *args)
