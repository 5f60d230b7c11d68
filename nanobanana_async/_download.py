"""Image downloads: streamed to disk, atomic, bounded, retried, never sent our token.

Every image URL is chosen by the service, or by whoever forged a record, so each
answer is treated as hostile. An attempt follows at most a few redirects itself,
checking every hop's address (see ``_addresses``); it must finish within the client's
``timeout`` as a whole, and the body within ``max_bytes``; only bytes that are a real
raster image are kept (see ``_sniff``), named with the extension of what they are.
The body streams into a hidden ``.part`` file beside the destination, renamed into
place only once every byte has arrived, so a failure, a cut body or a cancellation
never leaves a half-written image. Image URLs live on CDN hosts, so the request carries
no ``Authorization`` header (the API calls pass theirs per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NamedTuple, TypeVar

import aiohttp
from yarl import URL

from ._addresses import Reach, reach_of_host, reaches_of
from ._concurrency import gather_or_cancel
from ._errors import APIConnectionError, APITimeoutError, DownloadError
from ._retry import RetryPolicy, is_retryable_download, retrying
from ._sniff import SNIFF_BYTES, image_extension
from ._transport import network_error

__all__ = ["DEFAULT_MAX_BYTES", "download", "download_all", "safe_stem"]

T = TypeVar("T")

#: The default cap on one image's size: a 4K PNG is a few tens of MB at most.
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024

_CHUNK_SIZE: Final = 64 * 1024
_MAX_REDIRECTS: Final = 5
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_OK_STATUSES: Final = frozenset({200, 203})
# Some hosts label images as generic bytes; the bytes themselves decide (see _sniff).
_GENERIC_TYPES: Final = frozenset({"application/octet-stream", "binary/octet-stream"})
# Images are compressed already: asking for no content coding keeps aiohttp from
# inflating anything, and an answer that is encoded anyway is refused.
_HEADERS: Final = {"accept": "image/*", "accept-encoding": "identity"}
_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]+")
_MAX_STEM: Final = 100
# Names Windows gives to devices, whatever the extension ("nul.png" is the null device).
_RESERVED: Final = frozenset(
    {"con", "prn", "aux", "nul"} | {f"{port}{n}" for port in ("com", "lpt") for n in "0123456789"}
)
_QUERY: Final = re.compile(r"\?[^\s'\"<>]*")
_TEMP_FLAGS: Final = (
    os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
)


class _Limits(NamedTuple):
    """What bounds one attempt: its whole duration, its connection, its body size."""

    deadline: float | None
    connect: float | None
    max_bytes: int


async def download(
    session: aiohttp.ClientSession,
    url: str,
    dest: str | os.PathLike[str],
    *,
    policy: RetryPolicy,
    timeout: aiohttp.ClientTimeout,
    max_bytes: int = DEFAULT_MAX_BYTES,
    stem: str | None = None,
) -> Path:
    """Stream ``url`` to ``dest`` (a file path, or an existing folder); returns the path.

    A ``dest`` that is an existing folder, or ends with a path separator, gets a name
    (``stem``, else one from the URL) and an extension from what the bytes are.
    """
    _check_url(url)
    limits = _limits(timeout, max_bytes)
    text = os.fspath(dest)
    path = Path(text)
    if stem is not None:
        safe = safe_stem(stem)
        if not safe:
            raise ValueError(f"stem must hold a letter or digit, got {stem!r}")
        return await _fetch(session, url, path, safe, policy=policy, limits=limits)
    if text.endswith(("/", os.sep)) or await asyncio.to_thread(path.is_dir):
        return await _fetch(session, url, path, _stem_for(url), policy=policy, limits=limits)
    return await _fetch(session, url, path.parent, None, path, policy=policy, limits=limits)


async def download_all(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    folder: str | os.PathLike[str],
    *,
    concurrency: int,
    policy: RetryPolicy,
    timeout: aiohttp.ClientTimeout,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> list[Path]:
    """Download ``urls`` into ``folder``, at most ``concurrency`` at once, in order.

    The first failure cancels the downloads still running and is raised; images that
    were already saved stay. Names are made unique within the call.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be a positive integer, got {concurrency!r}")
    for url in urls:
        _check_url(url)
    limits = _limits(timeout, max_bytes)
    directory = Path(folder)
    limit = asyncio.Semaphore(concurrency)

    async def one(url: str, stem: str) -> Path:
        async with limit:
            return await _fetch(session, url, directory, stem, policy=policy, limits=limits)

    stems = _unique_stems(urls)
    return await gather_or_cancel(one(url, stem) for url, stem in zip(urls, stems, strict=True))


def _limits(timeout: aiohttp.ClientTimeout, max_bytes: int) -> _Limits:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    return _Limits(timeout.total, timeout.sock_connect, max_bytes)


