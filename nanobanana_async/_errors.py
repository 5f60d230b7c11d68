"""The exceptions this library raises, all under one root.

::

    NanoBananaError
    ├── APIError                      the service answered with an error status,
    │   │                             or a 2xx body saying ``success: false``
    │   ├── BadRequestError           400, 413
    │   ├── AuthenticationError       401
    │   ├── PermissionDeniedError     403 (``used_up``: no balance; ``forbidden``: content refused)
    │   ├── NotFoundError             404 (``no_api``: usually a wrong base URL)
    │   ├── RateLimitError            429, with ``retry_after``
    │   └── ServerError               5xx, including a proxy's HTML error page
    ├── APIConnectionError            the request failed on the network, after retries
    │   └── APITimeoutError           no answer within the per-request timeout (also a TimeoutError)
    ├── ResponseDecodeError           a 2xx body that is not JSON or not the documented shape,
    │                                 the record of another task, or any body too large
    ├── TaskNotFoundError             the service does not know the task id
    ├── TaskFailedError               the task finished without images (``await_completion``)
    ├── TaskTimeoutError              a wait's own deadline passed (also a TimeoutError)
    ├── DownloadError                 an image could not be saved (``url``, ``status``,
    │                                 ``incomplete``)
    └── ClientClosedError             the client was closed (before or during the call)

Where each answer is judged
    ``_transport.post`` turns network failures into [`APIConnectionError`][] and
    refuses a body past ``max_response_bytes`` ([`ResponseDecodeError`][]). Then one
    I/O-free ``_protocol.parse_*`` function per answer kind judges status and body
    together (``_protocol.decipher``): every [`APIError`][], whether it came as a
    status or in a 200 body, every [`ResponseDecodeError`][] and
    [`TaskNotFoundError`][]. Both run inside each retried attempt, so ``_retry``'s
    predicates see every error the same way. The poll loop (``_poller``) adds
    [`TaskTimeoutError`][], [`TaskNotFoundError`][] after its grace, and
    [`ClientClosedError`][]; ``await_completion`` adds [`TaskFailedError`][];
    ``_download`` raises [`DownloadError`][].

Bad arguments raise ``ValueError`` before any request is made. No exception's
``str`` or ``repr`` ever contains the API token: they are built only from status codes,
error codes, messages from the service and ids; and no aiohttp exception (whose
``request_info`` holds the request's headers) is chained to them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._models import Task

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "ClientClosedError",
    "DownloadError",
    "NanoBananaError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "ResponseDecodeError",
    "ServerError",
    "TaskFailedError",
    "TaskNotFoundError",
    "TaskTimeoutError",
]


class NanoBananaError(Exception):
    """Root of every error this library raises on purpose."""


class APIError(NanoBananaError):
    """The service answered with an error status (or a 2xx body saying ``success: false``).

    ``task_id`` is the task id the error answer named, if it named one; for a submission,
    such a task may exist and be paid for (the error's note says so, with the id).
    """

    task_id: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.trace_id = trace_id
        super().__init__(self._describe())

    def _describe(self) -> str:
        head = f"HTTP {self.status}"
        if self.code:
            head += f" {self.code}"
        text = f"{head}: {self.message}"
        if self.trace_id:
            text += f" (trace_id={self.trace_id})"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(status={self.status!r}, code={self.code!r}, "
            f"message={self.message!r}, trace_id={self.trace_id!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only constructor arguments need help to survive pickling (multiprocessing).
        return (
            _rebuild_api_error,
            (type(self), self.message, self.status, self.code, self.trace_id),
        )


def _rebuild_api_error(
    cls: type[APIError], message: str, status: int, code: str | None, trace_id: str | None
) -> APIError:
    return cls(message, status=status, code=code, trace_id=trace_id)


class BadRequestError(APIError):
    """400 or 413: the request was refused as malformed, too large, or for a bad model."""


class AuthenticationError(APIError):
    """401: the token is missing, wrong or expired."""


class PermissionDeniedError(APIError):
    """403: the balance is used up (``used_up``) or the content was refused (``forbidden``)."""


class NotFoundError(APIError):
    """404: no such API, usually a wrong base URL."""


class RateLimitError(APIError):
    """429: too many requests; ``retry_after`` holds the service's hint in seconds, if any."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 429,
        code: str | None = None,
        trace_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status=status, code=code, trace_id=trace_id)

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_rate_limit_error,
            (self.message, self.status, self.code, self.trace_id, self.retry_after),
        )


