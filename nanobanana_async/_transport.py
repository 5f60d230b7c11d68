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

__all__ = ["post"]


async def post(
    session: aiohttp.ClientSession,
    url: str,
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
    except aiohttp.ConnectionTimeoutError as exc:
        raise APITimeoutError(
            f"timed out connecting to {_origin(url)}", request_sent=False
        ) from exc
    except aiohttp.ClientConnectorError as exc:
        raise APIConnectionError(
            f"cannot connect to {_origin(url)}: {exc.strerror or exc.os_error}",
            request_sent=False,
        ) from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise APITimeoutError(
            f"no answer from {_origin(url)} within {timeout.total:g} s"
            if timeout.total
            else f"no answer from {_origin(url)}"
        ) from exc
    except aiohttp.ClientError as exc:
        raise APIConnectionError(
            f"connection to {_origin(url)} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL, for messages (never a query or a path)."""
    parsed = URL(url)
    return str(parsed.origin()) if parsed.is_absolute() else url
