"""Client memory while hostile answers are refused: RSS growth beside +64 MiB.

Each case runs the fake server in a child process (``_common.RemoteFake``), so the
process measured is the client alone. It warms the client up with one normal exchange
(session, connection, worker thread, imports), then reads the resident set size
(``VmRSS`` in ``/proc/self/status``), resets the peak (``VmHWM``, by writing ``5`` to
``/proc/self/clear_refs``; a thread also samples ``VmRSS`` every 5 ms, for kernels that
refuse the reset) and runs the hostile exchange. Growth = peak during the exchange -
RSS before it. Target: under +64 MB (MiB here) of growth.

Cases:

* ``gzip-bomb``: an API answer of about 1 MB on the wire, gzip-compressed, that inflates
  to 1 GiB of JSON whitespace (``inject("gzip_bomb")``); ``client.retrieve`` with the
  default ``max_response_bytes`` (32 MiB) must refuse it with ``ResponseDecodeError``
  (a bare ``aiohttp`` read of the same answer, as the client did before, took RSS from
  about 41 MB to 3.1 GB).
* ``endless-download``: the image host streams a PNG signature, then zeros for ever
  (``inject_image("endless")``); ``client.download`` with the default ``max_bytes``
  (64 MiB) must refuse it with ``DownloadError`` and leave nothing on disk.

A new case is an ``async def`` returning a :class:`Outcome`, which measures its hostile
exchange inside ``async with RssProbe() as probe:``, registered in ``CASES``.

    python benchmarks/bench_hostile.py [--case NAME ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from _common import RemoteFake, fmt_ratio, print_table, verdict

from nanobanana_async import DownloadError, NanoBananaClient, ResponseDecodeError, RetryPolicy

BOUND = 64 * 1024 * 1024  # client RSS stays under +64 MB while hostile answers are refused
MIB = 1024 * 1024


def _status_kib(field: str) -> int:
    """One ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (Linux only)")


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


class RssProbe:
    """Measures how far the resident set grows above its level at entry."""

    def __init__(self, interval: float = 0.005) -> None:
        self._interval = interval
        self._stop = threading.Event()
        self._sampled_kib = 0
        self._thread: threading.Thread | None = None
        self.before = 0
        self.peak = 0
        self.seconds = 0.0
        self.peak_reset = False
        self._started = 0.0

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._sampled_kib = max(self._sampled_kib, _status_kib("VmRSS"))

    async def __aenter__(self) -> RssProbe:
        self.before = _status_kib("VmRSS") * 1024
        self.peak_reset = _reset_peak()
        self._sampled_kib = self.before // 1024
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._started = time.perf_counter()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        peak_kib = max(self._sampled_kib, _status_kib("VmRSS"))
        if self.peak_reset:
            peak_kib = max(peak_kib, _status_kib("VmHWM"))
        self.peak = peak_kib * 1024

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.before)


class Outcome(NamedTuple):
    """What one case measured: its probe, whether it was refused as it must be, and how."""

    name: str
    probe: RssProbe
    refused: bool
    detail: str


# --------------------------------------------------------------------------- cases


async def endless_download() -> Outcome:
    """An image body that never ends, refused at the default ``max_bytes``."""
    with tempfile.TemporaryDirectory() as folder:
        async with (
            RemoteFake() as server,
            NanoBananaClient(
                server.token, base_url=server.base_url, retry=RetryPolicy.no_wait(), timeout=60
            ) as client,
        ):
            task = (await server.add_tasks(1))[0]
            await client.download(task.image_urls[0], Path(folder) / "warm-up.png")
            await server.inject_image("endless")
            refused, detail = False, "downloaded?!"
            async with RssProbe() as probe:
                try:
                    await client.download(task.image_urls[0], folder)
                except DownloadError as exc:
                    refused, detail = True, str(exc)
            left = sorted(os.listdir(folder))
        refused = refused and left == ["warm-up.png"]
        detail += f"; left in the folder: {left}"
        return Outcome("endless image download", probe, refused, detail)


async def gzip_bomb() -> Outcome:
    """A gzip answer that inflates to 1 GiB, refused at the default ``max_response_bytes``."""
    async with (
        RemoteFake() as server,
        NanoBananaClient(
            server.token, base_url=server.base_url, retry=RetryPolicy.no_wait(), timeout=60
        ) as client,
    ):
        task = (await server.add_tasks(1))[0]
        await client.retrieve(task.id)  # warm up: session, connection, code paths
        await server.inject("gzip_bomb", size=1 << 30, action="retrieve")
        refused, detail = False, "read?!"
        async with RssProbe() as probe:
            try:
                await client.retrieve(task.id)
            except ResponseDecodeError as exc:
                refused, detail = "larger than" in str(exc), str(exc)
        counts = await server.counts()
    refused = refused and counts.get("retrieve", 0) == 2
    bomb_requests = counts.get("retrieve", 0) - 1  # less the warm-up
    detail += f"; requests the bomb cost: {bomb_requests} (it is not retried)"
    return Outcome("gzip bomb answer (1 GiB inflated)", probe, refused, detail)


CASES: dict[str, Callable[[], Awaitable[Outcome]]] = {
    "gzip-bomb": gzip_bomb,
    "endless-download": endless_download,
}


# --------------------------------------------------------------------------- main


async def main(names: list[str]) -> None:
    outcomes = [await CASES[name]() for name in names]
    rows = []
    for outcome in outcomes:
        probe = outcome.probe
        rows.append(
            [
                outcome.name,
                f"{probe.before / MIB:.1f} MiB",
                f"{probe.peak / MIB:.1f} MiB",
                f"+{probe.growth / MIB:.1f} MiB",
                f"+{BOUND / MIB:.0f} MiB",
                fmt_ratio(probe.growth / BOUND),
                f"{probe.seconds:.2f} s",
            ]
        )
    print_table(["case", "RSS before", "peak", "growth", "bound", "growth/bound", "time"], rows)
    print()
    for outcome in outcomes:
        probe = outcome.probe
        how = "VmHWM reset + 5 ms samples" if probe.peak_reset else "5 ms samples only"
        print(f"{outcome.name}: {outcome.detail} (peak from {how})")
        verdict(f"{outcome.name} refused", outcome.refused, outcome.detail)
        verdict(
            f"{outcome.name} memory",
            probe.growth < BOUND,
            f"+{probe.growth / MIB:.1f} MiB of RSS against a bound of +{BOUND / MIB:.0f} MiB",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--case",
        action="append",
        choices=sorted(CASES),
        help="run only this case (repeatable); default: all",
    )
    args = parser.parse_args()
    asyncio.run(main(args.case or list(CASES)))
