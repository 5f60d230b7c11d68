"""The Nano Banana wire protocol, with no I/O: build request bodies, read answers.

Everything here is a pure function of its arguments, so it is unit-tested on recorded
samples without a server. ``_client`` sends what ``build_*`` returns; one ``parse_*``
function per answer kind then takes the answer's status, headers and body and returns
the record or raises the matching error from ``_errors``. Each judges status and body
together in one pass (:func:`decipher`), inside the retried attempt, the way
gidgethub's ``sansio.decipher_response`` does. This module is where HTTP statuses and
error codes are mapped to exceptions, and where hostile bytes stop: whatever the body,
only our errors come out.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import reprlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, Literal, TypeVar

import attrs

from ._converter import DecodeFailure, structure
from ._errors import (
    APIError,
    AuthenticationError,
    BadRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
    TaskNotFoundError,
)
from ._models import Submission, Task, TaskBatch, TaskResponse

__all__ = [
    "IMAGES_PATH",
    "TASKS_PATH",
    "RawResponse",
    "batch_items",
    "build_retrieve",
    "build_retrieve_batch",
    "build_submission",
    "check_task_id",
    "check_task_ids",
    "decipher",
    "error_for",
    "parse_retry_after",
    "parse_submission",
    "parse_task",
    "parse_task_batch",
    "read_item",
    "task_from_callback",
    "trace_id_of",
    "unchanged",
]

IMAGES_PATH: Final = "/nano-banana/images"
TASKS_PATH: Final = "/nano-banana/tasks"

ASPECT_RATIOS: Final = frozenset({"1:1", "3:2", "2:3", "16:9", "9:16", "4:3", "3:4"})
RESOLUTIONS: Final = frozenset({"1K", "2K", "4K"})

T = TypeVar("T")


@attrs.frozen
class RawResponse:
    """What the transport read: status, headers, and the whole body as bytes."""

    status: int
    headers: Mapping[str, str]
    body: bytes


# --- requests ---------------------------------------------------------------------


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def check_task_id(task_id: object) -> str:
    """Return ``task_id`` if it is a non-empty string, else raise ValueError."""
    return _check_text("task_id", task_id)


def check_task_ids(task_ids: Iterable[str]) -> list[str]:
    """Validate ids and drop repeats, keeping the first-seen order."""
    if isinstance(task_ids, str):
        raise ValueError("task_ids must be a list of ids, not a single string")
    ids = list(dict.fromkeys(check_task_id(task_id) for task_id in task_ids))
    if not ids:
        raise ValueError("task_ids must not be empty")
    return ids


def build_submission(
    action: Literal["generate", "edit"],
    prompt: str,
    *,
    image_urls: Sequence[str] | None = None,
    model: str | None = None,
    aspect_ratio: str | None = None,
    resolution: str | None = None,
    count: int | None = None,
    callback_url: str | None = None,
) -> dict[str, Any]:
    """The body of a ``generate`` or ``edit`` request.

    Always asks for ``async`` handling, so no request is held open while the image is
    made; sends only the options the caller set (for ``edit``, an absent
    ``aspect_ratio`` means "like the first image").
    """
    body: dict[str, Any] = {"action": action, "prompt": _check_text("prompt", prompt)}
    if action == "edit":
        if image_urls is None or isinstance(image_urls, str) or not list(image_urls):
            raise ValueError("image_urls must be a non-empty list of URLs for edit")
        body["image_urls"] = [_check_text("image_urls[]", url) for url in image_urls]
    elif image_urls is not None:
        raise ValueError("image_urls is only for edit")
    if model is not None:
        # The model list grows: unknown names pass through, the service judges them.
        body["model"] = _check_text("model", model)
    if aspect_ratio is not None:
        if aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(
                f"aspect_ratio must be one of {sorted(ASPECT_RATIOS)}, got {aspect_ratio!r}"
            )
        body["aspect_ratio"] = aspect_ratio
    if resolution is not None:
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {sorted(RESOLUTIONS)}, got {resolution!r}")
        body["resolution"] = resolution
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 4:
            raise ValueError(f"count must be an integer from 1 to 4, got {count!r}")
        body["count"] = count
    if callback_url is not None:
        if not isinstance(callback_url, str) or not re.match(r"https?://", callback_url):
            # Not echoed: a callback URL may carry a secret.
            raise ValueError("callback_url must be an http(s) URL")
        body["callback_url"] = callback_url
    body["async"] = True
    return body


def build_retrieve(task_id: str) -> dict[str, Any]:
    """The body that reads one task record."""
    return {"action": "retrieve", "id": check_task_id(task_id)}


def build_retrieve_batch(task_ids: Sequence[str]) -> dict[str, Any]:
    """The body that reads many task records at once (ids already checked)."""
    return {"action": "retrieve_batch", "ids": list(task_ids)}


# --- responses ----------------------------------------------------------------------

_ERROR_CLASSES: Final[dict[int, type[APIError]]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    413: BadRequestError,
    429: RateLimitError,
}

# For a 2xx body that says ``success: false``: choose the class by the error code.
_CODE_STATUS: Final[dict[str, int]] = {
    "bad_request": 400,
    "api_not_implemented": 400,
    "disabled": 400,
    "no_token": 400,
    "request_too_large": 413,
    "invalid_token": 401,
    "token_expired": 401,
    "token_mismatched": 401,
    "used_up": 403,
    "forbidden": 403,
    "no_api": 404,
    "too_many_requests": 429,
    "api_error": 500,
}

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_NOT_JSON: Final = object()  # a body that did not parse


def _excerpt(body: bytes, limit: int = 200) -> str:
    return body[: limit * 4].decode("utf-8", "replace")[:limit]


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or HTTP-date).

    A hint in the past, zero or negative reads as 0.0; an unreadable or non-finite one as
    None. Not capped here: :meth:`RetryPolicy.wait` caps hints, in one place.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def _error_fields(payload: Any) -> tuple[str | None, str | None, str | None]:
    """(code, message, trace_id) from a JSON error body, tolerating its variants."""
    if not isinstance(payload, dict):
        return None, None, None
    error = payload.get("error")
    trace_id = payload.get("trace_id")
    trace_id = trace_id if isinstance(trace_id, str) else None
    if isinstance(error, str):
        return None, error, trace_id
    if isinstance(error, dict):
        code, message = error.get("code"), error.get("message")
        return (
            code if isinstance(code, str) else None,
            message if isinstance(message, str) else None,
            trace_id,
        )
    message = payload.get("message") or payload.get("detail")
    return None, message if isinstance(message, str) else None, trace_id


def _html_message(body: bytes) -> str:
    """A readable line from a proxy's HTML error page: its title, else its text."""
    text = body[:4000].decode("utf-8", "replace")
    title = re.search(r"<title[^>]*>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    raw = title.group(1) if title else _TAG.sub(" ", text)
    return _SPACE.sub(" ", raw).strip()[:200]


def _load_json(body: bytes) -> Any:
    """The parsed body, or ``_NOT_JSON``; never raises, whatever the bytes."""
    if not body:
        return _NOT_JSON
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: hostile nesting ("[" * 10**5)
        return _NOT_JSON


def _is_error_body(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("success") is False and "error" in payload


def _error_in(response: RawResponse, payload: Any) -> APIError | None:
    """The error an answer stands for, judged from its status and parsed body together."""
    status = response.status
    success_status = 200 <= status < 300
    # A 2xx is an error only when its body says so; its error code then picks the class,
    # so an error is the same error whether it came as a status or in a 200 body.
    if success_status and not _is_error_body(payload):
        return None
    code, message, trace_id = _error_fields(payload)
    if success_status:
        status = _CODE_STATUS.get(code or "", 500)
    if message is None:
        if payload is _NOT_JSON and response.body:
            message = _html_message(response.body) or f"HTTP {status}"
        else:
            message = f"HTTP {status} with no error message"
    cls = _ERROR_CLASSES.get(status, ServerError if status >= 500 else APIError)
    if cls is RateLimitError:
        error: APIError = RateLimitError(
            message,
            status=status,
            code=code,
            trace_id=trace_id,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )
    else:
        error = cls(message, status=status, code=code, trace_id=trace_id)
    if isinstance(payload, dict):
        # An error answer that still names a task (a submission's 500 or 429): kept, so
        # the id reaches the user and the submission is not sent again.
        error.task_id = _wire_id(payload.get("task_id"))
    return error


def error_for(response: RawResponse) -> APIError | None:
    """The error an answer stands for, or None if it is a success."""
    return _error_in(response, _load_json(response.body))


def decipher(response: RawResponse) -> dict[str, Any]:
    """Judge an answer's status and body in one pass: a success's JSON object, or raise.

    Raises the :class:`APIError` an error status or a 2xx ``success: false`` body stands
    for, and :class:`ResponseDecodeError` for a 2xx body that is not a JSON object. The
    body is parsed once. Runs inside each retried attempt, so an error is retried (or
    not) the same way whether it came as a status or in a 200 body.
    """
    payload = _load_json(response.body)
    error = _error_in(response, payload)
    if error is not None:
        raise error
    if payload is _NOT_JSON:
        raise ResponseDecodeError(
            f"HTTP {response.status} answer is not JSON"
            + ("" if response.body else " (empty body)"),
            status=response.status,
            body_excerpt=_excerpt(response.body),
        )
    if not isinstance(payload, dict):
        raise ResponseDecodeError(
            f"expected a JSON object, got {type(payload).__name__}",
            status=response.status,
            body_excerpt=_excerpt(response.body),
        )
    return payload


def trace_id_of(response: RawResponse) -> str | None:
    """The ``trace_id`` an answer carries, for logs; None if it has none."""
    payload = _load_json(response.body)
    trace_id = payload.get("trace_id") if isinstance(payload, dict) else None
    return trace_id if isinstance(trace_id, str) else None


def _decode(payload: Any, cls: type[T], response: RawResponse, path: str = "$") -> T:
    try:
        return structure(payload, cls, path=path)
    except DecodeFailure as failure:
        raise ResponseDecodeError(
            f"unexpected {cls.__name__} shape: {failure}",
            status=response.status,
            body_excerpt=_excerpt(response.body),
        ) from None


def _wire_id(value: object) -> str | None:
    """A task id as the wire must carry it: a non-empty string, else None."""
    return value if isinstance(value, str) and value.strip() else None


def parse_submission(response: RawResponse, *, callback_url: str | None = None) -> Submission:
    """The task id from a ``generate``/``edit`` answer (or the error it stands for).

    The id is strict (a non-empty string): a possibly paid task id is never replaced
    by a stringified ``null`` or object.
    """
    try:
        payload = decipher(response)
    except APIError as exc:
        if exc.task_id is not None:
            exc.add_note(
                f"The answer named task {exc.task_id}: it may exist and be paid for; wait "
                "on that id before submitting again."
            )
        raise
    raw_id = payload.get("task_id")
    if _wire_id(raw_id) is None:
        # Whatever stands there goes in the message: if it is the task's id in another
        # form (a number, say), the user still gets it.
        shown = "" if raw_id is None else f" (it holds {reprlib.repr(raw_id)})"
        raise ResponseDecodeError(
            f"submission answer has no task_id string{shown}",
            status=response.status,
            body_excerpt=_excerpt(response.body),
        )
    submission = _decode(payload, Submission, response)
    return attrs.evolve(submission, callback_url=callback_url) if callback_url else submission


def _record(payload: Any, response: RawResponse, path: str) -> Task:
    """One task record, its id checked strictly; raises ResponseDecodeError."""
    if isinstance(payload, dict) and _wire_id(payload.get("id")) is None:
        raise ResponseDecodeError(
            f"task record without an id string @ {path}",
            status=response.status,
            body_excerpt=_excerpt(response.body),
        )
    return _decode(payload, Task, response, path)


def parse_task(response: RawResponse, task_id: str) -> Task:
    """One task record; an empty object means the service does not know the id.

    A record of another task than the one asked for is a decode error, not an answer.
    """
    payload = decipher(response)
    if not payload:
        raise TaskNotFoundError(task_id)
    task = _record(payload, response, "$")
    if task.id != task_id:
        raise ResponseDecodeError(
            f"asked for task {task_id!r}, the answer is the record of task {task.id!r}",
            status=response.status,
            body_excerpt=_excerpt(response.body),
        )
    return task


def _items(payload: dict[str, Any], response: RawResponse) -> list[Any]:
    items = payload.get("items")
    if items is None:
        return []
    if not isinstance(items, list):
        raise ResponseDecodeError(
            "retrieve_batch answer has no items list",
            status=response.status,
            body_excerpt=_excerpt(response.body),
        )
    return items


def parse_task_batch(response: RawResponse, task_ids: Iterable[str] | None = None) -> TaskBatch:
    """A ``retrieve_batch`` answer; any malformed record fails the whole answer.

    With ``task_ids``, records of tasks not asked for are dropped.
    """
    payload = decipher(response)
    asked = None if task_ids is None else set(task_ids)
    tasks = []
    for index, item in enumerate(_items(payload, response)):
        task = _record(item, response, f"$.items[{index}]")
        if asked is None or task.id in asked:
            tasks.append(task)
    return TaskBatch(items=tasks, count=len(tasks))


#: Callback bodies come from the internet: an id past this many characters is not one
#: the service made (its ids are 36-character UUIDs), and a finished task has at most 4
#: images. Bounds on what a forged body can make the receiver keep or work through.
MAX_CALLBACK_ID_LENGTH: Final = 256
MAX_CALLBACK_IMAGES: Final = 16


def task_from_callback(payload: Any, *, received_at: float, id_only: bool = False) -> Task:
    """A callback body (``{success, task_id, trace_id, data | error}``) as a finished record.

    The service sends a callback only once a task is done, so the record is marked
    finished: a callback with no image URL makes a failed task, never a pending one.
    With ``id_only`` (the body is only a hint to confirm with ``retrieve``) the rest
    of the body is not structured at all: the record holds the id alone. Raises
    ResponseDecodeError (``status`` 0: no HTTP answer) for a malformed body.
    """
    if isinstance(payload, bytes | str):
        parsed = _load_json(payload.encode() if isinstance(payload, str) else payload)
        if parsed is _NOT_JSON:
            raise ResponseDecodeError(
                "callback body is not JSON", status=0, body_excerpt=_text_excerpt(payload)
            )
        payload = parsed
    task_id = _wire_id(payload.get("task_id")) if isinstance(payload, dict) else None
    if task_id is None or len(task_id) > MAX_CALLBACK_ID_LENGTH:
        raise ResponseDecodeError(
            "callback body has no task_id string (of at most "
            f"{MAX_CALLBACK_ID_LENGTH} characters)",
            status=0,
            body_excerpt=_text_excerpt(payload),
        )
    # Cheap checks of the shape, in both modes: a body that is plainly not a callback
    # is refused (400) before any work, whatever it would cost to structure.
    data = payload.get("data")
    if data is not None and not isinstance(data, list):
        raise ResponseDecodeError(
            "callback body's data is not a list", status=0, body_excerpt=_text_excerpt(payload)
        )
    if data is not None and len(data) > MAX_CALLBACK_IMAGES:
        raise ResponseDecodeError(
            f"callback body lists {len(data)} images; a task has at most 4",
            status=0,
            body_excerpt=_text_excerpt(payload),
        )
    if id_only:
        return Task(id=task_id, finished_at=received_at)
    try:
        response = structure(payload, TaskResponse)
    except DecodeFailure as failure:
        raise ResponseDecodeError(
            f"unexpected callback shape: {failure}",
            status=0,
            body_excerpt=_text_excerpt(payload),
        ) from None
    assert response.task_id is not None  # checked above
    return Task(
        id=response.task_id,
        trace_id=response.trace_id,
        response=response,
        finished_at=received_at,
    )


def _text_excerpt(payload: object) -> str:
    if isinstance(payload, bytes):
        return _excerpt(payload)
    try:
        return (payload if isinstance(payload, str) else repr(payload))[:200]
    except RecursionError:
        return f"<a deeply nested {type(payload).__name__}>"


def batch_items(response: RawResponse) -> dict[str, Any]:
    """A ``retrieve_batch`` answer as raw records by task id, for the poll loop.

    The poll loop decodes each record with :func:`read_item` on its own, so one bad
    record fails only its own task. Items with no id string cannot belong to anyone
    and are dropped; a repeated id keeps its first record. A body that is not a batch
    at all raises.
    """
    records: dict[str, Any] = {}
    for item in _items(decipher(response), response):
        task_id = item.get("id") if type(item) is dict else None
        if type(task_id) is str and task_id not in records:
            records[task_id] = item
    return records


def read_item(raw: dict[str, Any], previous: Task | None, task_id: str, status: int = 200) -> Task:
    """The record of ``task_id`` from a batch item; ``previous`` itself if it still holds.

    Most answers a poll loop reads are pending records that did not change since the
    last poll: those are recognised without structuring them again. Otherwise the item
    is structured, and kept compact, since a poll loop holds one per watched task: it
    shares the waiter's id string and one trace id string, and a pending record leaves
    out ``request`` (the submission's own body, echoed; the finished record has it).
    Raises ResponseDecodeError for a malformed record.
    """
    if previous is not None and unchanged(raw, previous):
        return previous
    raw["id"] = task_id  # equal (the batch was keyed by it); the waiter's own string object
    response = raw.get("response")
    if type(response) is dict:
        if response.get("task_id") == task_id:
            response["task_id"] = task_id
        trace_id = raw.get("trace_id")
        if trace_id is not None and response.get("trace_id") == trace_id:
            response["trace_id"] = trace_id
    try:
        task = structure(raw, Task, path=f"$.items[id={task_id}]")
    except DecodeFailure as failure:
        raise ResponseDecodeError(
            f"unexpected record for task {task_id!r}: {failure}",
            status=status,
            body_excerpt=_text_excerpt(raw),
        ) from None
    if task.request is not None and not task.done:
        task = attrs.evolve(task, request=None)
    return task


# What appears in a record as a task makes progress, and in its response as it ends.
_PROGRESS: Final = frozenset({"started_at", "finished_at", "elapsed", "error"})
_RESULT: Final = frozenset({"data", "error"})


def unchanged(raw: dict[str, Any], task: Task) -> bool:
    """Whether ``raw`` is still the pending record ``task``: nothing that moves while a
    task runs has moved. Conservative: any doubt answers False, and it is structured.

    What moves is its progress: ``started_at``, ``finished_at``, ``elapsed``, an
    ``error``, and its ``response`` (the acknowledgment, later the result). Its identity
    (``id``, ``created_at``, ``trace_id``, ``type``, ``request``) is set at submission
    and does not change, so it is not compared: this runs for every record of every
    poll, and each object it reads is a cache miss when thousands are watched.
    """
    if not _PROGRESS.isdisjoint(raw) or (
        task.finished_at is not None
        or task.started_at is not None
        or task.elapsed is not None
        or task.error is not None
    ):
        return False  # (a progress key present even as null is taken as a change)
    response, kept = raw.get("response"), task.response
    if response is None or kept is None:
        return response is None and kept is None
    if type(response) is not dict or kept.data or kept.error is not None:
        return False
    return _RESULT.isdisjoint(response) and response.get("success") is kept.success
