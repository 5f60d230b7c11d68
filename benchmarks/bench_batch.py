"""A durable batch killed with SIGKILL and rerun until done, against the fake server (issue 10).

The fake server runs as its own process (``python -m nanobanana_async.cli fake-server``,
which prints the requests it served when stopped). ``nanobanana batch`` runs N prompts
(default 60, ``--max-in-flight 10``, tasks lasting uniform 1..3 s) into a folder, as a
process of its own, twice, each time on a fresh server:

* baseline: one run, never interrupted;
* killed: the same batch, killed with SIGKILL at K random moments (default 3; each a
  random delay after the run has started working) and run again each time, until a run
  ends with exit code 0. A run that reports jobs with an unknown outcome (killed
  during a submission) is followed by one with ``--resubmit-unknown``.

Checked at the end of each side: the manifest lists every prompt exactly once, as
succeeded, with its files present and byte for byte the image the server serves; no
partial ``.part`` file is left. Printed: submissions the server counted (the baseline's
and the killed side's, and the ratio), runs, kill moments, jobs reported with an
unknown outcome, wall time of each side and the ratio.

Targets: every check passes; the killed side's submissions are at most N + K (a kill
can lose at most the one submission in flight).

    python benchmarks/bench_batch.py [--n 60] [--kills 3] [--duration 1 3]   # ~40 s

``tests/test_batch_cli.py`` runs :func:`killed_batch` with short tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import attrs

RUN_DEADLINE = 120.0  # seconds for one batch run: the script always stops
TOKEN = "test-token"


@attrs.frozen
class Outcome:
    """What one side did and what the server counted."""

    submissions: int
    runs: int
    kills: list[float]  # seconds after the run started working
    unknown_reported: int  # jobs reported with an unknown outcome, all runs
    resubmitted_runs: int
    wall: float
    problems: list[str]  # checks that failed; empty when all passed
    counts: dict[str, int]


class FakeServerProcess:
    """``nanobanana fake-server`` in a process of its own; its counts when stopped."""

    def __init__(self, duration: tuple[float, float]) -> None:
        self.duration = duration
        self.base_url = ""
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> FakeServerProcess:
        low, high = self.duration
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nanobanana_async.cli",
            "fake-server",
            "--port",
            "0",
            "--duration",
            str(low),
            str(high),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None
        async with asyncio.timeout(30):
            while True:
                line = (await self._process.stdout.readline()).decode()
                if not line:
                    raise RuntimeError("the fake server exited before printing its base URL")
                if "base URL:" in line:
                    self.base_url = line.split()[-1]
                if line.startswith("  export "):
                    return self

    async def stop(self) -> dict[str, int]:
        """Stop it (SIGTERM) and return the requests it served, by action."""
        process = self._process
        assert process is not None
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            out, _ = await process.communicate()
        for line in out.decode().splitlines():
            if line.startswith("Requests served: "):
                counts: dict[str, int] = json.loads(line.split(": ", 1)[1])
                return counts
        raise RuntimeError("the fake server did not print its counts")

    async def __aexit__(self, *exc: object) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()


async def _run_batch(
    base_url: str,
    prompts: Path,
    folder: Path,
    max_in_flight: int,
    extra: list[str],
    kill_after: float | None,
) -> tuple[int | None, str, float | None]:
    """One ``nanobanana batch`` run: exit code (None when killed), stderr, kill moment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACEDATACLOUD_")}
    env["ACEDATACLOUD_API_TOKEN"] = TOKEN
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nanobanana_async.cli",
        "--base-url",
        base_url,
        "--poll-interval",
        "0.1",
        "batch",
        str(prompts),
        "--out",
        str(folder),
        "--max-in-flight",
        str(max_in_flight),
        *extra,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stderr is not None
    stderr: list[str] = []
    working = asyncio.Event()

    async def read() -> None:
        assert process.stderr is not None
        async for raw in process.stderr:
            line = raw.decode()
            stderr.append(line)
            if line.startswith(("submitted ", "[")):
                working.set()

    reader = asyncio.create_task(read())
    killed_at: float | None = None
    try:
        async with asyncio.timeout(RUN_DEADLINE):
            if kill_after is not None:
                await asyncio.wait(
                    [asyncio.ensure_future(working.wait()), reader],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if process.returncode is None:
                    try:
                        await asyncio.wait_for(process.wait(), kill_after)
                    except TimeoutError:
                        process.kill()  # SIGKILL: no cleanup of any kind
                        killed_at = kill_after
            await process.wait()
            await reader
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        reader.cancel()
    code = None if killed_at is not None else process.returncode
    return code, "".join(stderr), killed_at


async def killed_batch(
    workdir: Path,
    *,
    n: int = 60,
    kills: int = 3,
    duration: tuple[float, float] = (1.0, 3.0),
    max_in_flight: int = 10,
    seed: int = 0,
) -> Outcome:
    """Run a batch of ``n`` prompts, SIGKILLed ``kills`` times and rerun until it is done."""
    rng = random.Random(seed)
    prompts = workdir / "prompts.txt"
    lines = ["# a batch killed and resumed"] + [f"picture number {i}" for i in range(n)]
    await asyncio.to_thread(prompts.write_text, "\n".join(lines) + "\n", encoding="utf-8")
    folder = workdir / "out"
    # Spread the kills over the batch's expected length (tasks in waves of max_in_flight).
    expected = (n / max_in_flight) * (sum(duration) / 2) + 1.0
    started = time.monotonic()
    kill_moments: list[float] = []
    unknown = 0
    resubmitted_runs = 0
    runs = 0
    async with FakeServerProcess(duration) as server:
        extra: list[str] = []
        code: int | None = None
        while code != 0 and runs < kills + 6:
            kill_after = None
            if len(kill_moments) < kills:
                kill_after = rng.uniform(0.1, expected / (kills + 1))
            code, stderr, killed_at = await _run_batch(
                server.base_url, prompts, folder, max_in_flight, extra, kill_after
            )
            runs += 1
            if extra:
                resubmitted_runs += 1
            extra = []
            if killed_at is not None:
                kill_moments.append(killed_at)
            elif "have an unknown outcome" in stderr:
                unknown += stderr.count("OUTCOME UNKNOWN")
                extra = ["--resubmit-unknown"]
        wall = time.monotonic() - started
        problems = [] if code == 0 else [f"the last run exited {code}"]
        problems += await check_folder(folder, prompts)  # the images, as served
        counts = await server.stop()
    return Outcome(
        submissions=counts.get("generate", 0),
        runs=runs,
        kills=kill_moments,
        unknown_reported=unknown,
        resubmitted_runs=resubmitted_runs,
        wall=wall,
        problems=problems,
        counts=counts,
    )


async def check_folder(folder: Path, prompts: Path) -> list[str]:
    """Every prompt once in the manifest, succeeded, its files complete; no leftovers."""
    expected, entries, leftovers = await asyncio.to_thread(_read_folder, folder, prompts)
    problems = []
    keys = [entry["key"] for entry in entries]
    if sorted(keys) != sorted(expected) or len(set(keys)) != len(keys):
        problems.append(f"manifest keys: {len(keys)} lines, {len(set(keys))} distinct")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for entry in entries:
            if entry["state"] != "succeeded" or entry["prompt"] != expected.get(entry["key"]):
                problems.append(f"job {entry['key']}: {entry['state']} {entry['prompt']!r}")
                continue
            if len(entry["files"]) != len(entry["image_urls"]) or not entry["files"]:
                problems.append(f"job {entry['key']}: files {entry['files']}")
                continue
            for name, url in zip(entry["files"], entry["image_urls"], strict=True):
                async with http.get(url) as response:
                    served = await response.read()
                if await asyncio.to_thread(_contents, folder / name) != served:
                    problems.append(f"job {entry['key']}: {name} missing or incomplete")
    if leftovers:
        problems.append(f"partial files left: {leftovers}")
    return problems


def _read_folder(
    folder: Path, prompts: Path
) -> tuple[dict[str, str], list[dict[str, Any]], list[str]]:
    """The prompts by line number, the manifest's entries, the ``.part`` files left."""
    expected = {
        str(number): line.strip()
        for number, line in enumerate(prompts.read_text(encoding="utf-8").splitlines(), 1)
        if line.strip() and not line.startswith("#")
    }
    manifest = (folder / "manifest.jsonl").read_text(encoding="utf-8")
    entries = [json.loads(line) for line in manifest.splitlines()]
    return expected, entries, [path.name for path in folder.glob(".*.part")]


def _contents(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


async def main(args: argparse.Namespace) -> None:
    duration = (args.duration[0], args.duration[1])
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as base:
        baseline_dir = Path(base, "baseline")
        killed_dir = Path(base, "killed")
        await asyncio.to_thread(baseline_dir.mkdir)
        await asyncio.to_thread(killed_dir.mkdir)
        baseline = await killed_batch(
            baseline_dir, n=args.n, kills=0, duration=duration, seed=args.seed
        )
        killed = await killed_batch(
            killed_dir, n=args.n, kills=args.kills, duration=duration, seed=args.seed
        )
    print(f"{args.n} prompts, --max-in-flight 10, tasks {duration[0]:g}..{duration[1]:g} s")
    rows: list[tuple[str, Any, Any, str]] = [
        (
            "submissions the server counted",
            baseline.submissions,
            killed.submissions,
            f"{killed.submissions / max(baseline.submissions, 1):.2f}x",
        ),
        ("runs", baseline.runs, killed.runs, ""),
        (
            "wall time (s)",
            f"{baseline.wall:.1f}",
            f"{killed.wall:.1f}",
            f"{killed.wall / max(baseline.wall, 1e-9):.2f}x",
        ),
        ("jobs reported outcome unknown", baseline.unknown_reported, killed.unknown_reported, ""),
        ("runs with --resubmit-unknown", baseline.resubmitted_runs, killed.resubmitted_runs, ""),
    ]
    width = max(len(row[0]) for row in rows)
    print(f"{'':{width}}  {'baseline':>9}  {'killed':>9}  ratio")
    for name, a, b, ratio in rows:
        print(f"{name:{width}}  {a!s:>9}  {b!s:>9}  {ratio}")
    print(
        "kill moments (s after the run started working): "
        + ", ".join(f"{moment:.2f}" for moment in killed.kills)
    )
    print(f"server requests, killed side: {killed.counts}")
    limit = args.n + args.kills
    checks = [
        (
            "baseline: every prompt once, succeeded, files complete",
            not baseline.problems,
            "; ".join(baseline.problems[:3]) or "ok",
        ),
        (
            "killed: every prompt once, succeeded, files complete",
            not killed.problems,
            "; ".join(killed.problems[:3]) or "ok",
        ),
        (
            f"killed: at most {limit} submissions",
            killed.submissions <= limit,
            f"{killed.submissions}",
        ),
    ]
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=60, help="prompts in the batch (default 60)")
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs (default 3)")
    parser.add_argument(
        "--duration",
        type=float,
        nargs=2,
        default=[1.0, 3.0],
        metavar=("LO", "HI"),
        help="task duration range in seconds (default 1 3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    return parser.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
