"""The records of a batch: jobs, their results, the summary, and what a changed job is.

Frozen attrs classes, public through :mod:`nanobanana_async.batch`.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from . import _protocol
from ._models import ErrorDetail

__all__ = [
    "BatchChangedError",
    "BatchJob",
    "BatchResult",
    "BatchSummary",
    "JobChange",
    "JobState",
    "spec_text",
]


class JobState(enum.Enum):
    """Where a job stands."""

    #: The task succeeded and its images are saved (when an ``out`` folder is given).
    SUCCEEDED = "succeeded"
    #: The task failed (after any retries), or the service refused the submission.
    FAILED = "failed"
    #: The task succeeded but saving an image failed; running again retries the saving.
    DOWNLOAD_FAILED = "download_failed"
    #: Not finished: not submitted yet, or its task still running when the run stopped.
    PENDING = "pending"
    #: Submitted, but no task id came back (a crash or an error mid-request): a task
    #: may exist and be paid for. Not submitted again unless asked to.
    OUTCOME_UNKNOWN = "outcome_unknown"


def _key(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a job key must be a non-empty string, got {value!r}")
    return value


def _urls(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ValueError("image_urls must be a list of URLs, not a single string")
    return tuple(value)


def _digest(url: str) -> str:
    """A ``data:`` URL shortened to its media type and SHA-256, for journals and manifests."""
    if not url.startswith("data:"):
        return url
    head = url.split(",", 1)[0].split(";", 1)[0]
    return f"{head};sha256,{hashlib.sha256(url.encode()).hexdigest()}"


@attrs.frozen
class BatchJob:
    """One image job: a prompt and its submission options, known by a stable ``key``.

    A job with ``image_urls`` (http(s) or ``data:`` URLs) is an ``edit`` of those
    images, else a ``generate``. The key names the job in the journal from run to run
    (a line number, an id of yours) and, by default, its image files.
    """

    key: str = attrs.field(converter=_key)
    prompt: str
    image_urls: tuple[str, ...] = attrs.field(default=(), converter=_urls)
    model: str | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    count: int | None = None

    @property
    def action(self) -> Literal["generate", "edit"]:
        """``"edit"`` when the job has images to edit, else ``"generate"``."""
        return "edit" if self.image_urls else "generate"

    @property
    def options(self) -> dict[str, Any]:
        """The submission options that are set (model, aspect_ratio, resolution, count)."""
        values = {
            "model": self.model,
            "aspect_ratio": self.aspect_ratio,
            "resolution": self.resolution,
            "count": self.count,
        }
        return {name: value for name, value in values.items() if value is not None}

    def check(self) -> None:
        """Raise ValueError, naming the job, if the service could not take it."""
        try:
            _protocol.build_submission(
                self.action,
                self.prompt,
                image_urls=self.image_urls or None,
                **self.options,
            )
        except ValueError as exc:
            raise ValueError(f"job {self.key!r}: {exc}") from None

    def describe(self) -> dict[str, Any]:
        """What the job asks for, as JSON (``data:`` images by digest): the journal
        compares it from run to run, and the manifest shows it."""
        spec: dict[str, Any] = {"action": self.action, "prompt": self.prompt}
        spec["options"] = self.options
        if self.image_urls:
            spec["source_images"] = [_digest(url) for url in self.image_urls]
        return spec


def spec_text(job: BatchJob) -> str:
    """The job's description as canonical JSON: what the journal compares run to run."""
    return json.dumps(job.describe(), sort_keys=True, ensure_ascii=False)


@attrs.frozen
class BatchResult:
    """A job's outcome: its state, task, images and files, or why it failed."""

    job: BatchJob
    state: JobState
    #: The latest submission's task id (None if never submitted, refused, or unknown).
    task_id: str | None = None
    trace_id: str | None = None
    image_urls: tuple[str, ...] = ()
    #: The saved images, in the order of ``image_urls`` (all of them when SUCCEEDED).
    files: tuple[Path, ...] = ()
    error: ErrorDetail | None = None
    #: Submissions made for this job over all runs (each possibly paid).
    attempts: int = 0
    #: Every task id the service gave for this job, oldest first (retries add some).
    task_ids: tuple[str, ...] = ()

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        """The job's manifest line; files relative to ``relative_to`` when inside it."""
        error = None
        if self.error is not None:
            error = {"code": self.error.code, "message": self.error.message}
        return {
            "key": self.job.key,
            **self.job.describe(),
            "state": self.state.value,
            "task_id": self.task_id,
            "trace_id": self.trace_id,
            "task_ids": list(self.task_ids),
            "attempts": self.attempts,
            "image_urls": list(self.image_urls),
            "files": [_shown(path, relative_to) for path in self.files],
            "error": error,
        }


def _shown(path: Path, base: Path | None) -> str:
    if base is not None:
        with contextlib.suppress(ValueError):
            return str(path.relative_to(base))
    return str(path)


@attrs.frozen
class BatchSummary:
    """The accounting of a batch.

    The states (``succeeded`` ... ``pending``) count every job of the batch by where it
    stands, over all runs; they add up to ``total``. The other counts are this run's
    work: ``skipped`` jobs were finished by an earlier run, ``resumed`` ones were
    submitted earlier and picked up here, ``submitted`` counts this run's submissions
    (each possibly paid), of which ``retried`` were new tries of failed tasks and
    ``resubmitted`` new tries of jobs whose outcome was unknown.
    """

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    download_failed: int = 0
    outcome_unknown: int = 0
    pending: int = 0
    skipped: int = 0
    resumed: int = 0
    submitted: int = 0
    retried: int = 0
    resubmitted: int = 0

    @property
    def complete(self) -> bool:
        """True when every job succeeded."""
        return self.succeeded == self.total

    def to_json(self) -> dict[str, int]:
        return attrs.asdict(self)


@attrs.frozen
class JobChange:
    """A job whose key the journal knows with another prompt or other options, or
    that the journal holds and the input no longer has (``after`` is None)."""

    key: str
    #: What the journal recorded (``BatchJob.describe()`` of that time), and what is
    #: asked now (None: the job is missing from the input).
    before: Mapping[str, Any]
    after: Mapping[str, Any] | None
    #: The journaled job's latest task id, if it has one (paid work to keep track of).
    task_id: str | None = None


class BatchChangedError(ValueError):
    """Jobs of the journal changed since they were submitted (e.g. an edited prompts file).

    Nothing was submitted. Running them under the same keys would mix two batches, and
    a job left out would drop its task (maybe paid for) from the manifest; use another
    journal, or restore the jobs. ``changes`` lists each one.
    """

    def __init__(self, journal: Path, changes: Sequence[JobChange]) -> None:
        self.journal = journal
        self.changes = list(changes)
        first = self.changes[0]
        more = f" (and {len(self.changes) - 1} more)" if len(self.changes) > 1 else ""
        now = "missing" if first.after is None else repr(first.after.get("prompt"))
        super().__init__(
            f"{len(self.changes)} job(s) changed since {journal} recorded them; "
            f"job {first.key!r} was {first.before.get('prompt')!r}, now {now}{more}"
        )
