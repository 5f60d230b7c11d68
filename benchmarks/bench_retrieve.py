"""``retrieve`` throughput against the fake server, beside a bare aiohttp loop.

Both sides read the same finished tasks from the same fake server (in a child process,
so ``time.process_time`` here is client CPU only), with the same concurrency:

* client: one ``NanoBananaClient`` (default ``RetryPolicy``), ``await client.retrieve(id)``;
* bare: one ``aiohttp.ClientSession``,
  ``session.post(url, json=body, headers=...)`` then ``await resp.json()``.

The two alternate (ABAB..., the first one swapping each round) for several rounds; the
median of the per-round ratios (client / bare, measured back to back) is the figure
judged, and the ratio of the two medians is printed beside it. Target: ``retrieve``
takes at most 1.25x the bare loop's time per call, at every concurrency.

    python benchmarks/bench_retrieve.py [--tasks 400] [--rounds 25] [--concurrency 1 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import aiohttp
from _common import RemoteFake, fmt_ratio, median, print_table, verdict

from nanobanana_async import NanoBananaClient, RetryPolicy

TARGET = 1.25
TASKS_PATH = "/nano-banana/tasks"

Call = Callable[[str], Awaitable[None]]


async def run_pass(call: Call, ids: Sequence[str], concurrency: int) -> tuple[float, float]:
    """Read every id once with ``concurrency`` workers; (wall, CPU) seconds per call."""
    feed: Iterator[str] = iter(ids)

    async def worker() -> None:
        for task_id in feed:
            await call(task_id)

    wall0, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return wall / len(ids), cpu / len(ids)


async def count_loads(call: Awaitable[None]) -> int:
    """How many times ``json.loads`` runs while ``call`` runs (nothing else runs meanwhile)."""
    calls = 0
    real = json.loads

    def loads(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)

    json.loads = loads
    try:
        await call
    finally:
        json.loads = real
    return calls


async def main(args: argparse.Namespace) -> None:
    async with RemoteFake(duration=0.0) as server:
        tasks = await server.add_tasks(args.tasks, duration=0.0)
        ids = [task.id for task in tasks]
        url = server.base_url + TASKS_PATH
        headers = {
            "authorization": f"Bearer {server.token}",
            "accept": "application/json",
            "content-type": "application/json",
        }
        async with (
            NanoBananaClient(server.token, base_url=server.base_url, retry=RetryPolicy()) as client,
            aiohttp.ClientSession() as session,
        ):

            async def via_client(task_id: str) -> None:
                task = await client.retrieve(task_id)
                if task.id != task_id or not task.done:
                    raise AssertionError(f"retrieve({task_id!r}) returned {task!r}")

            async def via_bare(task_id: str) -> None:
                body = {"action": "retrieve", "id": task_id}
                async with session.post(url, json=body, headers=headers) as resp:
                    record = await resp.json()
                if record.get("id") != task_id:
                    raise AssertionError(f"bare retrieve of {task_id!r} returned {record!r}")

            sides: dict[str, Call] = {"client": via_client, "bare": via_bare}
            parses = await count_loads(via_client(ids[0]))
            # Warm up both: connection pools, code paths, the server's caches.
            for call in sides.values():
                await run_pass(call, ids[:50], max(args.concurrency))

            rows = []
            results: list[tuple[int, float]] = []
            for concurrency in args.concurrency:
                wall: dict[str, list[float]] = {name: [] for name in sides}
                cpu: dict[str, list[float]] = {name: [] for name in sides}
                ratios: list[float] = []
                for round_no in range(args.rounds):
                    order = list(sides) if round_no % 2 == 0 else list(reversed(sides))
                    got: dict[str, float] = {}
                    for name in order:
                        per_call, cpu_per_call = await run_pass(sides[name], ids, concurrency)
                        wall[name].append(per_call)
                        cpu[name].append(cpu_per_call)
                        got[name] = per_call
                    ratios.append(got["client"] / got["bare"])
                client_wall, bare_wall = median(wall["client"]), median(wall["bare"])
                client_cpu, bare_cpu = median(cpu["client"]), median(cpu["bare"])
                ratio = median(ratios)
                results.append((concurrency, ratio))
                rows.append(
                    [
                        concurrency,
                        f"{client_wall * 1e6:.0f}",
                        f"{bare_wall * 1e6:.0f}",
                        fmt_ratio(client_wall / bare_wall),
                        fmt_ratio(ratio),
                        f"{client_cpu * 1e6:.0f}",
                        f"{bare_cpu * 1e6:.0f}",
                        fmt_ratio(client_cpu / bare_cpu),
                    ]
                )

    print(
        f"retrieve vs bare aiohttp: {args.tasks} finished tasks, {args.rounds} alternating "
        "rounds per concurrency, medians; fake server in a child process"
    )
    print_table(
        [
            "concurrency",
            "client us/call",
            "bare us/call",
            "ratio of medians",
            "median paired ratio",
            "client CPU us/call",
            "bare CPU us/call",
            "CPU ratio",
        ],
        rows,
    )
    print(f"json.loads calls in one client.retrieve: {parses} (the bare loop: 1)")
    for concurrency, ratio in results:
        verdict(
            f"retrieve within {TARGET}x of bare aiohttp at concurrency {concurrency}",
            ratio <= TARGET,
            f"median paired ratio {fmt_ratio(ratio)} (client time / bare time, same round)",
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tasks", type=int, default=400, help="finished tasks read per pass")
    parser.add_argument("--rounds", type=int, default=25, help="alternating rounds per setting")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 16], help="concurrent callers"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
