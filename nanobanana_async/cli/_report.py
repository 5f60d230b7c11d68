"""What the commands report about each task, and its one stable JSON shape."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import attrs

from .._models import ErrorDetail, Task

__all__ = ["NOT_FOUND", "PENDING", "TaskReport", "document"]

NOT_FOUND: Final = "not_found"
PENDING: Final = "pending"
#: The error code of a report whose images could not all be saved before a deadline.


@attrs.frozen
class TaskReport:
    """One task as the command line shows it: state, images or error, saved files.

    ``error`` is the task's own failure for a failed task; on a task that succeeded
    or is pending it says what went wrong on our side (a download, a read).
    """

    id: str
    state: str
    prompt: str | None = None
    image_urls: list[str] = attrs.field(factory=list)
    error: ErrorDetail | None = None
    files: list[Path] = attrs.field(factory=list)
    elapsed: float | None = None

    @classmethod
    def of(
        cls, task: Task, files: list[Path] | None = None, *, prompt: str | None = None
    ) -> TaskReport:
        """The report for a record the service answered."""
        request_prompt = (task.request or {}).get("prompt")
        return cls(
            id=task.id,
            state=task.state.value,
            prompt=request_prompt if isinstance(request_prompt, str) else prompt,
            image_urls=task.image_urls,
            error=task.failure,
            files=files or [],
            elapsed=task.elapsed,
        )

    @classmethod
    def pending(cls, task_id: str, *, prompt: str | None = None) -> TaskReport:
        """A task not finished (or not read) when the command stopped."""
        return cls(id=task_id, state=PENDING, prompt=prompt)

    @classmethod
    def not_found(cls, task_id: str) -> TaskReport:
        """A task id the service does not know."""
        detail = ErrorDetail(code=NOT_FOUND, message="the service does not know this task id")
        return cls(id=task_id, state=NOT_FOUND, error=detail)

    def with_problem(self, code: str, message: str, files: list[Path] | None = None) -> TaskReport:
        """This report with what went wrong on our side (and the files saved anyway)."""
        return attrs.evolve(
            self,
            error=ErrorDetail(code=code, message=message),
            files=self.files if files is None else files,
        )

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    @property
    def problem(self) -> bool:
        """Whether something went wrong on our side: an unknown id, a download, a read."""
        return self.state == NOT_FOUND or (self.error is not None and not self.failed)

    @property
    def error_text(self) -> str:
        """``code: message`` of the error, or empty."""
        if self.error is None:
            return ""
        parts = [part for part in (self.error.code, self.error.message) if part]
        return ": ".join(parts)

    def to_json(self) -> dict[str, Any]:
        error = None
        if self.error is not None:
            error = {"code": self.error.code, "message": self.error.message}
        return {
            "id": self.id,
            "state": self.state,
            "prompt": self.prompt,
            "image_urls": list(self.image_urls),
            "error": error,
            "files": [str(path) for path in self.files],
            "elapsed": self.elapsed,
        }


def document(reports: list[TaskReport]) -> dict[str, Any]:
    """The ``--json`` document; documented in the package docstring."""
    return {"tasks": [report.to_json() for report in reports]}
