"""Shared polling vs the official SDK's ``AsyncTasks.wait``, against the fake server.

The baseline is the real official SDK (``acedatacloud``, see ``requirements.txt`` beside
this script), pointed at the same fake server: ``AsyncAceDataCloud(...).tasks.wait(id,
service="nano-banana")`` reads each task alone, at once and then every 3 s.

Scenarios (each side on a fresh fake server in a child process, with the same seed, so
the same durations; sides run one after the other):

* ``many``: N tasks (2..8 s) awaited at once on one client: this client's
  ``await_completion`` (default settings) vs N concurrent SDK waits on one SDK client.
  Targets: N=200, at least 30x fewer poll requests than the SDK, median delay at most
  0.6x the SDK's, max delay no worse; N=2000 (this client only by default), every waiter
  gets its own task's URLs with at most 150 requests.
* ``single``: 30 tasks (4..10 s), each waited on by a client of its own (a web request,
  a bot reply): ``await_completion(submission)`` on a fresh ``NanoBananaClient`` per task vs
  a fresh SDK client per task. Targets: median delay at most 0.6x the SDK's, at most 1.5x
  its requests per task.
* ``cli``: 10 tasks (4..10 s), each submitted and waited on by a process of its own,
  started 0.3 s apart: ``python -m nanobanana_async generate PROMPT --json`` vs a script
  calling the SDK's ``images.generate(prompt=..., action="generate", async_=True,
  wait=True)`` (answer at once with the task id, then poll every 3 s). The delay runs
  from the task's ``finished_at`` to the process's exit, as a shell script sees it.
  Target: median delay at most 0.6x the SDK's. For information, a third row runs the
  SDK's default, synchronous submission (no ``async``: the service holds the request
  until the image is done and answers with it). It answers sooner, but a request held
  10 to 120 s trips proxies, and a connection lost meanwhile loses the id of a task
  that is paid for, so this client never submits that way.

Delay = the waiter's return (``time.time()``) minus the task's ``finished_at`` on the
server (the same clock). Client CPU is ``time.process_time`` here (the server runs in its
own process), measured with tracemalloc off.

    pip install -r benchmarks/requirements.txt
    python benchmarks/bench_polling.py [--n 200 2000] [--sdk-max 200] [--single 30] [--cli 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
from _common import RemoteFake, RemoteTask, median, print_table, verdict

from nanobanana_async import NanoBananaClient, Submission

MANY_DURATION = (2.0, 8.0)
SINGLE_DURATION = (4.0, 10.0)
DEADLINE = 180.0  # seconds for one side's whole run: the script always stops
REQUEST_FACTOR = 30  # N=200: at least 30x fewer poll requests than the SDK
DELAY_RATIO = 0.6  # median delay at most 0.6x the SDK's
SINGLE_REQUEST_RATIO = 1.5  # single waits: at most 1.5x the SDK's requests per task
MAX_REQUESTS_2000 = 150
OPTIONS: dict[str, Any] = {}  # client options from the command line (default: none)


@attrs.frozen
class SideResult:
    name: str
    tasks: int
    requests: int
    ids_polled: int
    delays: list[float]
    client_cpu: float
    server_cpu: float
    wall: float
    wrong_urls: int
    errors: int


# A side: given the fake server and its tasks, wait on all of them; returns URLs by id.
Side = Callable[[RemoteFake, list[RemoteTask], dict[str, float]], Awaitable[dict[str, list[str]]]]


def sdk_urls(record: dict[str, Any]) -> list[str]:
    data = (record.get("response") or {}).get("data") or []
    return [item["image_url"] for item in data if isinstance(item, dict) and "image_url" in item]


async def ours_many(
    server: RemoteFake, tasks: list[RemoteTask], returned: dict[str, float]
) -> dict[str, list[str]]:
    urls: dict[str, list[str]] = {}
    async with NanoBananaClient(server.token, base_url=server.base_url, **OPTIONS) as client:

        async def one(task: RemoteTask) -> None:
            urls[task.id] = await client.await_completion(Submission(task_id=task.id))
            returned[task.id] = time.time()

        await asyncio.gather(*(one(task) for task in tasks))
    return urls


async def ours_single(
    server: RemoteFake, tasks: list[RemoteTask], returned: dict[str, float]
) -> dict[str, list[str]]:
    urls: dict[str, list[str]] = {}

    async def one(task: RemoteTask) -> None:
        # A client of its own, as a web request or a bot reply would have: the
        # submission in hand (what generate returns), then one wait.
        async with NanoBananaClient(server.token, base_url=server.base_url, **OPTIONS) as client:
            urls[task.id] = await client.await_completion(Submission(task_id=task.id))
            returned[task.id] = time.time()

    await asyncio.gather(*(one(task) for task in tasks))
    return urls


def sdk_side(per_task_client: bool) -> Side:
    async def side(
        server: RemoteFake, tasks: list[RemoteTask], returned: dict[str, float]
    ) -> dict[str, list[str]]:
        from acedatacloud import AsyncAceDataCloud  # type: ignore[import-untyped]

        urls: dict[str, list[str]] = {}
        shared = (
            None
            if per_task_client
            else AsyncAceDataCloud(api_token=server.token, base_url=server.base_url)
        )

        async def one(task: RemoteTask) -> None:
            sdk = shared or AsyncAceDataCloud(api_token=server.token, base_url=server.base_url)
            record = await sdk.tasks.wait(task.id, service="nano-banana", max_wait=DEADLINE)
            returned[task.id] = time.time()
            urls[task.id] = sdk_urls(record)

        await asyncio.gather(*(one(task) for task in tasks))
        return urls

    return side


async def run_side(
    name: str, side: Side, n: int, duration: tuple[float, float], poll: str, seed: int
) -> SideResult:
    async with RemoteFake(duration=duration, seed=seed) as server:
        before = await server.stats()
        tasks = await server.add_tasks(n)
        returned: dict[str, float] = {}
        wall0, cpu0 = time.perf_counter(), time.process_time()
        errors = 0
        try:
            async with asyncio.timeout(DEADLINE):
                urls = await side(server, tasks, returned)
        except Exception as exc:
            print(f"  {name}: failed: {exc!r}")
            urls, errors = {}, 1
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        after = await server.stats()
    counts: dict[str, int] = after["counts"]
    requests = counts.get(poll, 0) - before["counts"].get(poll, 0)
    batch_sizes: list[int] = after["batch_sizes"]
    return SideResult(
        name=name,
        tasks=n,
        requests=requests,
        ids_polled=sum(batch_sizes) if poll == "retrieve_batch" else requests,
        delays=[returned[t.id] - t.finishes_at_wall for t in tasks if t.id in returned],
        client_cpu=cpu,
        server_cpu=after["cpu"] - before["cpu"],
        wall=wall,
        wrong_urls=sum(1 for t in tasks if urls.get(t.id) != t.image_urls),
        errors=errors,
    )


# The SDK's own one-call generate-and-wait, in a process of its own like the CLI.
SDK_SCRIPT = """
import asyncio, json, sys
from acedatacloud import AsyncAceDataCloud

