"""Every retry rule of the library: which errors are retried, and how long to wait.

Retries happen only on an explicit predicate: reads (``retrieve``) are idempotent and
retry on rate limits, 5xx and network failures; paid submissions retry only when the
service cannot have taken them (a 429, or a connection that was never made). The poll
loop owns its retries (see ``_poller``) but takes its fatal set and its pauses from here.

Both the number of attempts and the total time are capped. A ``Retry-After`` hint may
lengthen a wait, never shorten it below the policy's own backoff, and it is capped in
one place: ``RetryPolicy.lengthened``. ``RetryPolicy.no_wait()`` makes tests fast and
deterministic.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, Final, ParamSpec, TypeVar

import attrs
import backoff

from ._errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    DownloadError,
    NanoBananaError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseDecodeError,
    ServerError,
)

__all__ = [
    "ACCOUNT_CODES",
    "NO_API",
    "POLL_FATAL",
    "REFUSED_CONTENT",
    "RetryPolicy",
    "is_account_error",
    "is_retryable_download",
    "is_retryable_read",
    "is_retryable_submission",
    "may_have_created_task",
    "retrying",
]

logger = logging.getLogger("nanobanana_async")

P = ParamSpec("P")
R = TypeVar("R")

_RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})

#: The classes of error that refuse the account rather than one request or task id (a bad
#: token, no balance, a wrong base URL): see :func:`is_account_error`.
POLL_FATAL = (AuthenticationError, PermissionDeniedError, NotFoundError)

#: 400 codes that refuse the token or the API itself, never one task id.
ACCOUNT_CODES: Final = frozenset(
    {"token_mismatched", "no_token", "disabled", "api_not_implemented"}
)
#: The 404 code for "no such API here": a wrong base URL, alike for every request.
NO_API: Final = "no_api"
#: The 403 code for one prompt's content (the content filter), not the account.
REFUSED_CONTENT: Final = "forbidden"


def is_account_error(exc: BaseException) -> bool:
    """Whether the service refused the account, not one request: no other request of the
    client can get past it (a bad token, no balance, a wrong base URL, a disabled API).

    Judged from the service's own error code: a proxy's HTML page with a 401/403/404 and
    no code is not enough on its own (the poll loop fails everyone only if it repeats).
    """
    if not isinstance(exc, APIError) or exc.code is None:
        return False
    if isinstance(exc, AuthenticationError):
        return True  # any code: a 401 is about the token
    if isinstance(exc, NotFoundError):
        # "no_api": no such API here (a wrong base URL). Another code on a 404 is not
        # documented, so it is not trusted to speak for the whole account.
        return exc.code == NO_API
    if isinstance(exc, PermissionDeniedError):
        return exc.code != REFUSED_CONTENT
    return isinstance(exc, BadRequestError) and exc.code in ACCOUNT_CODES


def _number(minimum: float, *, strict: bool = False, finite: bool = True) -> Any:
    """An attrs validator: a real number (never a bool), finite, >= (or >) ``minimum``."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            number = float(value)  # type: ignore[arg-type]
            ok = not math.isnan(number) and (not finite or math.isfinite(number))
            ok = ok and (number > minimum if strict else number >= minimum)
        if not ok:
            rule = f"{'>' if strict else '>='} {minimum:g}"
            raise ValueError(f"{attribute.name} must be a finite number {rule}, got {value!r}")

    return check