async def _fetch(
    session: aiohttp.ClientSession,
    url: str,
    directory: Path,
    stem: str | None,
    target: Path | None = None,
    *,
    policy: RetryPolicy,
    limits: _Limits,
) -> Path:
    """Make the folder, then run attempts under the retry policy."""
    try:
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise _filesystem_error(exc, f"cannot create the folder {directory}", url) from exc
    attempt = retrying(_attempt, policy, is_retryable_download)
    return await attempt(session, url, directory, stem, target, limits)


async def _attempt(
    session: aiohttp.ClientSession,
    url: str,
    directory: Path,
    stem: str | None,
    target: Path | None,
    limits: _Limits,
) -> Path:
    """One attempt, redirects and writing included, bounded by the client's timeout.

    The bound is on the whole attempt, not on each read, so a host that drips a byte
    now and then cannot hold a download open.
    """
    try:
        async with asyncio.timeout(limits.deadline):
            return await _follow(session, url, directory, stem, target, limits)
    except TimeoutError as exc:
        if isinstance(exc, APIConnectionError):  # a connect timeout, already ours
            raise
        within = f" within {limits.deadline:g} s" if limits.deadline is not None else ""
        raise APITimeoutError(
            f"download from {_display(URL(url))} did not finish{within}"
        ) from None


async def _follow(
    session: aiohttp.ClientSession,
    url: str,
    directory: Path,
    stem: str | None,
    target: Path | None,
    limits: _Limits,
) -> Path:
    """GET the URL, following redirects ourselves so each hop's address is checked."""
    hop = URL(url)
    origin_private: bool | None = None  # whether the image URL is on a private address
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.connect)
    for redirects in range(_MAX_REDIRECTS + 1):
        shown = _display(hop)
        if redirects == 0:
            if reach_of_host(hop.host or "") is Reach.FORBIDDEN:
                raise _forbidden(hop, url)
        else:
            origin_private = await _check_redirect(hop, url, origin_private)
        try:
            async with session.get(
                hop, headers=_HEADERS, timeout=timeout, allow_redirects=False
            ) as response:
                if response.status in _REDIRECT_STATUSES:
                    hop = _next_hop(response, hop, url)
                    continue
                _check_response(response, url, shown, limits.max_bytes)
                return await _save(response, directory, stem, target, url, shown, limits)
        except aiohttp.ClientPayloadError as exc:
            raise DownloadError(
                f"download from {shown} was cut short: {_scrub(str(exc))}",
                url=url,
                incomplete=True,
            ) from exc
        except aiohttp.ClientError as exc:
            error = network_error(exc, shown)
            # aiohttp's own text may quote the URL; its query may hold a signature.
            raise type(error)(_scrub(str(error)), request_sent=error.request_sent) from exc
    raise DownloadError(
        f"{_display(URL(url))} redirected more than {_MAX_REDIRECTS} times", url=url
    )


def _forbidden(hop: URL, url: str) -> DownloadError:
    return DownloadError(
        f"refused to download from {_display(hop)}: a link-local or reserved address", url=url
    )


async def _check_redirect(hop: URL, url: str, origin_private: bool | None) -> bool | None:
    """Refuse a redirect to a forbidden address, or to a private one unless the image
    URL is on one; returns whether it is (worked out, once, only when it matters)."""
    reaches = await reaches_of(hop.host or "", hop.port or 80)
    if Reach.FORBIDDEN in reaches:
        raise _forbidden(hop, url)
    if Reach.PRIVATE not in reaches:
        return origin_private
    if origin_private is None:
        origin = URL(url)
        origin_private = Reach.PRIVATE in await reaches_of(origin.host or "", origin.port or 80)
    if not origin_private:
        raise DownloadError(
            f"refused to follow a redirect to {_display(hop)}: a private address, "
            "while the image URL is not on one",
            url=url,
        )
    return origin_private


def _next_hop(response: aiohttp.ClientResponse, hop: URL, url: str) -> URL:
    """Where a redirect points, if it is an http(s) URL."""
    status = response.status
    location = response.headers.get("location")
    if not location:
        raise DownloadError(
            f"HTTP {status} from {_display(hop)} without a Location", url=url, status=status
        )
    try:
        target = hop.join(URL(location))
    except ValueError:
        target = None
    if target is None or target.scheme not in ("http", "https") or not target.raw_host:
        raise DownloadError(
            f"{_display(hop)} redirected to something that is not an http(s) URL",
            url=url,
            status=status,
        )
    return target.with_fragment(None)


