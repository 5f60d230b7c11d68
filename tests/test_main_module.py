"""``python -m nanobanana_async`` runs the command line."""

from __future__ import annotations

import asyncio
import sys

from nanobanana_async import __version__


async def test_python_dash_m_runs_the_cli() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nanobanana_async",
        "--version",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == f"nanobanana {__version__}"
