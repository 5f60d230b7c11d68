"""The one place that touches aiohttp for API calls: POST bytes, get status, headers, body.

The body is read inside ``async with``, so the connection goes back to the pool even
when a later step fails. aiohttp's errors become ours here, recording whether the
request can have reached the service (a paid submission is only retried when not).
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from yarl import URL

from ._errors import APIConnectionError, APITimeoutError
from ._protocol import RawResponse

__all__ = ["network_error", "post"]


async def post(
    session: aiohttp.ClientSession,
    url: URL,
    body: bytes,
    *,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout,
) -> RawResponse:
    """Send one POST and read the whole answer, whatever its status."""
    try:
        async with session.post(
            url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        ) as response:
            return RawResponse(response.status, response.headers, await response.read())
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise network_error(exc, str(url.origin()), timeout.total) from exc


def network_error(
    exc: aiohttp.ClientError | TimeoutError, where: str, timeout: float | None = None
) -> APIConnectionError:
    """Our error for an aiohttp failure, saying whether the request can have been sent.

    Only a connection that was never made (refused, unresolvable, timed out connecting)
    counts as not sent.
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
