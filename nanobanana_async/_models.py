"""Records the service answers with, as frozen attrs classes.

The classes know nothing of JSON: ``_converter`` turns wire dicts into them. Every
field but a task's ``id`` is optional, because the service adds and omits fields
freely; what a record *means* (its ``state``) is derived, never stored.
"""

from __future__ import annotations

import enum
from typing import Any

from attrs import field, frozen

__all__ = [
    "ErrorDetail",
    "ImageResult",
    "Submission",
    "Task",
    "TaskBatch",
    "TaskResponse",
    "TaskState",
]


class TaskState(enum.Enum):
    """Where a task stands; the wire has no such field, see [`Task.state`][]."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@frozen
class ErrorDetail:
    """Why something failed: the service's error ``code`` and human ``message``."""

    code: str | None = None
    message: str | None = None


@frozen
class ImageResult:
    """One generated image."""

    image_url: str | None = None
    prompt: str | None = None


@frozen
class Submission:
    """The acknowledgment of a ``generate``/``edit``: the task id to wait on.

    ``callback_url`` is not on the wire: the client records it so a wait knows the
    task will also be announced by a callback and can poll it lazily.
    """

    task_id: str
    trace_id: str | None = None
    callback_url: str | None = field(default=None, repr=False)


@frozen
class TaskResponse:
    """The ``response`` part of a task record: the acknowledgment, later the result."""

    success: bool | None = None
    task_id: str | None = None
    trace_id: str | None = None
    data: list[ImageResult] = field(factory=list)
    error: ErrorDetail | None = None


@frozen
class Task:
    """A task record as ``retrieve`` answers it.

    The service has no status field; [`state`][] applies the rule from the protocol
    notes: failed if the response or the record carries a failure, or the record is
    finished without any image; succeeded with at least one image URL; pending
    otherwise (including an acknowledgment ``{"success": true}`` with no data).
    """

    id: str
    created_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    elapsed: float | None = None
    trace_id: str | None = None
    type: str | None = None
    request: dict[str, Any] | None = field(default=None, repr=False)
    response: TaskResponse | None = None
    error: ErrorDetail | None = None
    # Not kept: the account bookkeeping ids every record carries (``_id``, ``api_id``,
    # ``application_id``, ``credential_id``, ``user_id``). Thousands of watched records
    # would hold copies of them, and nothing here needs them.

    @property
    def image_urls(self) -> list[str]:
        """The URLs of the images produced so far (empty while pending or failed)."""
        response = self.response
        if response is None:
            return []
        return [item.image_url for item in response.data if item.image_url]

    @property
    def state(self) -> TaskState:
        """PENDING, SUCCEEDED or FAILED, decided from the record's content."""
        response = self.response
        if self.error is not None or (response is not None and response.success is False):
            return TaskState.FAILED
        if response is not None and response.success:
            for item in response.data:  # (a loop, not image_urls: no list is built)
                if item.image_url:
                    return TaskState.SUCCEEDED
        if self.finished_at is not None:
            return TaskState.FAILED  # finished with no image at all
        return TaskState.PENDING

    @property
    def done(self) -> bool:
        """True once the task succeeded or failed."""
        return self.state is not TaskState.PENDING

    @property
    def failure(self) -> ErrorDetail | None:
        """The reason when the task failed, else None."""
        if self.state is not TaskState.FAILED:
            return None
        if self.response is not None and self.response.error is not None:
            return self.response.error
        if self.error is not None:
            return self.error
        return ErrorDetail(code="no_images", message="the task finished without any image")


@frozen
class TaskBatch:
    """The answer to ``retrieve_batch``: the records the service knows, and their count."""

    items: list[Task] = field(factory=list)
    count: int = 0
