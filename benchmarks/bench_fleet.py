"""Several replicas behind one URL: callbacks relayed over Redis vs not (issue 11).

The topology of a service run as replicas: R replica processes (default 4), each an
aiohttp app with a ``NanoBananaClient`` (default settings: a task submitted with a
callback is polled every 15 s), a ``CallbackReceiver`` and, on the relay side, a
``RedisRelay`` on a real ``redis-server``; a round-robin front
(``examples/fleet/front.py``) in this process; the fake server in a child process
(``_common.RemoteFake``), delivering each callback to the front, which hands it to the
next replica in turn, so it usually reaches a replica that does not hold the wait.

N tasks (default 200, lasting uniform 2..8 s, ``bench_polling.py``'s seed) are
submitted across the replicas, N/R each, all awaited at once. Two sides, one after the
other, each on fresh replicas and a fresh fake server with the same seed:

* no relay: the receivers as they are for one process (a callback for a wait held
  elsewhere is ignored: that wait ends at its lazy poll);
* relay: the same plus one ``RedisRelay`` per replica, on one Redis.

Printed per side: the median / 90th percentile / max delay between a task finishing on
the server (its record's ``finished_at``) and its waiter returning on its replica
(``time.time()`` there: same machine, same clock), ``retrieve`` requests (callback
confirmations) and ``retrieve_batch`` requests (polls), relayed records, wall time.

Targets (relay side): median delay under 0.1 s and max under 1 s, against the no-relay
median of the same run; at most N + 10 ``retrieve`` requests (one confirmation per
callback, by the replica that received it, never one per replica).

With ``--kill-redis``, a third side runs the relay again and kills ``redis-server``
1.5 s into the run, restarting it on the same port 1.5 s later (so most tasks finish
after it is back, and show the relays reconnected): every wait must still
finish (those whose callback came during the outage by lazy polling) and the relays must
reconnect by themselves.

    python benchmarks/bench_fleet.py [--n 200] [--replicas 4] [--kill-redis]
    # ~30 s, ~55 s with --kill-redis; needs redis-server (apt-get install redis-server)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import attrs
from _common import RemoteFake, median, print_table, verdict
from aiohttp import web

from nanobanana_async import NanoBananaClient, Submission, Task
from nanobanana_async.webhooks import DEFAULT_PATH, CallbackReceiver

DURATION = (2.0, 8.0)
DEADLINE = 120.0  # seconds for one side's whole run: the script always stops
MAX_MEDIAN_DELAY = 0.1
MAX_DELAY = 1.0
EXTRA_RETRIEVES = 10
FRONT = Path(__file__).resolve().parent.parent / "examples" / "fleet" / "front.py"
_SCRIPT = str(Path(__file__).resolve())


# --------------------------------------------------------------------------- one replica


async def _replica(options: dict[str, Any]) -> None:
    """A child: one replica app on a free port; prints its URL, stops at stdin's end."""
    async with NanoBananaClient(options["token"], base_url=options["base_url"]) as client:
        relay = None
        if options["redis_url"]:
            from nanobanana_async.fleet import RedisRelay

            relay = RedisRelay(client, options["redis_url"], channel=options["channel"])
            await relay.start()
        receiver = CallbackReceiver(client, secret=options["secret"], relay=relay)
        callback_url = receiver.callback_url(options["front_url"] + DEFAULT_PATH)

        async def run(request: web.Request) -> web.Response:
            """Submit ``n`` tasks with callbacks, wait on all; each one's delay figures."""
            n, prefix = (await request.json())["n"], request.query.get("prefix", "")
            submissions = await asyncio.gather(
                *(client.generate(f"{prefix} {i}", callback_url=callback_url) for i in range(n))
            )

            async def one(submission: Submission) -> dict[str, Any]:
                task = await client.wait(submission)
                return {"id": task.id, "seen": time.time(), "finished_at": task.finished_at,
                        "image_urls": task.image_urls}  # fmt: skip

            async with asyncio.timeout(DEADLINE):
                results = await asyncio.gather(*(one(s) for s in submissions))
            return web.json_response({"tasks": results})

        reconnected_at: list[float] = []  # wall times the relay came back after an outage

        async def watch() -> None:
            was_up = True
            while relay is not None:
                await asyncio.sleep(0.01)
                if relay.connected and not was_up:
                    reconnected_at.append(time.time())
                was_up = relay.connected

        watcher = asyncio.create_task(watch())

        async def stats(request: web.Request) -> web.Response:
            await receiver.drain()
            return web.json_response(
                {
                    "receiver": attrs.asdict(receiver.stats),
                    "relay": None if relay is None else attrs.asdict(relay.stats),
                    "connected": relay is not None and relay.connected,
                    "reconnected_at": reconnected_at,
                }
            )

        app = web.Application()
        app.router.add_post("/run", run)
        app.router.add_get("/stats", stats)
        receiver.add_route(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            print(json.dumps({"url": f"http://127.0.0.1:{runner.addresses[0][1]}"}), flush=True)
            loop = asyncio.get_running_loop()
            reader = asyncio.StreamReader()
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
            await reader.read()  # until the parent closes our stdin
        finally:
            watcher.cancel()
            await receiver.aclose()
            await runner.cleanup()
            if relay is not None:
                await relay.aclose()


# --------------------------------------------------------------------------- the parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port that can be killed and restarted."""

    def __init__(self, binary: str, workdir: str) -> None:
        self.binary, self.workdir, self.port = binary, workdir, _free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", self.workdir, "--daemonize", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        async with asyncio.timeout(10):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                writer.close()
                await writer.wait_closed()
                return

    async def kill(self) -> None:
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            await process.wait()


@asynccontextmanager
async def redis_server(binary: str) -> AsyncIterator[RedisServer]:
    with tempfile.TemporaryDirectory() as workdir:
        server = RedisServer(binary, workdir)
        await server.start()
        try:
            yield server
        finally:
            await server.kill()


async def outage(redis: RedisServer, after: float, down: float) -> float:
    """Kill Redis ``after`` seconds into a run, start it ``down`` seconds later; when (wall)."""
    await asyncio.sleep(after)
    await redis.kill()
    await asyncio.sleep(down)
    await redis.start()
    return time.time()


def load_front() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fleet_front", FRONT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@attrs.frozen
class SideResult:
    name: str
    delays: list[float]
    retrieves: int
    polls: int
    relayed: int
    resolved_by_relay: int
    disconnects: int
    connected_at_end: int
    reconnected_at: float | None  # when the last relay to reconnect did
    tasks: list[dict[str, Any]]
    wrong_urls: int
    wall: float


async def run_side(
    name: str,
    args: argparse.Namespace,
    redis: RedisServer | None,
    front: ModuleType,
    *,
    kill_redis: bool = False,
) -> SideResult:
    upstreams: list[str] = []
    runner = web.AppRunner(front.create_front(upstreams), access_log=None)
    await runner.setup()
    replicas: list[asyncio.subprocess.Process] = []
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        front_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with RemoteFake(duration=DURATION, seed=1000 + args.n) as server:
            options = {
                "base_url": server.base_url,
                "token": server.token,
                "front_url": front_url,
                "secret": secrets.token_urlsafe(32),  # one secret, shared by the replicas
                "redis_url": None if redis is None else redis.url,
                "channel": f"bench-fleet-{secrets.token_hex(4)}",
            }
            for _ in range(args.replicas):
                process = await asyncio.create_subprocess_exec(
                    sys.executable, _SCRIPT, "--replica", json.dumps(options),
                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
                replicas.append(process)
            for process in replicas:
                assert process.stdout is not None
                upstreams.append(json.loads(await process.stdout.readline())["url"])
            await server.reset_counts()
            base, extra = divmod(args.n, args.replicas)
            share = [base + (i < extra) for i in range(args.replicas)]
            timeout = aiohttp.ClientTimeout(total=DEADLINE)
            async with aiohttp.ClientSession(timeout=timeout) as http:

                async def post_run(url: str, n: int, i: int) -> list[dict[str, Any]]:
                    async with http.post(f"{url}/run?prefix=r{i}", json={"n": n}) as answer:
                        answer.raise_for_status()
                        tasks: list[dict[str, Any]] = (await answer.json())["tasks"]
                        return tasks

                async def get_stats(url: str) -> dict[str, Any]:
                    async with http.get(f"{url}/stats") as answer:
                        stats: dict[str, Any] = await answer.json()
                        return stats

                wall0 = time.perf_counter()
                chaos = None
                if kill_redis and redis is not None:  # down from 1.5 s to 3 s: mid-run
                    chaos = asyncio.create_task(outage(redis, 1.5, 1.5))
                runs = await asyncio.gather(
                    *(
                        post_run(u, n, i)
                        for i, (u, n) in enumerate(zip(upstreams, share, strict=True))
                    )
                )
                wall = time.perf_counter() - wall0
                if chaos is not None:
                    await chaos
                stats = await asyncio.gather(*(get_stats(u) for u in upstreams))
            counts = await server.counts()
            # The service's own records, read after counting: URLs to check against.
            tasks = [t for run in runs for t in run]
            async with NanoBananaClient(server.token, base_url=server.base_url) as client:
                truth = {
                    t.id: t for t in (await client.retrieve_batch([t["id"] for t in tasks])).items
                }
    finally:
        for process in replicas:
            if process.stdin is not None:
                process.stdin.close()
        for process in replicas:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        await runner.cleanup()
    return SideResult(
        name=name,
        delays=[t["seen"] - t["finished_at"] for t in tasks],
        retrieves=counts.get("retrieve", 0),
        polls=counts.get("retrieve_batch", 0),
        relayed=sum(s["receiver"]["relayed"] for s in stats),
        resolved_by_relay=sum(s["relay"]["resolved"] for s in stats if s["relay"]),
        disconnects=sum(s["relay"]["disconnects"] for s in stats if s["relay"]),
        connected_at_end=sum(1 for s in stats if s["connected"]),
        reconnected_at=max((t for s in stats for t in s["reconnected_at"]), default=None),
        tasks=tasks,
        wrong_urls=sum(1 for t in tasks if t["image_urls"] != _urls(truth.get(t["id"]))),
        wall=wall,
    )


def _urls(task: Task | None) -> list[str]:
    return [] if task is None else task.image_urls


def percentile(values: Sequence[float], q: int) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * q / 100))] if values else 0.0


