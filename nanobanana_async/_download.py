"""Image downloads: streamed to disk, atomic, retried, never sent our token.

Each attempt streams the body into a hidden ``.part`` file beside the destination and
renames it into place only once every byte has arrived, so a failure, a cut body or a
cancellation never leaves a half-written image (a file of the same name is replaced only
by a complete one). Image URLs live on CDN hosts, so the request carries no
``Authorization`` header (the API calls pass theirs per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import aiohttp
from yarl import URL

from ._concurrency import gather_or_cancel
from ._errors import APIConnectionError, DownloadError, NanoBananaError
from ._retry import RetryPolicy, retrying
from ._transport import network_error

__all__ = ["download", "download_all"]

_CHUNK_SIZE: Final = 64 * 1024
_RETRYABLE_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
# mimetypes picks odd first choices for some types (".jpe" for image/jpeg on some systems).
_EXTENSIONS: Final = {
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/png": ".png",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/avif": ".avif",
    "image/heic": ".heic",
}
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM: Final = 100


class _TransientDownloadError(DownloadError):
    """A download failure worth another attempt: a 5xx/429 answer or a body cut short."""


def _is_retryable(exc: Exception) -> bool:
    return isinstance(exc, _TransientDownloadError | APIConnectionError)


async def download(
    session: aiohttp.ClientSession,
    url: str,
    dest: str | os.PathLike[str],
    *,
    policy: RetryPolicy,
    timeout: aiohttp.ClientTimeout,
) -> Path:
    """Stream ``url`` to ``dest`` (a file path, or an existing folder); returns the path.

    A ``dest`` that is an existing folder, or ends with a path separator, gets a name
    from the URL and an extension from the answer's content type.
    """
    _check_url(url)
    text = os.fspath(dest)
    path = Path(text)
    if text.endswith(("/", os.sep)) or await asyncio.to_thread(path.is_dir):
        return await _fetch(session, url, path, _stem_for(url), policy=policy, timeout=timeout)
    return await _fetch(session, url, path.parent, None, path, policy=policy, timeout=timeout)


async def download_all(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    folder: str | os.PathLike[str],
    *,
    concurrency: int,
    policy: RetryPolicy,
    timeout: aiohttp.ClientTimeout,
) -> list[Path]:
    """Download ``urls`` into ``folder``, at most ``concurrency`` at once, in order.

    The first failure cancels the downloads still running and is raised; images that
    were already saved stay. Names are made unique within the call.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    for url in urls:
        _check_url(url)
    directory = Path(folder)
    limit = asyncio.Semaphore(concurrency)

    async def one(url: str, stem: str) -> Path:
        async with limit:
            return await _fetch(session, url, directory, stem, policy=policy, timeout=timeout)

    stems = _unique_stems(urls)
    return await gather_or_cancel(one(url, stem) for url, stem in zip(urls, stems, strict=True))


