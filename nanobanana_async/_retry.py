"""When and how long to retry a request, on top of ``backoff``.

Retries happen only on an explicit predicate: reads (``retrieve``) are idempotent and
retry on rate limits, 5xx and network failures; paid submissions retry only when the
service cannot have seen them (a 429, or a connection that was never made). Both the
number of attempts and the total time are capped, and a ``Retry-After`` hint wins
over the computed wait. ``RetryPolicy.no_wait()`` makes tests fast and deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Generator
from typing import Any, ParamSpec, TypeVar

import attrs
import backoff

from ._errors import APIConnectionError, DownloadError, NanoBananaError, RateLimitError, ServerError

__all__ = [
    "RetryPolicy",
    "is_retryable_download",
    "is_retryable_read",
    "is_retryable_submission",
    "retrying",
]

logger = logging.getLogger("nanobanana_async")

P = ParamSpec("P")
R = TypeVar("R")

_RETRYABLE_STATUSES = frozenset({500, 502, 503, 504})


@attrs.frozen
class RetryPolicy:
    """How a failed request is retried: exponential waits with full jitter, capped.

    ``max_retries`` retries at most (so ``max_retries + 1`` attempts), never past
    ``max_time`` seconds in all; each wait is at most ``max_wait`` seconds, and a
    ``Retry-After`` hint is obeyed up to ``max_retry_after`` seconds.
    """

    max_retries: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    initial_wait: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    max_wait: float = attrs.field(default=8.0, validator=attrs.validators.ge(0))
    max_time: float = attrs.field(default=90.0, validator=attrs.validators.gt(0))
    max_retry_after: float = attrs.field(default=60.0, validator=attrs.validators.ge(0))
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

    def waits(self) -> Generator[float, Any, None]:
        """backoff wait generator: receives each exception, yields the next wait."""
        expo = backoff.expo(factor=self.initial_wait, max_value=self.max_wait)
        next(expo)  # backoff's generators start with a bare yield
        exc = yield 0.0
        while True:
            delay = next(expo)
            if self.jitter:
                delay = backoff.full_jitter(delay)
            hint = exc.retry_after if isinstance(exc, RateLimitError) else None
            if hint is not None:
                delay = min(hint, self.max_retry_after)
            exc = yield delay


def is_retryable_read(exc: Exception) -> bool:
    """An idempotent read may be retried after this error."""
    if isinstance(exc, RateLimitError | APIConnectionError):
        return True
    return isinstance(exc, ServerError) and exc.status in _RETRYABLE_STATUSES


def is_retryable_submission(exc: Exception) -> bool:
    """A paid submission may be retried only if the service cannot have taken it."""
    if isinstance(exc, RateLimitError):
        return True
    return isinstance(exc, APIConnectionError) and not exc.request_sent


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
        max_time=policy.max_time,
        jitter=None,
        giveup=lambda exc: not predicate(exc),
        on_backoff=_log_retry,
        logger=None,
    )(func)
    return wrapped
