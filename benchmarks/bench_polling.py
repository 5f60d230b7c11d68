"""Shared batch polling vs one poll loop per task, against the fake server.

N tasks whose durations are uniform over 2..8 s (``FakeNanoBanana(duration=(2.0, 8.0))``,
same seed for both sides, so the same durations) are all awaited at once, by:

* shared: this client with default settings, ``await client.await_completion(task_id)``
  for each task, through ``asyncio.gather``;
* per-task: what the official SDK does, one loop per task: sleep 3 s, ``retrieve``, stop
  when ``task.done``; same client class, same gather.

Each side gets a fresh fake server (in a child process, so ``time.process_time`` here is
the client's CPU alone) and a fresh client; they run one after the other. Printed per
side: poll requests (the server's ``retrieve_batch`` count for shared, ``retrieve`` for
per-task), median / 90th percentile / max delay between a task finishing on the server
(its record's ``finished_at``, wall clock) and its waiter returning (``time.time()``),
client and server CPU seconds, and whether every waiter got its own task's image URLs.

Targets: for N=200, shared makes at most 1/20 of the per-task loop's poll requests and
its median delay is no worse; for N=2000, every waiter returns the right URLs and shared
makes at most 1/20 of the per-task loop's requests.

    python benchmarks/bench_polling.py [--n 200 2000] [--interval 3.0]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from _common import RemoteFake, RemoteTask, median, print_table, verdict

from nanobanana_async import NanoBananaClient

REQUEST_FRACTION = 20  # shared must make at most 1/20 of the per-task loop's requests
DURATION = (2.0, 8.0)
DEADLINE = 120.0  # seconds for one side's whole run: the script always stops


@attrs.frozen
class SideResult:
    name: str
    requests: int
    ids_polled: int
    other_requests: dict[str, int]
    delays: list[float]
    client_cpu: float
    server_cpu: float
    wall: float
    wrong_urls: int
    errors: int


Waiter = Callable[[NanoBananaClient, str], Awaitable[list[str]]]


async def shared_waiter(client: NanoBananaClient, task_id: str) -> list[str]:
    return await client.await_completion(task_id)


def per_task_waiter(interval: float) -> Waiter:
    async def waiter(client: NanoBananaClient, task_id: str) -> list[str]:
        while True:
            await asyncio.sleep(interval)
            task = await client.retrieve(task_id)
            if task.done:
                return task.image_urls

    return waiter


async def run_side(name: str, n: int, waiter: Waiter, poll_action: str, seed: int) -> SideResult:
    async with RemoteFake(duration=DURATION, seed=seed) as server:  # noqa: SIM117
        async with NanoBananaClient(server.token, base_url=server.base_url) as client:
            before = await server.stats()
            tasks = await server.add_tasks(n)
            returned: dict[str, float] = {}
            urls: dict[str, list[str]] = {}
            errors = 0

            async def one(task: RemoteTask) -> None:
                nonlocal errors
                try:
                    urls[task.id] = await waiter(client, task.id)
                except Exception as exc:
                    errors += 1
                    if errors <= 3:
                        print(f"  {name}: waiter for {task.id} failed: {exc!r}")
                returned[task.id] = time.time()

            wall0, cpu0 = time.perf_counter(), time.process_time()
            async with asyncio.timeout(DEADLINE):
                await asyncio.gather(*(one(task) for task in tasks))
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            after = await server.stats()

    counts: dict[str, int] = after["counts"]
    delays = [returned[t.id] - t.finishes_at_wall for t in tasks if t.id in urls]
    wrong = sum(1 for t in tasks if urls.get(t.id) != t.image_urls)
    batch_sizes: list[int] = after["batch_sizes"]
    requests = counts.get(poll_action, 0)
    return SideResult(
        name=name,
        requests=requests,
        ids_polled=sum(batch_sizes) if poll_action == "retrieve_batch" else requests,
        other_requests={k: v for k, v in counts.items() if k != poll_action},
        delays=delays,
        client_cpu=cpu,
        server_cpu=after["cpu"] - before["cpu"],
        wall=wall,
        wrong_urls=wrong,
        errors=errors,
    )


def percentile(values: Sequence[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def row(n: int, side: SideResult) -> list[Any]:
    return [
        n,
        side.name,
        side.requests,
        side.ids_polled,
        f"{side.ids_polled / max(side.requests, 1):.1f}",
        f"{median(side.delays):.3f}",
        f"{percentile(side.delays, 90):.3f}",
        f"{max(side.delays, default=float('nan')):.3f}",
        f"{side.client_cpu:.3f}",
        f"{side.server_cpu:.3f}",
        f"{side.wall:.1f}",
        f"{n - side.wrong_urls}/{n}",
        side.errors,
        ",".join(f"{k}={v}" for k, v in sorted(side.other_requests.items())) or "-",
    ]


async def main(args: argparse.Namespace) -> None:
    rows: list[list[Any]] = []
    checks: list[tuple[str, bool, str]] = []
    for n in args.n:
        seed = 1000 + n
        shared = await run_side("shared (this client)", n, shared_waiter, "retrieve_batch", seed)
        loop = await run_side(
            f"per-task every {args.interval:g} s",
            n,
            per_task_waiter(args.interval),
            "retrieve",
            seed,
        )
        rows += [row(n, shared), row(n, loop)]
        fraction = shared.requests / loop.requests if loop.requests else float("inf")
        checks.append(
            (
                f"N={n}: shared makes at most 1/{REQUEST_FRACTION} of the per-task requests",
                shared.requests * REQUEST_FRACTION <= loop.requests,
                f"{shared.requests} vs {loop.requests} requests = 1/{1 / fraction:.1f}"
                if fraction
                else f"{shared.requests} vs {loop.requests} requests",
            )
        )
        if n <= 200:
            shared_median, loop_median = median(shared.delays), median(loop.delays)
            checks.append(
                (
                    f"N={n}: shared median delay no worse than the per-task loop's",
                    shared_median <= loop_median,
                    f"{shared_median:.3f} s vs {loop_median:.3f} s "
                    f"(ratio {shared_median / loop_median:.2f}x)",
                )
            )
        checks.append(
            (
                f"N={n}: every shared waiter returns its own task's URLs",
                shared.wrong_urls == 0 and shared.errors == 0,
                f"{n - shared.wrong_urls}/{n} right, {shared.errors} errors "
                f"(per-task loop: {n - loop.wrong_urls}/{n})",
            )
        )

    print(
        "shared batch polling vs per-task polling: durations uniform "
        f"{DURATION[0]:g}..{DURATION[1]:g} s, fake server in a child process; "
        "delay = waiter return - task finished_at (s)"
    )
    print_table(
        [
            "N",
            "side",
            "poll requests",
            "ids polled",
            "ids/request",
            "median delay",
            "p90 delay",
            "max delay",
            "client CPU s",
            "server CPU s",
            "wall s",
            "right URLs",
            "errors",
            "other requests",
        ],
        rows,
    )
    for name, ok, detail in checks:
        verdict(name, ok, detail)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, nargs="+", default=[200, 2000], help="task counts")
    parser.add_argument(
        "--interval", type=float, default=3.0, help="per-task loop's sleep between retrieves"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
