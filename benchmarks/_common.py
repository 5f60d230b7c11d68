"""Shared helpers for the benchmarks: a fake server in its own process, stats, tables.

The benchmarks that talk HTTP run :class:`~nanobanana_async.testing.FakeNanoBanana` in a
child process (``python benchmarks/_common.py --serve OPTIONS_JSON``), so the client's
CPU time (``time.process_time`` in the parent) is the client's alone and the server's
work runs on the other core. The parent drives the child over its stdin/stdout, one JSON
object per line: create tasks, read the request counters, read the server's CPU time.

Run on its own (``python benchmarks/_common.py``) it starts such a child, creates a task
and prints the child's answers: a smoke test of the plumbing.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

__all__ = [
    "RemoteFake",
    "RemoteTask",
    "fmt_ratio",
    "median",
    "print_table",
    "verdict",
]

_LINE_LIMIT = 1 << 27  # one answer line can list tens of thousands of tasks
_SCRIPT = os.path.abspath(__file__)


# --------------------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    """The median, or NaN for no values."""
    return statistics.median(values) if values else float("nan")


def fmt_ratio(ratio: float) -> str:
    """A ratio as ``1.23x``."""
    return f"{ratio:.2f}x"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a left-aligned first column and right-aligned others, like a small report."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))


def verdict(name: str, ok: bool, detail: str) -> bool:
    """Print one ``PASS``/``FAIL`` line for a target and return ``ok``."""
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    return ok


# --------------------------------------------------------------------------- remote fake


class RemoteTask:
    """A task created on the remote fake: its id, finish time (wall clock) and URLs."""

    __slots__ = ("finishes_at_wall", "id", "image_urls")

    def __init__(self, task_id: str, finishes_at_wall: float, image_urls: list[str]) -> None:
        self.id = task_id
        self.finishes_at_wall = finishes_at_wall
        self.image_urls = image_urls


def _pin_apart(child: int) -> None:
    """On Linux with 2+ cores: the server child on the last core, this process on the
    others, so the two never share a core and the client's CPU time is its own."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return
    os.sched_setaffinity(child, {cores[-1]})
    os.sched_setaffinity(0, set(cores[:-1]))


class RemoteFake:
    """A ``FakeNanoBanana`` running in a child process, driven over its stdin/stdout.

    Use as ``async with RemoteFake(duration=(2.0, 8.0)) as server:``; then
    ``server.base_url`` and ``server.token`` point a client at it.
    """

    def __init__(self, *, duration: float | tuple[float, float] = 0.0, seed: int = 0) -> None:
        self._options = {
            "duration": list(duration) if isinstance(duration, tuple) else duration,
            "seed": seed,
        }
        self._proc: asyncio.subprocess.Process | None = None
        self.base_url = ""
        self.token = ""

    async def __aenter__(self) -> RemoteFake:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            _SCRIPT,
            "--serve",
            json.dumps(self._options),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=_LINE_LIMIT,
        )
        _pin_apart(self._proc.pid)
        hello = await self._read()
        self.base_url = str(hello["base_url"])
        self.token = str(hello["token"])
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.returncode is None and proc.stdin is not None:
                proc.stdin.write(b'{"op": "quit"}\n')
                await proc.stdin.drain()
                proc.stdin.close()
            await asyncio.wait_for(proc.wait(), 10.0)
        except (TimeoutError, ConnectionError):
            proc.kill()
            await proc.wait()

    async def _read(self) -> dict[str, Any]:
        assert self._proc is not None
        assert self._proc.stdout is not None
        line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the fake server process exited")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one command to the child and return its answer."""
        assert self._proc is not None
        assert self._proc.stdin is not None
        self._proc.stdin.write(json.dumps({"op": op, **args}).encode() + b"\n")
        await self._proc.stdin.drain()
        return await self._read()

    async def add_tasks(self, n: int, *, duration: float | None = None) -> list[RemoteTask]:
        """Create ``n`` tasks (``duration=None``: the server's setting); finish times are wall
        clock (``time.time()``), as in the records' ``finished_at``."""
        answer = await self.call("add", n=n, duration=duration)
        return [
            RemoteTask(t["id"], t["finishes_at_wall"], t["image_urls"]) for t in answer["tasks"]
        ]

    async def task(self, task_id: str) -> RemoteTask:
        """A task the server holds (one submitted by a client, say), by id."""
        answer = await self.call("task", id=task_id)
        if "error" in answer:
            raise KeyError(answer["error"])
        return RemoteTask(answer["id"], answer["finishes_at_wall"], answer["image_urls"])

    async def counts(self) -> dict[str, int]:
        """The server's request counter by action."""
        return dict((await self.call("stats"))["counts"])

    async def stats(self) -> dict[str, Any]:
        """Counts, batch sizes and the server process's CPU seconds so far."""
        return await self.call("stats")

    async def reset_counts(self) -> None:
        """Clear the server's request counters."""
        await self.call("reset")

    async def inject(self, kind: str, **options: Any) -> None:
        """Queue an API fault (``FakeNanoBanana.inject``) in the child."""
        answer = await self.call("inject", kind=kind, options=options)
        if "error" in answer:
            raise RuntimeError(answer["error"])

    async def inject_image(self, kind: str, **options: Any) -> None:
        """Queue an image-listener fault (``FakeNanoBanana.inject_image``) in the child."""
        answer = await self.call("inject_image", kind=kind, options=options)
        if "error" in answer:
            raise RuntimeError(answer["error"])


