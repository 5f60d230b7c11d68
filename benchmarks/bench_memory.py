"""Memory and CPU per parked waiter, and the poller's CPU per round vs watched entries.

Part 1: 10,000 concurrent ``client.wait(id, timeout=600)`` tasks on 10,000 pending tasks
(``add_task(duration=3600)`` on the fake server, run in a child process so tracemalloc
sees the client alone). Bytes per waiter = growth of tracemalloc's traced memory from
before the waiting tasks exist to after they are parked and every task has been polled
once (so each waiter also holds its last record). Baseline in the same run: a bare
``asyncio`` task parked on a future under ``asyncio.timeout``. Target: at most 2,048
bytes per waiter. Then, with tracemalloc off, the client's CPU per 50-id request while
its poll loop reads those waiters within the default budget (20 requests/s): the median
of 5 windows, beside a bare ``aiohttp`` + ``json.loads`` loop doing the same requests at
the same pace in the same run (5 windows before the waiters exist, 5 after they are
gone). Targets: at most 1.5x the bare loop's CPU per request, and the request rate
within the budget. Then every waiter is cancelled; the memory left behind (under 256 B
per waiter counts as clean), whether any id is still watched and whether the poll loop
stopped are checked.

Part 2: the poller's CPU per round, driving ``nanobanana_async._poller.Poller`` directly
with a fake ``fetch`` that answers pending records at once. ``watched`` entries are
waited on, of which ``due`` (one batch) are eager and polled every millisecond, the rest
lazy (next poll in an hour), so each round polls the same number of entries while the
number watched grows 20x. CPU per round = ``time.process_time`` over many rounds /
rounds. Target: largest / smallest CPU per round under 3x. A second table keeps 10,000
watched and grows the number due, to show the cost follows the due entries.

    python benchmarks/bench_memory.py [--waiters 10000] [--watched 1000 5000 10000 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import aiohttp
from _common import RemoteFake, fmt_ratio, median, print_table, verdict

from nanobanana_async import NanoBananaClient, RetryPolicy, Task
from nanobanana_async._poller import Poller, Target

BYTES_TARGET = 2048
CPU_PER_REQUEST_TARGET = 1.5
RATE = 20  # the client's default max_requests_per_second
LEFT_TARGET = 256  # bytes per waiter still allocated after every waiter was cancelled
CPU_RATIO_TARGET = 3.0
BATCH = 50


# --------------------------------------------------------------------------- part 1


async def traced() -> int:
    """Traced bytes once the loop has run its pending callbacks and garbage is collected.

    Cancelled tasks and timer handles are only let go one loop iteration later.
    """
    for _ in range(3):
        await asyncio.sleep(0)
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def bare_bytes_per_task(n: int) -> float:
    """Baseline: bytes per plain asyncio task parked on a shared future with a timeout."""
    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()

    async def park() -> None:
        async with asyncio.timeout(600):
            await asyncio.shield(gate)

    before = await traced()
    tasks = [asyncio.create_task(park()) for _ in range(n)]
    for _ in range(5):
        await asyncio.sleep(0)
    grown = await traced() - before
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return grown / n


async def bare_cpu_per_request(
    server: RemoteFake, batches: list[list[str]], rate: int, seconds: float, windows: int
) -> tuple[list[float], int]:
    """Baseline: a bare aiohttp session + ``json.loads`` doing the same 50-id requests at
    the poll loop's pace (bursts of ``rate / 4`` requests, four a second); CPU seconds
    per request in each of ``windows`` windows of ``seconds``, and the requests made."""
    url = server.base_url + "/nano-banana/tasks"
    headers = {"authorization": f"Bearer {server.token}", "content-type": "application/json"}
    done = 0
    burst = max(1, rate // 4)
    per_window: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def one(ids: list[str]) -> None:
            body = json.dumps({"action": "retrieve_batch", "ids": ids}).encode()
            async with session.post(url, data=body, headers=headers) as response:
                json.loads(await response.read())

        await asyncio.gather(*(one(batch) for batch in batches[:burst]))  # warm up
        loop = asyncio.get_running_loop()
        for _ in range(windows):
            cpu0, start, before = time.process_time(), loop.time(), done
            beat = 0
            while loop.time() - start < seconds:
                chunk = [batches[(done + i) % len(batches)] for i in range(burst)]
                await asyncio.gather(*(one(batch) for batch in chunk))
                done += burst
                beat += 1
                await asyncio.sleep(max(0.0, start + beat * burst / rate - loop.time()))
            per_window.append((time.process_time() - cpu0) / (done - before))
    return per_window, done


async def waiter_memory(n: int, cpu_seconds: float, windows: int) -> None:
    async with RemoteFake(duration=3600.0) as server:
        ids = [task.id for task in await server.add_tasks(n, duration=3600.0)]
        batches = [ids[i : i + BATCH] for i in range(0, n, BATCH)]
        bare_before, _ = await bare_cpu_per_request(server, batches, RATE, cpu_seconds, windows)
        async with NanoBananaClient(server.token, base_url=server.base_url) as client:
            # Warm up once: session, connection pool, code paths, a first poll loop.
            await client.retrieve(ids[0])
            warm = await server.add_tasks(1, duration=0.0)
            await client.wait(warm[0].id, timeout=30)
            await server.reset_counts()

            tracemalloc.start(1)
            try:
                await bare_bytes_per_task(n)  # grows asyncio's task set once, unmeasured
                bare = await bare_bytes_per_task(n)
                before = await traced()
                snap_before = tracemalloc.take_snapshot()
                waiters = [asyncio.create_task(client.wait(i, timeout=600)) for i in ids]
                for _ in range(5):
                    await asyncio.sleep(0)
                parked = await traced()
                # Let one full poll round go out (every id read once), and be taken in.
                polled_started = time.perf_counter()
                while True:
                    stats = await server.stats()
                    if sum(stats["batch_sizes"]) >= n:
                        break
                    if time.perf_counter() - polled_started > 60:
                        raise RuntimeError("the first poll round did not finish in 60 s")
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                polled = await traced()
                snap_polled = tracemalloc.take_snapshot()
            finally:
                tracemalloc.stop()
            stats = await server.stats()

            # CPU per request with tracemalloc off, the waiters parked and polled by the
            # budget: the client's CPU in each window, over the requests the server saw.
            gc.collect()
            ours_windows: list[float] = []
            first = await server.stats()
            wall0 = time.perf_counter()
            for _ in range(windows):
                window_start = await server.stats()
                cpu0 = time.process_time()
                await asyncio.sleep(cpu_seconds)
                cpu = time.process_time() - cpu0
                window_end = await server.stats()
                made = (
                    window_end["counts"]["retrieve_batch"]
                    - window_start["counts"]["retrieve_batch"]
                )
                ours_windows.append(cpu / max(made, 1))
            last = await server.stats()
            wall = time.perf_counter() - wall0
            polls = last["counts"]["retrieve_batch"] - first["counts"]["retrieve_batch"]
            sent = last["batch_times"][len(first["batch_times"]) :]  # the server's clock
            busiest = max(
                (sum(1 for t in sent if start <= t < start + 1.0) for start in sent), default=0
            )
            ours_cpu = median(ours_windows)
            ids_polled = sum(last["batch_sizes"][len(first["batch_sizes"]) :])
            still_waiting = sum(1 for w in waiters if not w.done())

            cancel_started = time.perf_counter()
            for waiter in waiters:
                waiter.cancel()
            outcomes = await asyncio.gather(*waiters, return_exceptions=True)
            cancel_seconds = time.perf_counter() - cancel_started
            cancelled = sum(1 for o in outcomes if isinstance(o, asyncio.CancelledError))
            del outcomes, waiters  # they hold the exceptions, hence the waiters' frames
            tracemalloc.start(1)
            after_cancel = await traced()
            snap_after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            poller = client._poller  # private, read for diagnosis only
            loop_stopped = poller._task is None or poller._task.done()
            still_watched = sum(1 for i in ids if poller.watching(i))
            heap_left = len(poller._eager) + len(poller._lazy)
        bare_after, bare_requests = await bare_cpu_per_request(
            server, batches, RATE, cpu_seconds, windows
        )

    bare_cpu = median(bare_before + bare_after)
    print(
        f"{n} waiters parked on pending tasks, polled within the default budget "
        f"({RATE} requests/s): client CPU per {BATCH}-id request, tracemalloc off, "
        f"median of {windows} windows of {cpu_seconds:g} s (the bare loop's: "
        f"{windows} before the waiters, {windows} after)"
    )
    print_table(
        ["side", "requests", "CPU us/request", "vs bare"],
        [
            [
                "bare aiohttp + json.loads (baseline, before and after)",
                bare_requests,
                f"{bare_cpu * 1e6:.0f}",
                "1.00x",
            ],
            [
                "this client's poll loop",
                polls,
                f"{ours_cpu * 1e6:.0f}",
                fmt_ratio(ours_cpu / bare_cpu),
            ],
        ],
    )
    rate = polls / wall
    print(
        f"poll loop over {wall:.1f} s: {polls} requests ({rate:.1f}/s), {ids_polled} ids "
        f"({ids_polled / max(polls, 1):.1f} per request); "
        f"waiters still waiting: {still_waiting}/{n}"
    )
    verdict(
        f"client CPU per {BATCH}-id request at most {CPU_PER_REQUEST_TARGET}x the bare loop's",
        ours_cpu <= CPU_PER_REQUEST_TARGET * bare_cpu,
        f"{ours_cpu * 1e6:.0f} us vs {bare_cpu * 1e6:.0f} us = {fmt_ratio(ours_cpu / bare_cpu)}",
    )
    verdict(
        f"request rate within the budget: at most {RATE} in any one-second window",
        busiest <= RATE,
        f"busiest second (by the server's clock): {busiest} requests; "
        f"{polls} requests in {wall:.1f} s",
    )
    print()
    per_parked = (parked - before) / n
    per_polled = (polled - before) / n
    left = (after_cancel - before) / n
    print(f"{n} waiters on pending tasks: tracemalloc bytes per waiter")
    print_table(
        ["stage", "bytes/waiter", "vs bare parked task"],
        [
            ["bare task + timeout + shield (baseline)", f"{bare:.0f}", "1.00x"],
            [
                "client.wait parked (before any poll)",
                f"{per_parked:.0f}",
                fmt_ratio(per_parked / bare),
            ],
            [
                "client.wait after one poll round",
                f"{per_polled:.0f}",
                fmt_ratio(per_polled / bare),
            ],
            ["left after cancelling all", f"{left:.0f}", "-"],
        ],
    )
    print(
        f"poll requests in that round: {stats['counts'].get('retrieve_batch', 0)} retrieve_batch; "
        f"waiters still waiting before cancel: {still_waiting}/{n}"
    )
    print(
        f"cancel: {cancelled}/{n} cancelled in {cancel_seconds:.2f} s; ids still watched: "
        f"{still_watched}; poll loop stopped: {loop_stopped}; "
        f"items left in the poller's heaps (Poller._eager, Poller._lazy): {heap_left}"
    )
    for title, snap in (("after one poll round", snap_polled), ("after cancel", snap_after)):
        print(f"largest growths {title}, by line allocated (bytes/waiter):")
        for stat in snap.compare_to(snap_before, "lineno")[:6]:
            frame = stat.traceback[0]
            where = "/".join(frame.filename.split("/")[-2:])
            print(f"  {stat.size_diff / n:8.0f}  {where}:{frame.lineno}")
    verdict(
        f"under {BYTES_TARGET} bytes per parked waiter (after one poll round)",
        per_polled < BYTES_TARGET,
        f"{per_polled:.0f} bytes/waiter ({per_parked:.0f} before the first poll)",
    )
    verdict(
        "clean cancel (all cancelled, nothing watched, loop stopped, "
        f"< {LEFT_TARGET} B/waiter kept)",
        cancelled == n
        and still_watched == 0
        and loop_stopped
        and still_waiting == n
        and left < LEFT_TARGET,
        f"{cancelled}/{n} cancelled, {still_watched} still watched, loop stopped: {loop_stopped}, "
        f"{left:.0f} bytes/waiter still allocated, {heap_left} heap items left",
    )


# --------------------------------------------------------------------------- part 2


def pending_record(task_id: str) -> dict[str, Any]:
    return {
        "id": task_id,
        "created_at": 1757183036.787,
        "type": "images",
        "trace_id": task_id,
        "request": {"action": "generate", "prompt": "a test image", "async": True},
        "response": {"success": True, "task_id": task_id, "trace_id": task_id},
    }


def itself(task: Task) -> Task:
    return task


async def round_cpu(watched: int, due: int, rounds: int) -> float:
    """CPU seconds per poll round with ``watched`` entries of which ``due`` are polled."""
    records = {f"task-{i:06d}": pending_record(f"task-{i:06d}") for i in range(watched)}
    fetched = 0
    goal = 0
    reached = asyncio.Event()

    async def fetch(ids: list[str]) -> dict[str, Any]:
        nonlocal fetched
        fetched += 1
        if fetched >= goal:
            reached.set()
        return {i: records[i] for i in ids}

    async def until(count: int) -> None:
        nonlocal goal
        goal = count
        reached.clear()
        if fetched < goal:
            await reached.wait()

    poller = Poller(
        fetch,
        batch_size=BATCH,
        poll_interval=0.001,
        max_poll_interval=0.001,
        not_found_grace=30.0,
        lazy_poll_interval=3600.0,
        retry=RetryPolicy(),
        max_requests_per_second=10_000,
    )
    ids = list(records)
    waiters = [
        asyncio.create_task(poller.wait(Target(i, lazy=n >= due), itself, timeout=600))
        for n, i in enumerate(ids)
    ]
    requests_per_round = -(-due // BATCH)
    try:
        async with asyncio.timeout(120):
            await until(20 * requests_per_round)  # warm up
            start_fetched, start_cpu = fetched, time.process_time()
            await until(start_fetched + rounds * requests_per_round)
            cpu = time.process_time() - start_cpu
            done_rounds = (fetched - start_fetched) / requests_per_round
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        await poller.aclose()
    return cpu / done_rounds


async def poller_cpu(
    watched_sizes: list[int], due_sizes: list[int], rounds: int, repeat: int
) -> None:
    gc.collect()
    per_size: dict[int, list[float]] = {w: [] for w in watched_sizes}
    for _ in range(repeat):  # sizes interleaved, medians taken
        for watched in watched_sizes:
            cpu = await round_cpu(watched, BATCH, rounds)
            per_size[watched].append(cpu)
    base = median(per_size[watched_sizes[0]])
    rows = []
    for watched in watched_sizes:
        cpu = median(per_size[watched])
        rows.append(
            [
                watched,
                BATCH,
                f"{cpu * 1e6:.0f}",
                f"{cpu / BATCH * 1e6:.2f}",
                fmt_ratio(cpu / base),
            ]
        )
    print(
        f"poller CPU per round (fake fetch, {BATCH} due per round, {rounds} rounds, "
        f"median of {repeat})"
    )
    print_table(
        ["watched", "due/round", "CPU us/round", "CPU us/due entry", f"vs {watched_sizes[0]}"],
        rows,
    )
    fixed = 10_000
    rows = []
    by_due: dict[int, float] = {}
    for due in due_sizes:
        samples = [await round_cpu(fixed, due, rounds) for _ in range(repeat)]
        by_due[due] = median(samples)
    for due in due_sizes:
        cpu = by_due[due]
        rows.append([fixed, due, f"{cpu * 1e6:.0f}", f"{cpu / due * 1e6:.2f}"])
    print(f"poller CPU per round with {fixed} watched, growing the due entries")
    print_table(["watched", "due/round", "CPU us/round", "CPU us/due entry"], rows)
    largest = max(median(v) for v in per_size.values())
    smallest = min(median(v) for v in per_size.values())
    growth = watched_sizes[-1] / watched_sizes[0]
    verdict(
        f"CPU per round stays flat as watched entries grow {growth:g}x",
        largest / smallest < CPU_RATIO_TARGET,
        f"largest/smallest {fmt_ratio(largest / smallest)} (target < {CPU_RATIO_TARGET:g}x)",
    )


async def main(args: argparse.Namespace) -> None:
    await waiter_memory(args.waiters, args.cpu_seconds, args.windows)
    print()
    await poller_cpu(args.watched, args.due, args.rounds, args.repeat)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--waiters", type=int, default=10_000, help="concurrent waiters (part 1)")
    parser.add_argument(
        "--cpu-seconds", type=float, default=3.0, help="length of each CPU window (part 1)"
    )
    parser.add_argument("--windows", type=int, default=5, help="CPU windows per side (part 1)")
    parser.add_argument(
        "--watched",
        type=int,
        nargs="+",
        default=[1_000, 5_000, 10_000, 20_000],
        help="watched entries (part 2)",
    )
    parser.add_argument(
        "--due", type=int, nargs="+", default=[50, 200, 1000], help="due entries per round"
    )
    parser.add_argument("--rounds", type=int, default=300, help="rounds timed per setting")
    parser.add_argument("--repeat", type=int, default=3, help="repeats per setting (median)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