def _rebuild_rate_limit_error(
    message: str, status: int, code: str | None, trace_id: str | None, retry_after: float | None
) -> RateLimitError:
    return RateLimitError(
        message, status=status, code=code, trace_id=trace_id, retry_after=retry_after
    )


class ServerError(APIError):
    """5xx from the service or from a proxy in front of it."""


class APIConnectionError(NanoBananaError):
    """The request could not be completed on the network (after any retries).

    ``request_sent`` is False only when the connection was never established, so the
    service cannot have seen the request; a paid submission is retried only then.
    """

    def __init__(self, message: str, *, request_sent: bool = True) -> None:
        self.request_sent = request_sent
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_connection_error, (type(self), str(self), self.request_sent))


def _rebuild_connection_error(
    cls: type[APIConnectionError], message: str, request_sent: bool
) -> APIConnectionError:
    return cls(message, request_sent=request_sent)


class APITimeoutError(APIConnectionError, TimeoutError):
    """The service did not answer within the per-request timeout."""


class ResponseDecodeError(NanoBananaError):
    """A body that is not JSON, not the shape the protocol documents, or too large.

    ``body_excerpt`` holds at most the first 200 characters of the body, for diagnosis.
    """

    def __init__(self, message: str, *, status: int, body_excerpt: str = "") -> None:
        self.status = status
        self.body_excerpt = body_excerpt[:200]
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_decode_error, (str(self), self.status, self.body_excerpt))


def _rebuild_decode_error(message: str, status: int, body_excerpt: str) -> ResponseDecodeError:
    return ResponseDecodeError(message, status=status, body_excerpt=body_excerpt)


class TaskNotFoundError(NanoBananaError):
    """The service does not know this task id (``retrieve`` answered ``{}``)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id!r} not found")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.task_id,))


class TaskFailedError(NanoBananaError):
    """The task finished but produced no image; ``task`` is its final record."""

    def __init__(self, task: Task) -> None:
        self.task = task
        failure = task.failure
        self.code = failure.code if failure is not None else None
        self.message = failure.message if failure is not None and failure.message else "task failed"
        self.trace_id = task.trace_id
        text = f"task {task.id!r} failed"
        if self.code:
            text += f" ({self.code})"
        text += f": {self.message}"
        super().__init__(text)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.task,))


class TaskTimeoutError(NanoBananaError, TimeoutError):
    """A wait's deadline passed; the task goes on running on the service.

    ``last`` is the last record seen for the task, or None if none was seen yet.
    """

    def __init__(self, task_id: str, last: Task | None = None, *, timeout: float | None = None):
        self.task_id = task_id
        self.last = last
        self.timeout = timeout
        after = f" after {timeout:g} s" if timeout is not None else ""
        super().__init__(
            f"task {task_id!r} still pending{after}; it keeps running on the service, "
            "wait on its id again to pick it up"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_task_timeout, (self.task_id, self.last, self.timeout))


def _rebuild_task_timeout(
    task_id: str, last: Task | None, timeout: float | None
) -> TaskTimeoutError:
    return TaskTimeoutError(task_id, last, timeout=timeout)


class ClientClosedError(NanoBananaError):
    """The client was closed before the call, or while it (or a wait) was in progress.

    ``request_sent`` is True when the close came while the call was under way: its
    request may have gone out (a submission may have created a task); False when the
    client was already closed and nothing was sent.
    """

    def __init__(self, message: str, *, request_sent: bool = False) -> None:
        self.request_sent = request_sent
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_closed, (str(self), self.request_sent))


def _rebuild_closed(message: str, request_sent: bool) -> ClientClosedError:
    return ClientClosedError(message, request_sent=request_sent)


class DownloadError(NanoBananaError):
    """An image could not be downloaded: an error status, a non-image answer, a cut body.

    ``status`` is the HTTP status when there was an answer, else None; ``incomplete`` is
    True when the answer's body was cut short (another attempt may succeed). ``url`` is
    the URL asked for, in full; the message never shows its query. Nothing is left at
    the destination when this is raised.
    """

    def __init__(
        self, message: str, *, url: str, status: int | None = None, incomplete: bool = False
    ) -> None:
        self.url = url
        self.status = status
        self.incomplete = incomplete
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_download_error, (str(self), self.url, self.status, self.incomplete))


def _rebuild_download_error(
    message: str, url: str, status: int | None, incomplete: bool
) -> DownloadError:
    return DownloadError(message, url=url, status=status, incomplete=incomplete)