def _check_response(response: aiohttp.ClientResponse, url: str, shown: str, max_bytes: int) -> None:
    """Raise for an error status, a non-image or encoded answer, or one known too large."""
    status = response.status
    if status not in _OK_STATUSES:
        raise DownloadError(f"HTTP {status} downloading {shown}", url=url, status=status)
    content_type = response.content_type.lower()
    if not content_type.startswith("image/") and content_type not in _GENERIC_TYPES:
        raise DownloadError(
            f"{shown} answered {content_type or 'no content type'} (HTTP {status}), not an image",
            url=url,
            status=status,
        )
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise DownloadError(
            f"{shown} answered with Content-Encoding {encoding[:40]!r}; images are "
            "downloaded unencoded",
            url=url,
            status=status,
        )
    length = response.content_length
    if length is not None and length > max_bytes:
        raise DownloadError(
            f"{shown} is {length} bytes, more than max_bytes={max_bytes}", url=url, status=status
        )


async def _save(
    response: aiohttp.ClientResponse,
    directory: Path,
    stem: str | None,
    target: Path | None,
    url: str,
    shown: str,
    limits: _Limits,
) -> Path:
    """Check the bytes are an image, write them to a hidden temporary file, rename it."""
    status = response.status
    head = await _read_head(response.content)
    extension = image_extension(head)
    if extension is None:
        raise DownloadError(
            f"{shown} answered bytes that are not a PNG, JPEG, WebP, GIF, AVIF, HEIC or HEIF image",
            url=url,
            status=status,
        )
    if target is None:
        assert stem is not None
        target = directory / (stem + extension)
    try:
        # Synchronous, like the rename below: a single metadata call, which a cancel
        # arriving while it ran in a thread could leave behind, with its descriptor.
        fd, temp_name = _create_temp(target.parent)
    except OSError as exc:
        raise _filesystem_error(exc, f"cannot write {shown} into {target.parent}", url) from exc
    try:
        received = 0
        with os.fdopen(fd, "wb") as file:
            chunk = head
            while chunk:
                received += len(chunk)
                if received > limits.max_bytes:
                    raise DownloadError(
                        f"{shown} sent more than max_bytes={limits.max_bytes} bytes",
                        url=url,
                        status=status,
                    )
                await asyncio.to_thread(file.write, chunk)
                chunk = await response.content.read(_CHUNK_SIZE)
        expected = response.content_length
        if expected is not None and received != expected:
            raise DownloadError(
                f"download from {shown} was cut short: got {received} of {expected} bytes",
                url=url,
                status=status,
                incomplete=True,
            )
        os.replace(temp_name, target)  # a rename: instant, and never left half-done by a cancel
    except BaseException as exc:
        # Synchronous on purpose: this also runs while being cancelled.
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        if isinstance(exc, OSError) and not isinstance(exc, aiohttp.ClientError):
            raise _filesystem_error(exc, f"cannot save {shown} as {target}", url) from exc
        raise
    return target


async def _read_head(content: aiohttp.StreamReader) -> bytes:
    """The body's first ``SNIFF_BYTES`` bytes (fewer if it is shorter)."""
    head = b""
    while len(head) < SNIFF_BYTES:
        more = await content.read(SNIFF_BYTES - len(head))
        if not more:
            break
        head += more
    return head


def _create_temp(folder: Path) -> tuple[int, str]:
    """A new hidden ``.part`` file in ``folder``, its mode set by the umask like any file."""
    while True:
        name = os.path.join(folder, f".{secrets.token_hex(8)}.part")
        try:
            return os.open(name, _TEMP_FLAGS, 0o666), name
        except FileExistsError:
            continue


def _filesystem_error(exc: OSError, what: str, url: str) -> DownloadError:
    return DownloadError(f"{what}: {exc.strerror or type(exc).__name__}", url=url)


def _check_url(url: str) -> None:
    parsed = URL(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"can only download http(s) URLs, got {_scrub(str(url))[:80]!r}")


def _display(url: URL) -> str:
    """The URL without credentials, query or fragment: a query may carry a signature."""
    return str(url.with_user(None).with_query(None).with_fragment(None))


def _scrub(text: str) -> str:
    """``text`` with anything that looks like a URL's query removed."""
    return _QUERY.sub("", text)


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
    return safe_stem(stem) or hashlib.sha256(url.encode()).hexdigest()[:16]


def safe_stem(stem: str) -> str:
    """``stem`` as a safe file name stem, never a Windows device name; may be empty."""
    stem = _sanitize(stem)
    if stem and stem.split(".")[0].lower() in _RESERVED:
        stem = "_" + stem
    return stem


def _sanitize(text: str) -> str:
    """Only letters, digits, ``._-``; never a leading dot (hidden) or dash (an option)."""
    return _UNSAFE.sub("_", text).lstrip(".-")[:_MAX_STEM]


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
