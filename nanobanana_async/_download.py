"""Image downloads: streamed to disk, atomic, retried, never sent our token.

(Placeholder signatures; the implementation lands with the downloads work.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from ._retry import RetryPolicy

__all__ = ["download", "download_all"]


async def download(
    session: aiohttp.ClientSession,
    url: str,
    dest: str | os.PathLike[str],
    *,
    policy: RetryPolicy,
    timeout: aiohttp.ClientTimeout,
) -> Path:
    """Stream ``url`` to ``dest`` (a file path, or an existing folder); returns the path."""
    raise NotImplementedError


async def download_all(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    folder: str | os.PathLike[str],
    *,
    concurrency: int,
    policy: RetryPolicy,
    timeout: aiohttp.ClientTimeout,
) -> list[Path]:
    """Download ``urls`` into ``folder``, at most ``concurrency`` at once, in order."""
    raise NotImplementedError