async def _serve(options: dict[str, Any]) -> None:
    """The child: run a FakeNanoBanana and answer the parent's commands until ``quit``."""
    from nanobanana_async.testing import FakeNanoBanana

    duration = options["duration"]
    server = FakeNanoBanana(
        duration=tuple(duration) if isinstance(duration, list) else float(duration),
        seed=int(options["seed"]),
    )
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_LINE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(payload: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    async with server:
        answer({"base_url": server.base_url, "token": server.token})
        while line := await reader.readline():
            command = json.loads(line)
            op = command["op"]
            if op == "quit":
                break
            if op == "add":
                duration_arg = command.get("duration")
                created = []
                for _ in range(int(command["n"])):
                    task = server.tasks[server.add_task(duration=duration_arg)]
                    created.append(
                        {
                            "id": task.id,
                            "finishes_at_wall": task.finishes_at_wall,
                            "image_urls": task.image_urls,
                        }
                    )
                answer({"tasks": created})
            elif op == "task":
                known = server.tasks.get(command["id"])
                if known is None:
                    answer({"error": f"no task {command['id']!r}"})
                else:
                    answer(
                        {
                            "id": known.id,
                            "finishes_at_wall": known.finishes_at_wall,
                            "image_urls": known.image_urls,
                        }
                    )
            elif op == "stats":
                answer(
                    {
                        "counts": dict(server.counts),
                        "batch_sizes": server.batch_sizes,
                        "batch_times": server.batch_times,
                        "cpu": time.process_time(),
                    }
                )
            elif op == "reset":
                server.reset_counts()
                answer({})
            elif op in ("inject", "inject_image"):
                inject = server.inject if op == "inject" else server.inject_image
                try:
                    inject(command["kind"], **command["options"])
                except (TypeError, ValueError) as exc:
                    answer({"error": str(exc)})
                else:
                    answer({})
            else:
                answer({"error": f"unknown op {op!r}"})


async def _smoke() -> None:
    async with RemoteFake(duration=0.0) as server:
        tasks = await server.add_tasks(1)
        print(server.base_url, tasks[0].id, tasks[0].image_urls)
        print(await server.stats())


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        asyncio.run(_serve(json.loads(sys.argv[2])))
    else:
        asyncio.run(_smoke())
