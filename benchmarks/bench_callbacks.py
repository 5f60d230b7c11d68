"""Callbacks as the fast path versus polling alone, against the fake server.

The workload is ``bench_polling.py``'s: N tasks (default 200) lasting uniform 2..8 s, same
seed, all awaited at once with ``client.await_completion`` and default client settings
(a new task first read at 2.5 s, then every 1 s growing to 1.5 s; a task submitted with
a callback is polled every 15 s). The
fake server runs in a child process and POSTs each callback over real HTTP to a
:class:`~nanobanana_async.webhooks.CallbackReceiver` on an aiohttp server in this one.
Three sides, one after the other, each on a fresh server and client:

* polling alone: ``generate(prompt)``;
* callbacks, verify: ``generate(prompt, callback_url=...)``; the receiver confirms each
  callback with one ``retrieve`` (the default);
* callbacks, no verify: the same, trusting the callback body.

Printed per side: poll requests (``retrieve_batch``), confirmations (``retrieve``), the
median / 90th percentile / max delay between a task finishing on the server (its
record's ``finished_at``, wall clock) and its waiter returning (``time.time()``), and
this process's CPU (client and receiver). ``--drop K`` makes the receiver discard its
first K deliveries, as if they were lost, to show polling finishing those waits.

Targets, for each callback side: median delay under 0.1 s, and at least 3x fewer poll
requests than polling alone.

    python benchmarks/bench_callbacks.py [--n 200] [--drop 0]     # ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Sequence
from typing import Any

import attrs
from _common import RemoteFake, median, print_table, verdict
from aiohttp import web

from nanobanana_async import NanoBananaClient, Submission
from nanobanana_async.webhooks import DEFAULT_PATH, CallbackReceiver

DURATION = (2.0, 8.0)
DEADLINE = 120.0  # seconds for one side's whole run: the script always stops
MAX_MEDIAN_DELAY = 0.1
POLL_FRACTION = 3  # a callback side makes at most 1/3 of polling alone's poll requests


@attrs.frozen
class SideResult:
    name: str
    poll_requests: int
    confirmations: int
    delays: list[float]
    client_cpu: float
    wall: float
    callbacks: int  # deliveries the receiver got, lost ones included
    resolved_by_callback: int
    wrong_urls: int


async def run_side(
    name: str, n: int, seed: int, *, callbacks: bool, verify: bool = True, drop: int = 0
) -> SideResult:
    async with RemoteFake(duration=DURATION, seed=seed) as server:  # noqa: SIM117
        async with NanoBananaClient(server.token, base_url=server.base_url) as client:
            receiver = CallbackReceiver(client, verify=verify, max_pending=max(n, 4096))
            delivered = 0

            async def lossy(request: web.Request) -> web.StreamResponse:
                nonlocal delivered
                delivered += 1
                if delivered <= drop:
                    return web.Response(text="lost")  # as if it never arrived
                return await receiver.handle(request)

            app = web.Application()
            app.router.add_post(DEFAULT_PATH, lossy)
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            try:
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                url = f"http://127.0.0.1:{runner.addresses[0][1]}{DEFAULT_PATH}"
                callback_url = receiver.callback_url(url) if callbacks else None
                submissions = await asyncio.gather(
                    *(client.generate(f"bench {i}", callback_url=callback_url) for i in range(n))
                )
                await server.reset_counts()
                returned: dict[str, float] = {}
                urls: dict[str, list[str]] = {}

                async def one(submission: Submission) -> None:
                    urls[submission.task_id] = await client.await_completion(submission)
                    returned[submission.task_id] = time.time()

                wall0, cpu0 = time.perf_counter(), time.process_time()
                async with asyncio.timeout(DEADLINE):
                    await asyncio.gather(*(one(s) for s in submissions))
                    await receiver.drain()
                wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
                counts = await server.counts()
                # The service's own records, read after counting: finish times and URLs.
                records = await client.retrieve_batch(list(returned))
            finally:
                await runner.cleanup()

    finished = {task.id: task for task in records.items}
    delays = [returned[i] - (finished[i].finished_at or float("nan")) for i in returned]
    return SideResult(
        name=name,
        poll_requests=counts.get("retrieve_batch", 0),
        confirmations=counts.get("retrieve", 0),
        delays=delays,
        client_cpu=cpu,
        wall=wall,
        callbacks=delivered,
        resolved_by_callback=receiver.stats.resolved,
        wrong_urls=sum(1 for i, u in urls.items() if u != finished[i].image_urls),
    )


def percentile(values: Sequence[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def row(side: SideResult, drop: int) -> list[Any]:
    lost = f" ({min(drop, side.callbacks)} lost)" if drop and side.callbacks else ""
    return [
        side.name,
        side.poll_requests,
        side.confirmations,
        side.poll_requests + side.confirmations,
        f"{median(side.delays):.3f}",
        f"{percentile(side.delays, 90):.3f}",
        f"{max(side.delays, default=float('nan')):.3f}",
        f"{side.callbacks}{lost}",
        side.resolved_by_callback,
        f"{side.client_cpu:.3f}",
        f"{side.wall:.1f}",
        side.wrong_urls,
    ]


async def main(args: argparse.Namespace) -> None:
    seed = 1000 + args.n  # bench_polling.py's seed for the same N: the same durations
    sides = [
        await run_side("polling alone", args.n, seed, callbacks=False),
        await run_side("callbacks, verify", args.n, seed, callbacks=True, drop=args.drop),
        await run_side(
            "callbacks, no verify", args.n, seed, callbacks=True, verify=False, drop=args.drop
        ),
    ]
    print(
        f"callbacks vs polling alone: N={args.n}, durations uniform "
        f"{DURATION[0]:g}..{DURATION[1]:g} s, default client settings, fake server in a "
        "child process; delay = waiter return - task finished_at (s)"
    )
    print_table(
        [
            "side",
            "poll requests",
            "confirmations",
            "requests",
            "median delay",
            "p90 delay",
            "max delay",
            "callbacks",
            "resolved by callback",
            "client CPU s",
            "wall s",
            "wrong URLs",
        ],
        [row(side, args.drop) for side in sides],
    )
    baseline = sides[0]
    for side in sides[1:]:
        verdict(
            f"{side.name}: median delay under {MAX_MEDIAN_DELAY:g} s",
            median(side.delays) < MAX_MEDIAN_DELAY,
            f"{median(side.delays) * 1000:.1f} ms (polling alone: "
            f"{median(baseline.delays) * 1000:.0f} ms)",
        )
        verdict(
            f"{side.name}: at least {POLL_FRACTION}x fewer poll requests than polling alone",
            side.poll_requests * POLL_FRACTION <= baseline.poll_requests,
            f"{side.poll_requests} vs {baseline.poll_requests} poll requests; "
            f"{side.poll_requests + side.confirmations} requests in all vs "
            f"{baseline.poll_requests}",
        )
        verdict(
            f"{side.name}: every waiter returns its own task's URLs",
            side.wrong_urls == 0,
            f"{args.n - side.wrong_urls}/{args.n} right",
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Callbacks versus polling alone.")
    parser.add_argument("--n", type=int, default=200, help="number of tasks")
    parser.add_argument("--drop", type=int, default=0, help="deliveries to lose on purpose")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