async def main():
    sdk = AsyncAceDataCloud(api_token=sys.argv[1], base_url=sys.argv[2])
    held = sys.argv[4] == "held"  # the SDK's default: a synchronous, held request
    record = await sdk.images.generate(
        prompt=sys.argv[3], action="generate", async_=None if held else True,
        wait=True, max_wait=120,
    )
    print(json.dumps({"id": record.get("task_id") or record.get("id")}))

asyncio.run(main())
"""
CLI_STAGGER = 0.3  # seconds between process starts: interpreter start-ups not all at once


def ours_cli(server: RemoteFake, prompt: str) -> list[str]:
    return [
        sys.executable, "-m", "nanobanana_async", "--token", server.token,
        "--base-url", server.base_url, "generate", prompt, "--json",
    ]  # fmt: skip


def sdk_cli(server: RemoteFake, prompt: str) -> list[str]:
    return [sys.executable, "-c", SDK_SCRIPT, server.token, server.base_url, prompt, "poll"]


def sdk_held_cli(server: RemoteFake, prompt: str) -> list[str]:
    return [sys.executable, "-c", SDK_SCRIPT, server.token, server.base_url, prompt, "held"]


def task_id_of(side: str, stdout: bytes) -> str:
    document = json.loads(stdout)
    return str(document["tasks"][0]["id"] if side == "ours" else document["id"])


async def run_cli_side(
    name: str, side: str, n: int, duration: tuple[float, float], seed: int
) -> SideResult:
    """``n`` processes, each submitting one task and waiting for it, 0.3 s apart."""
    command = {"ours": ours_cli, "sdk": sdk_cli, "sdk-held": sdk_held_cli}[side]
    async with RemoteFake(duration=duration, seed=seed) as server:
        before = await server.stats()
        wall0 = time.perf_counter()
        delays: list[float] = []
        wrong = errors = 0

        async def one(index: int) -> None:
            nonlocal wrong, errors
            await asyncio.sleep(index * CLI_STAGGER)
            process = await asyncio.create_subprocess_exec(
                *command(server, f"picture {index}"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            stdout, stderr = await process.communicate()
            exited = time.time()
            try:
                task = await server.task(task_id_of(side, stdout))
            except (ValueError, KeyError, IndexError) as exc:
                print(f"  {name}: process {index} failed ({exc!r}): {stderr.decode()[-300:]}")
                errors += 1
                return
            delays.append(exited - task.finishes_at_wall)
            if side == "ours" and json.loads(stdout)["tasks"][0]["image_urls"] != task.image_urls:
                wrong += 1

        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(*(one(index) for index in range(n)))
        wall = time.perf_counter() - wall0
        after = await server.stats()
    reads = ("retrieve", "retrieve_batch")
    requests = sum(after["counts"].get(a, 0) - before["counts"].get(a, 0) for a in reads)
    return SideResult(
        name=name,
        tasks=n,
        requests=requests,
        ids_polled=requests,
        delays=delays,
        client_cpu=float("nan"),  # spent in the child processes
        server_cpu=after["cpu"] - before["cpu"],
        wall=wall,
        wrong_urls=wrong + errors,
        errors=errors,
    )


def percentile(values: Sequence[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def row(scenario: str, side: SideResult) -> list[Any]:
    return [
        scenario,
        side.name,
        side.requests,
        f"{side.requests / max(side.tasks, 1):.2f}",
        f"{side.ids_polled / max(side.requests, 1):.1f}",
        f"{median(side.delays):.3f}",
        f"{percentile(side.delays, 90):.3f}",
        f"{max(side.delays, default=float('nan')):.3f}",
        f"{side.client_cpu:.3f}",
        f"{side.server_cpu:.3f}",
        f"{side.wall:.1f}",
        f"{side.tasks - side.wrong_urls}/{side.tasks}",
    ]


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


async def main(args: argparse.Namespace) -> None:
    if args.max_poll_interval is not None:
        OPTIONS["max_poll_interval"] = args.max_poll_interval
    rows: list[list[Any]] = []
    checks: list[tuple[str, bool, str]] = []
    for n in args.n:
        seed = 1000 + n
        scenario = f"many, N={n}"
        ours = await run_side("this client", ours_many, n, MANY_DURATION, "retrieve_batch", seed)
        rows.append(row(scenario, ours))
        checks.append(
            (
                f"N={n}: every waiter gets its own task's URLs",
                ours.wrong_urls == 0 and ours.errors == 0,
                f"{n - ours.wrong_urls}/{n} right",
            )
        )
        if n == 2000:
            checks.append(
                (
                    f"N=2000: at most {MAX_REQUESTS_2000} poll requests",
                    ours.requests <= MAX_REQUESTS_2000,
                    f"{ours.requests} requests",
                )
            )
        if n > args.sdk_max:
            continue
        sdk = await run_side(
            "official SDK (3 s per task)", sdk_side(False), n, MANY_DURATION, "retrieve", seed
        )
        rows.append(row(scenario, sdk))
        ours_median, sdk_median = median(ours.delays), median(sdk.delays)
        checks += [
            (
                f"N={n}: at least {REQUEST_FACTOR}x fewer poll requests than the SDK",
                ours.requests * REQUEST_FACTOR <= sdk.requests,
                f"{ours.requests} vs {sdk.requests} = 1/{sdk.requests / max(ours.requests, 1):.1f}",
            ),
            (
                f"N={n}: median delay at most {DELAY_RATIO}x the SDK's",
                ours_median <= DELAY_RATIO * sdk_median,
                f"{ours_median:.3f} s vs {sdk_median:.3f} s = {ratio(ours_median, sdk_median)}",
            ),
            (
                f"N={n}: max delay no worse than the SDK's",
                max(ours.delays, default=0) <= max(sdk.delays, default=0),
                f"{max(ours.delays, default=0):.3f} s vs {max(sdk.delays, default=0):.3f} s",
            ),
        ]
    if args.single:
        n = args.single
        scenario = f"single waits, {n} tasks"
        seed = 4000 + n
        ours = await run_side(
            "this client, one each", ours_single, n, SINGLE_DURATION, "retrieve_batch", seed
        )
        sdk = await run_side(
            "official SDK, one each", sdk_side(True), n, SINGLE_DURATION, "retrieve", seed
        )
        rows += [row(scenario, ours), row(scenario, sdk)]
        ours_median, sdk_median = median(ours.delays), median(sdk.delays)
        per_ours, per_sdk = ours.requests / n, sdk.requests / n
        checks += [
            (
                f"single waits: median delay at most {DELAY_RATIO}x the SDK's",
                ours_median <= DELAY_RATIO * sdk_median,
                f"{ours_median:.3f} s vs {sdk_median:.3f} s = {ratio(ours_median, sdk_median)}",
            ),
            (
                f"single waits: at most {SINGLE_REQUEST_RATIO}x the SDK's requests per task",
                per_ours <= SINGLE_REQUEST_RATIO * per_sdk,
                f"{per_ours:.2f} vs {per_sdk:.2f} per task = {ratio(per_ours, per_sdk)}",
            ),
            (
                "single waits: every waiter gets its own task's URLs",
                ours.wrong_urls == 0 and ours.errors == 0,
                f"{n - ours.wrong_urls}/{n} right",
            ),
        ]
    if args.cli:
        n = args.cli
        scenario = f"CLI, {n} processes"
        seed = 5000 + n
        ours = await run_cli_side("nanobanana generate", "ours", n, SINGLE_DURATION, seed)
        sdk = await run_cli_side("SDK, async + 3 s polls", "sdk", n, SINGLE_DURATION, seed)
        held = await run_cli_side("SDK, held request (info)", "sdk-held", n, SINGLE_DURATION, seed)
        rows += [row(scenario, ours), row(scenario, sdk), row(scenario, held)]
        ours_median, sdk_median = median(ours.delays), median(sdk.delays)
        checks += [
            (
                f"CLI: median delay to the process's exit at most {DELAY_RATIO}x the SDK's",
                ours_median <= DELAY_RATIO * sdk_median,
                f"{ours_median:.3f} s vs {sdk_median:.3f} s = {ratio(ours_median, sdk_median)}",
            ),
            (
                "CLI: every process prints its own task's URLs",
                ours.wrong_urls == 0 and ours.errors == 0 and sdk.errors + held.errors == 0,
                f"{n - ours.wrong_urls}/{n} right",
            ),
        ]

    print(
        "this client vs the official SDK's AsyncTasks.wait: fake server in a child process; "
        "delay = waiter return - task finished_at (s)"
    )
    print_table(
        [
            "scenario",
            "side",
            "poll requests",
            "per task",
            "ids/request",
            "median delay",
            "p90 delay",
            "max delay",
            "client CPU s",
            "server CPU s",
            "wall s",
            "right URLs",
        ],
        rows,
    )
    for name, ok, detail in checks:
        verdict(name, ok, detail)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, nargs="*", default=[200, 2000], help="task counts")
    parser.add_argument(
        "--sdk-max", type=int, default=200, help="largest N also run through the SDK"
    )
    parser.add_argument(
        "--single", type=int, default=30, help="single-wait tasks (0: skip that scenario)"
    )
    parser.add_argument(
        "--cli", type=int, default=10, help="CLI processes, one task each (0: skip)"
    )
    parser.add_argument(
        "--max-poll-interval", type=float, help="this client's max_poll_interval (default: its own)"
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