async def _fetch(
    session: aiohttp.ClientSession,
    url: str,
    directory: Path,
    stem: str | None,
    target: Path | None = None,
    *,
    policy: RetryPolicy,
    timeout: aiohttp.ClientTimeout,
) -> Path:
    """Make the folder, then run attempts under the retry policy."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    # An image can take longer than one API call to arrive: bound the silences, not the
    # whole transfer, so a slow but moving download of a 4K image is not cut off.
    stream_timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=timeout.sock_connect,
        sock_read=timeout.sock_read or timeout.total,
    )
    attempt = retrying(_attempt, policy, _is_retryable)
    return await attempt(session, url, directory, stem, target, stream_timeout)


async def _attempt(
    session: aiohttp.ClientSession,
    url: str,
    directory: Path,
    stem: str | None,
    target: Path | None,
    timeout: aiohttp.ClientTimeout,
) -> Path:
    """One GET streamed to a temporary file, renamed into place when complete."""
    shown = _display(url)
    try:
        async with session.get(url, headers={"accept": "image/*"}, timeout=timeout) as response:
            _check_response(response, url, shown)
            if target is None:
                assert stem is not None
                target = directory / (stem + _extension(response.content_type.lower()))
            return await _stream_to(response, target, url, shown)
    except NanoBananaError:
        raise
    except aiohttp.ClientPayloadError as exc:
        raise _TransientDownloadError(
            f"download from {shown} was cut short: {exc}", url=url
        ) from exc
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise network_error(exc, shown) from exc


def _check_response(response: aiohttp.ClientResponse, url: str, shown: str) -> None:
    """Raise for an error status or an answer that is not an image."""
    status = response.status
    if status >= 400:
        error = _TransientDownloadError if status in _RETRYABLE_STATUSES else DownloadError
        raise error(f"HTTP {status} downloading {shown}", url=url, status=status)
    if not response.content_type.startswith("image/"):
        raise DownloadError(
            f"{shown} answered {response.content_type or 'no content type'} "
            f"(HTTP {status}), not an image",
            url=url,
            status=status,
        )


async def _stream_to(response: aiohttp.ClientResponse, target: Path, url: str, shown: str) -> Path:
    """Write the body to a hidden temporary file next to ``target``, then rename it."""
    fd, temp_name = _create_part(target.parent)
    try:
        received = 0
        with os.fdopen(fd, "wb") as file:
            async for chunk in response.content.iter_chunked(_CHUNK_SIZE):
                await asyncio.to_thread(file.write, chunk)
                received += len(chunk)
        expected = response.content_length
        # With a Content-Encoding the length counts encoded bytes; aiohttp checks those.
        encoded = bool(response.headers.get("content-encoding"))
        if expected is not None and not encoded and received != expected:
            raise _TransientDownloadError(
                f"download from {shown} was cut short: got {received} of {expected} bytes",
                url=url,
                status=response.status,
            )
        os.replace(temp_name, target)  # a rename: instant, and never left half-done by a cancel
    except BaseException:
        # Synchronous on purpose: this also runs while being cancelled.
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    return target


def _create_part(directory: Path) -> tuple[int, str]:
    """A new hidden ``.part`` file in ``directory``: open descriptor and name.

    Created with mode 0666 less the umask, as any saved file should be (``mkstemp``
    would make it 0600 whatever the umask, and the rename keeps that mode).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        name = os.path.join(directory, f".{secrets.token_hex(8)}.part")
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:  # 64 random bits: only ever a freak collision
            continue


def _check_url(url: str) -> None:
    if not isinstance(url, str) or URL(url).scheme not in ("http", "https"):
        raise ValueError(f"can only download http(s) URLs, got {str(url)[:80]!r}")


def _display(url: str) -> str:
    """The URL without its query: CDN URLs may carry signatures worth keeping out of logs."""
    parsed = URL(url)
    return str(parsed.with_query(None).with_fragment(None))


def _extension(content_type: str) -> str:
    return _EXTENSIONS.get(content_type) or mimetypes.guess_extension(content_type) or ".img"


def _stem_for(url: str) -> str:
    """A safe file name stem from the URL's last path segment, else from its hash.

    A bare index such as ``.../<task id>/0.png`` gets its parent segment in front
    (``<task id>_0``), so images of different tasks do not overwrite each other.
    """
    segments = [part for part in URL(url).parts if part not in ("", "/")]
    stem = _sanitize(Path(segments[-1]).stem) if segments else ""
    if stem.isdigit() and len(segments) >= 2:
        parent = _sanitize(segments[-2])
        if parent:
            stem = f"{parent}_{stem}"
    return stem or hashlib.sha256(url.encode()).hexdigest()[:16]


def _sanitize(text: str) -> str:
    return _UNSAFE.sub("_", text).lstrip(".")[:_MAX_STEM]


def _unique_stems(urls: Sequence[str]) -> list[str]:
    """Stems for each URL, with ``-2``, ``-3`` ... added where two would collide."""
    seen: set[str] = set()
    stems = []
    for url in urls:
        base = stem = _stem_for(url)
        n = 1
        while stem.lower() in seen:  # case-insensitive file systems
            n += 1
            stem = f"{base}-{n}"
        seen.add(stem.lower())
        stems.append(stem)
    return stems
