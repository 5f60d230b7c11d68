"""The one place that touches aiohttp for API calls: POST bytes, get status, headers, body.

The body is read inside ``async with``, at most ``max_size`` bytes of it (after any
gzip inflation, so a small compressed bomb cannot fill memory), and the connection goes
back to the pool or is closed even when a later step fails. aiohttp's errors become ours
here, recording whether the request can have reached the service (a paid submission is
only retried when not).

The token must stay out of reach: aiohttp's exceptions carry the request's headers
(``request_info``), and their tracebacks hold them in frame locals, so none is chained
to our errors; and the headers travel in a :class:`Credentials` object whose ``repr``
hides them, so a traceback rendered with locals (rich, Sentry) shows ``***``.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from yarl import URL

from ._errors import APIConnectionError, APITimeoutError, ResponseDecodeError
from ._protocol import RawResponse

__all__ = ["Credentials", "network_error", "post"]

_CHUNK = 64 * 1024
_MIN_SCRUBBED = 8  # tokens shorter than this are not scrubbed: they would match any text


class Credentials:
    """The API's request headers, token included; shown as ``***`` by ``repr``."""

    __slots__ = ("_headers", "_token")

    def __init__(self, token: str, user_agent: str) -> None:
        # Scrubbed from answers (below) when long enough to be told from ordinary text.
        self._token = token.encode() if len(token) >= _MIN_SCRUBBED else None
        self._headers: Mapping[str, str] = {
            "authorization": f"Bearer {token}",
            "accept": "application/json",
            "content-type": "application/json",
            "user-agent": user_agent,
        }

    def headers(self) -> Mapping[str, str]:
        """The headers to send (never store the result where a traceback can show it)."""
        return self._headers

    def __repr__(self) -> str:
        return "<Credentials authorization=***>"

    def scrub(self, body: bytes) -> bytes:
        """``body`` with the token replaced by ``***``: a server that echoes the request
        (an echo service or debug proxy at a wrong base URL) must not put the token in
        error messages, excerpts or logs built from its answer."""
        token = self._token
        return body.replace(token, b"***") if token is not None and token in body else body


async def post(
    session: aiohttp.ClientSession,
    url: URL,
    body: bytes,
    *,
    credentials: Credentials,
    timeout: aiohttp.ClientTimeout,
    max_size: int,
) -> RawResponse:
    """Send one POST and read the whole answer (at most ``max_size`` bytes), any status."""
    try:
        async with session.post(
            url,
            data=body,
            headers=credentials.headers(),
            timeout=timeout,
            allow_redirects=False,
        ) as response:
            status, headers = response.status, response.headers
            content = await _read_capped(response, max_size)
        # The response's request_info holds the Authorization header: not a local of a
        # frame that raises below.
        del response
    except (aiohttp.ClientError, TimeoutError) as exc:
        error = network_error(exc, str(url.origin()), timeout.total)
    else:
        if content is None:
            raise _too_large(status, max_size)
        return RawResponse(status, headers, credentials.scrub(content))
    # Raised here, outside the except block, so the aiohttp error (whose request_info
    # and traceback hold the Authorization header) is neither its cause nor its context.
    raise error from None


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The body, or None once it passes ``limit`` bytes (the caller raises, outside the
    response's context).

    Streamed when it may grow past its Content-Length (compressed, or no length given):
    aiohttp inflates gzip bit by bit as it is read, so memory stays near ``limit``.
    """
    length = response.content_length
    if length is not None and length > limit:
        return None
    if length is not None and not response.headers.get("Content-Encoding"):
        return await response.read()  # exactly Content-Length bytes
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            # Leaving ``async with`` with the body unread closes the connection.
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(status: int, limit: int) -> ResponseDecodeError:
    return ResponseDecodeError(
        f"HTTP {status} answer is larger than {limit:,} bytes: refused "
        "(raise the client's max_response_bytes if such answers are expected)",
        status=status,
    )


def network_error(
    exc: aiohttp.ClientError | TimeoutError, where: str, timeout: float | None = None
) -> APIConnectionError:
    """Our error for an aiohttp failure, saying whether the request can have been sent.

    Only a connection that was never made (refused, unresolvable, timed out connecting)
    counts as not sent. The caller raises it without chaining ``exc``.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return APITimeoutError(f"timed out connecting to {where}", request_sent=False)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return APIConnectionError(
            f"cannot connect to {where}: {exc.strerror or exc.os_error}", request_sent=False
        )
    if isinstance(exc, aiohttp.ServerTimeoutError | TimeoutError):
        within = f" within {timeout:g} s" if timeout else ""
        return APITimeoutError(f"no answer from {where}{within}")
    return APIConnectionError(f"connection to {where} failed: {type(exc).__name__}: {exc}")