async def main(args: argparse.Namespace) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        print("FAIL  redis-server is not on PATH (apt-get install redis-server)")
        return
    front = load_front()
    async with redis_server(binary) as redis:
        sides = [
            await run_side("no relay", args, None, front),
            await run_side("relay (Redis)", args, redis, front),
        ]
        if args.kill_redis:
            sides.append(
                await run_side("relay, Redis down 1.5..3 s", args, redis, front, kill_redis=True)
            )
    print(
        f"{args.replicas} replica processes behind a round-robin front, N={args.n} tasks "
        f"({args.n // args.replicas} per replica) lasting uniform {DURATION[0]:g}..{DURATION[1]:g}"
        " s, default client settings (callback tasks polled every 15 s), fake server in a "
        "child process; delay = waiter return on its replica - task finished_at (s)"
    )
    print_table(
        ["side", "finished", "median delay", "p90 delay", "max delay", "retrieve",
         "retrieve_batch", "relayed", "resolved by relay", "disconnects", "wrong URLs", "wall s"],
        [
            [s.name, f"{len(s.delays)}/{args.n}", f"{median(s.delays):.3f}",
             f"{percentile(s.delays, 90):.3f}", f"{max(s.delays):.3f}", s.retrieves, s.polls,
             s.relayed, s.resolved_by_relay, s.disconnects, s.wrong_urls, f"{s.wall:.1f}"]
            for s in sides
        ],
    )  # fmt: skip
    baseline, relay = sides[:2]
    ratio = median(baseline.delays) / max(median(relay.delays), 1e-9)
    verdict(
        f"relay: median delay under {MAX_MEDIAN_DELAY:g} s",
        median(relay.delays) < MAX_MEDIAN_DELAY,
        f"{median(relay.delays) * 1000:.1f} ms vs {median(baseline.delays):.2f} s without "
        f"the relay ({ratio:.0f}x shorter)",
    )
    verdict(
        f"relay: max delay under {MAX_DELAY:g} s",
        max(relay.delays) < MAX_DELAY,
        f"{max(relay.delays) * 1000:.0f} ms vs {max(baseline.delays):.2f} s without the relay",
    )
    verdict(
        f"relay: at most N + {EXTRA_RETRIEVES} retrieve requests",
        relay.retrieves <= args.n + EXTRA_RETRIEVES,
        f"{relay.retrieves} for {args.n} callbacks (no relay: {baseline.retrieves}, and "
        f"{baseline.polls} polls vs {relay.polls})",
    )
    verdict(
        "every waiter returns its own task's URLs, on every side",
        all(len(s.delays) == args.n and s.wrong_urls == 0 for s in sides),
        ", ".join(f"{s.name}: {len(s.delays) - s.wrong_urls}/{args.n}" for s in sides),
    )
    if len(sides) == 3:
        chaos = sides[2]
        back = chaos.reconnected_at or float("inf")
        # Tasks that finished once every relay was back must be relayed again.
        late = [t for t in chaos.tasks if t["finished_at"] > back]
        fast = [t for t in late if t["seen"] - t["finished_at"] < MAX_MEDIAN_DELAY]
        verdict(
            "Redis killed mid-run: no waiter lost, and the relay resumed by itself",
            len(chaos.delays) == args.n
            and chaos.connected_at_end == args.replicas
            and len(fast) == len(late) > 0,
            f"{len(chaos.delays)}/{args.n} waits finished (those whose callback came during "
            f"the outage by polling: max delay {max(chaos.delays):.1f} s); "
            f"{chaos.connected_at_end}/{args.replicas} relays connected again; "
            f"{len(fast)}/{len(late)} tasks finishing after that seen within "
            f"{MAX_MEDIAN_DELAY:g} s",
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Replicas with and without a Redis relay.")
    parser.add_argument("--n", type=int, default=200, help="number of tasks")
    parser.add_argument("--replicas", type=int, default=4, help="replica processes")
    parser.add_argument(
        "--kill-redis",
        action="store_true",
        help="a third side: kill Redis 1.5 s into the run and restart it 1.5 s later",
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replica":
        asyncio.run(_replica(json.loads(sys.argv[2])))
    else:
        asyncio.run(main(parse_args()))