def _whole(minimum: int) -> Any:
    """An attrs validator: a real int (never a bool) >= ``minimum``."""

    def check(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{attribute.name} must be an integer >= {minimum}, got {value!r}")

    return check


@attrs.frozen
class RetryPolicy:
    """How a failed request is retried: exponential waits with jitter, capped.

    ``max_retries`` retries at most (so ``max_retries + 1`` attempts), never past
    ``max_time`` seconds in all. The wait before retry *n* is ``initial_wait * 2**(n-1)``
    capped at ``max_wait``; with ``jitter`` it is drawn from the upper half of that
    (so it never falls under [`min_wait`][]). A ``Retry-After`` hint can lengthen a
    wait up to ``max_retry_after`` seconds, never shorten it.
    """

    max_retries: int = attrs.field(default=3, validator=_whole(0))
    initial_wait: float = attrs.field(default=0.5, validator=_number(0))
    max_wait: float = attrs.field(default=8.0, validator=_number(0))
    max_time: float = attrs.field(default=90.0, validator=_number(0, strict=True, finite=False))
    max_retry_after: float = attrs.field(default=60.0, validator=_number(0))
    jitter: bool = True

    @classmethod
    def no_wait(cls, max_retries: int = 3) -> RetryPolicy:
        """Retry at once, without jitter or Retry-After pauses: for tests."""
        return cls(
            max_retries=max_retries,
            initial_wait=0.0,
            max_wait=0.0,
            max_retry_after=0.0,
            jitter=False,
        )

    def _base(self, retry: int) -> float:
        return min(self.initial_wait * 2.0 ** min(retry - 1, 64), self.max_wait)

    def min_wait(self, retry: int) -> float:
        """The least this policy waits before retry number ``retry`` (1 for the first)."""
        base = self._base(retry)
        return base / 2 if self.jitter else base

    def wait(self, retry: int, error: BaseException | None = None) -> float:
        """Seconds to wait before retry number ``retry`` after ``error``.

        The backoff, lengthened (never shortened) by a 429's ``Retry-After`` hint
        (see :meth:`lengthened`).
        """
        base = self._base(retry)
        return self.lengthened(random.uniform(base / 2, base) if self.jitter else base, error)

    def lengthened(self, delay: float, error: BaseException | None) -> float:
        """``delay``, lengthened (never shortened) by a 429's ``Retry-After`` hint capped
        at ``max_retry_after``: the one place hints are capped (the poll loop's pauses
        come here too)."""
        hint = error.retry_after if isinstance(error, RateLimitError) else None
        if hint is not None:
            return max(delay, min(hint, self.max_retry_after))
        return delay

    def waits(self) -> Generator[float, Any, None]:
        """backoff's wait generator: receives each error, yields the next wait.

        It stops (so backoff gives up with the last error) when the next wait would end
        past ``max_time``: a retry is never hurried to fit the time left.
        """
        deadline = time.monotonic() + self.max_time
        retry = 0
        error = yield 0.0  # backoff's generators start with a bare send(None)
        while True:
            retry += 1
            delay = self.wait(retry, error)
            if time.monotonic() + delay > deadline:
                return
            error = yield delay


def is_retryable_read(exc: Exception) -> bool:
    """An idempotent read may be retried after this error."""
    if isinstance(exc, RateLimitError | APIConnectionError):
        return True
    return isinstance(exc, ServerError) and exc.status in _RETRYABLE_STATUSES


def is_retryable_submission(exc: Exception) -> bool:
    """A paid submission may be retried only if the service cannot have taken it."""
    if isinstance(exc, RateLimitError):
        return exc.task_id is None  # a 429 that names a task made one: never again
    return isinstance(exc, APIConnectionError) and not exc.request_sent


def may_have_created_task(exc: NanoBananaError) -> bool:
    """Whether a submission that raised ``exc`` may still have created (and billed) a
    task: a 5xx, an unreadable answer, or a request cut off once it went out. A refusal
    status (400, 401, 403, 404, 429) says for certain that it did not."""
    if isinstance(exc, APIConnectionError | ClientClosedError):
        return exc.request_sent
    if isinstance(exc, APIError) and exc.task_id is not None:
        return True  # the answer named a task, whatever its status
    return isinstance(exc, ServerError | ResponseDecodeError)


# An image host's answers worth another GET: timeouts, rate limits, server errors.
_RETRYABLE_DOWNLOAD_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def is_retryable_download(exc: Exception) -> bool:
    """An image download may be retried after this error.

    A network failure or timeout, a transient status, or a body cut short. Refusals
    (not an image, too large, a redirect loop or a forbidden address) are final.
    """
    if isinstance(exc, DownloadError):
        return exc.incomplete or exc.status in _RETRYABLE_DOWNLOAD_STATUSES
    return isinstance(exc, APIConnectionError)


def _log_retry(details: Any) -> None:
    logger.debug(
        "retrying after %s (attempt %d failed, next in %.2f s)",
        details["exception"],
        details["tries"],
        details["wait"],
    )


def retrying(
    func: Callable[P, Awaitable[R]],
    policy: RetryPolicy,
    predicate: Callable[[Exception], bool],
) -> Callable[P, Awaitable[R]]:
    """Wrap ``func`` so errors that ``predicate`` accepts are retried under ``policy``."""
    wrapped: Callable[P, Awaitable[R]] = backoff.on_exception(
        policy.waits,
        NanoBananaError,
        max_tries=policy.max_retries + 1,
        max_time=None,  # the wait generator enforces it, without shortening a wait
        jitter=None,  # the policy jitters its own waits
        giveup=lambda exc: not predicate(exc),
        on_backoff=_log_retry,
        logger=None,
    )(func)
    return wrapped
