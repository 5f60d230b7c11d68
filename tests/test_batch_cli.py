"""``nanobanana batch``: in process, as a subprocess, and killed with SIGKILL and resumed."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest

from nanobanana_async.cli._main import main_async
from nanobanana_async.testing import FakeNanoBanana

WAIT = 20.0
ENV_VARS = ("ACEDATACLOUD_API_TOKEN", "ACEDATACLOUD_API_BASE_URL")
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_bench() -> ModuleType:
    """``benchmarks/bench_batch.py``, imported by path: the test runs its scenario."""
    spec = importlib.util.spec_from_file_location("bench_batch", BENCHMARKS / "bench_batch.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_batch"] = module
    spec.loader.exec_module(module)
    return module


@attrs.frozen
class Result:
    code: int
    out: str
    err: str

    @property
    def doc(self) -> Any:
        return json.loads(self.out)


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


async def run_cli(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], *args: str, stdin: str = ""
) -> Result:
    argv = ["--token", server.token, "--base-url", server.base_url, "--poll-interval", "0.02"]
    capsys.readouterr()
    async with asyncio.timeout(WAIT):
        code = await main_async([*argv, *args], stdin=io.StringIO(stdin))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


async def run_batch(
    server: FakeNanoBanana,
    capsys: pytest.CaptureFixture[str],
    prompts: Path,
    out: Path,
    *args: str,
) -> Result:
    """``nanobanana batch PROMPTS --out OUT [ARGS]``, run in this event loop."""
    return await run_cli(server, capsys, "batch", str(prompts), "--out", str(out), *args)


def write_prompts(folder: Path, prompts: list[str], name: str = "prompts.txt") -> Path:
    path = folder / name
    path.write_text("# my prompts\n\n" + "\n".join(prompts) + "\n", encoding="utf-8")
    return path


def manifest(folder: Path) -> list[dict[str, Any]]:
    lines = (folder / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


async def test_batch_runs_and_a_rerun_has_nothing_to_do(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path, ["a cat", "a dog", "a bird"])
    out = tmp_path / "out"
    result = await run_batch(server, capsys, prompts, out, "--json")
    assert result.code == 0, result.err
    doc = result.doc
    assert doc["summary"]["succeeded"] == 3
    assert doc["summary"]["submitted"] == 3
    assert doc["manifest"] == str(out / "manifest.jsonl")
    assert [job["key"] for job in doc["jobs"]] == ["3", "4", "5"]  # line numbers
    assert [job["files"] for job in doc["jobs"]] == [["3-0.png"], ["4-0.png"], ["5-0.png"]]
    assert (out / ".nanobanana" / "journal.sqlite3").is_file()
    assert len(manifest(out)) == 3
    assert result.err.count("submitted job") == 3

    again = await run_batch(server, capsys, prompts, out)
    assert again.code == 0
    assert "3 succeeded" in again.out
    assert "3 finished earlier" in again.out
    assert server.counts["generate"] == 3


async def test_batch_options_jsonl_jobs_and_no_download(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    jobs = [
        {"prompt": "a cat", "key": "cat"},
        {"prompt": "make it blue", "image_urls": ["https://example.com/a.png"], "count": 2},
    ]
    text = "\n".join(json.dumps(job) for job in jobs)
    out = tmp_path / "out"
    result = await run_cli(
        server, capsys, "batch", "-", "--out", str(out), "--aspect-ratio", "16:9",
        "--no-download", "--json", stdin=text,
    )  # fmt: skip
    assert result.code == 0, result.err
    cat, blue = result.doc["jobs"]
    assert cat["key"] == "cat"
    assert cat["options"] == {"aspect_ratio": "16:9"}
    assert blue["key"] == "2"
    assert blue["action"] == "edit"
    assert blue["options"] == {"aspect_ratio": "16:9", "count": 2}
    assert len(blue["image_urls"]) == 2
    assert blue["files"] == []
    assert server.tasks[blue["task_id"]].request["image_urls"] == ["https://example.com/a.png"]
    assert sorted(path.name for path in out.iterdir()) == [".nanobanana", "manifest.jsonl"]


async def test_a_changed_prompts_file_is_reported_and_nothing_submitted(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path, ["a cat", "a dog"])
    out = tmp_path / "out"
    assert (await run_batch(server, capsys, prompts, out)).code == 0
    write_prompts(tmp_path, ["a cat", "a wolf", "a new one"])
    result = await run_batch(server, capsys, prompts, out)
    assert result.code == 2
    assert result.out == ""
    assert f"{prompts} changed since the batch in {out}" in result.err
    assert "job 4: was 'a dog', now 'a wolf'" in result.err
    assert "Nothing was submitted" in result.err
    assert server.counts["generate"] == 2
    # The same prompts with another option are a change too.
    write_prompts(tmp_path, ["a cat", "a dog"])
    result = await run_batch(server, capsys, prompts, out, "--count", "2")
    assert result.code == 2
    assert "options was {}, now {'count': 2}" in result.err


async def test_a_removed_line_is_a_change_that_keeps_its_task_in_view(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Found in review: lines removed from the end vanished from the manifest, their
    paid tasks with them, and the run said all was done."""
    prompts = write_prompts(tmp_path, ["a cat", "a dog", "a fox"])
    out = tmp_path / "out"
    assert (await run_batch(server, capsys, prompts, out)).code == 0
    task_id = next(line["task_id"] for line in manifest(out) if line["prompt"] == "a fox")
    write_prompts(tmp_path, ["a cat", "a dog"])
    result = await run_batch(server, capsys, prompts, out)
    assert result.code == 2
    assert f"job 5: was 'a fox', now missing from the input (its task {task_id}" in result.err
    assert len(manifest(out)) == 3  # untouched
    assert server.counts["generate"] == 3


async def test_input_that_is_not_utf8_or_has_odd_line_breaks(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Found in review: bytes that are not UTF-8 on stdin failed the batch after a
    paid submission; a U+2028 in a line made two (paid) jobs of it."""
    out = tmp_path / "out"
    # What a stream read with surrogateescape gives for the bytes b"\xff\xfe".
    garbled = "a cat\n\udcff\udcfe bad\n"
    result = await run_cli(server, capsys, "batch", "-", "--out", str(out), stdin=garbled)
    assert result.code == 2
    assert "stdin is not UTF-8 text" in result.err
    result = await run_cli(server, capsys, "generate", "-", "--no-wait", stdin="a cat \udcff")
    assert result.code == 2
    assert not server.counts
    prompts = tmp_path / "odd.txt"
    prompts.write_text("a cat\u2028in a hat\r\na dog\x0c\n", encoding="utf-8")
    result = await run_batch(server, capsys, prompts, out, "--json")
    assert result.code == 0, result.err
    assert [job["key"] for job in result.doc["jobs"]] == ["1", "2"]
    assert server.counts["generate"] == 2


async def test_a_journal_that_is_not_one_is_a_usage_error(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path, ["a cat"])
    out = tmp_path / "out"
    (out / ".nanobanana").mkdir(parents=True)
    (out / ".nanobanana" / "journal.sqlite3").write_bytes(b"garbage, not SQLite" * 100)
    result = await run_batch(server, capsys, prompts, out)
    assert result.code == 2
    assert "cannot be used as a batch journal" in result.err
    assert "unexpected" not in result.err
    assert not server.counts


async def test_raised_retries_are_announced_as_new_submissions(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path, ["fine", "upstream trouble [fail:top]"])
    out = tmp_path / "out"
    assert (await run_batch(server, capsys, prompts, out)).code == 1
    result = await run_batch(server, capsys, prompts, out, "--retries", "1")
    assert "1 to submit again (each a new paid submission)" in result.err
    assert "submitted job 4 again" in result.err
    assert server.counts["generate"] == 3


async def test_an_unknown_outcome_is_reported_with_its_prompt(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    prompts = write_prompts(tmp_path, ["a cat [blue]", "a dog"])
    out = tmp_path / "out"
    server.inject("error", action="generate")
    result = await run_batch(server, capsys, prompts, out)
    assert result.code == 1
    assert "OUTCOME UNKNOWN for prompt 'a cat [blue]'" in result.err
    assert "outcome_unknown" in result.out
    assert "a cat [blue]" in result.out  # shown as written, not read as rich markup
    assert "--resubmit-unknown" in result.err
    result = await run_batch(server, capsys, prompts, out, "--resubmit-unknown")
    assert result.code == 0, result.err
    assert server.counts["generate"] == 3


async def test_batch_usage_errors(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = str(tmp_path / "out")
    empty = write_prompts(tmp_path, [], name="empty.txt")
    assert "no prompts in" in (await run_cli(server, capsys, "batch", str(empty), "--out", out)).err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "colour": "red"}\n', encoding="utf-8")
    result = await run_cli(server, capsys, "batch", str(bad), "--out", out)
    assert result.code == 2
    assert "bad.jsonl, line 1: unknown field(s) ['colour']" in result.err
    result = await run_cli(server, capsys, "batch", str(tmp_path / "nope.txt"), "--out", out)
    assert result.code == 2
    assert "prompts file not found" in result.err
    assert not server.counts


# --- as a subprocess: signals and SIGKILL ------------------------------------------------


async def spawn_batch(server: FakeNanoBanana, *args: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["ACEDATACLOUD_API_TOKEN"] = server.token
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nanobanana_async.cli", "--base-url", server.base_url,
        "--poll-interval", "0.02", "batch", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip


async def finish(process: asyncio.subprocess.Process) -> Result:
    try:
        async with asyncio.timeout(WAIT):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


@pytest.mark.parametrize(
    ("stop", "code", "word"),
    [(signal.SIGTERM, 143, "Terminated"), (signal.SIGINT, 130, "Interrupted")],
)
async def test_a_signal_stops_the_batch_cleanly_and_it_resumes(
    tmp_path: Path, stop: signal.Signals, code: int, word: str
) -> None:
    prompts = write_prompts(tmp_path, [f"picture {n}" for n in range(6)])
    out = tmp_path / "out"
    async with FakeNanoBanana(duration=60.0) as server:
        process = await spawn_batch(server, str(prompts), "--out", str(out), "--max-in-flight", "3")
        try:
            async with asyncio.timeout(WAIT):
                while server.counts["generate"] < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            process.send_signal(stop)
        finally:
            result = await finish(process)
        assert result.code == code, result.err
        assert "Traceback" not in result.err
        assert f"{word}. The journal is consistent" in result.err
        assert f"Resume with: nanobanana --base-url {server.base_url}" in result.err
        assert f"batch {prompts} --out {out} --max-in-flight 3" in result.err
        assert server.token not in result.err
        submitted = server.counts["generate"]
        lines = manifest(out)
        assert len(lines) == 6
        assert {line["task_id"] for line in lines if line["task_id"]} == set(server.tasks)
        assert all(line["state"] == "pending" for line in lines)

        for task_id in server.tasks:
            server.finish(task_id)
        finisher = asyncio.create_task(_finish_everything(server))
        try:
            result = await finish(await spawn_batch(server, str(prompts), "--out", str(out)))
        finally:
            finisher.cancel()
            await asyncio.wait([finisher])
        assert result.code == 0, result.err
        assert f"{submitted} submitted earlier (waiting on them)" in result.err
        assert server.counts["generate"] == 6
        assert [line["state"] for line in manifest(out)] == ["succeeded"] * 6


async def _finish_everything(server: FakeNanoBanana) -> None:
    while True:
        for task_id in list(server.tasks):
            server.finish(task_id)
        await asyncio.sleep(0.01)


async def test_killed_three_times_it_still_completes_and_pays_at_most_once_more_per_kill(
    tmp_path: Path,
) -> None:
    """The issue's scenario: the fake server in its own process, 60 prompts, 10 in
    flight, SIGKILL at three random moments, rerun until done (short tasks here;
    ``benchmarks/bench_batch.py`` runs it with tasks of 1..3 s)."""
    bench = load_bench()
    async with asyncio.timeout(100):
        outcome = await bench.killed_batch(
            tmp_path, n=60, kills=3, duration=(0.2, 0.6), max_in_flight=10, seed=1
        )
    assert outcome.problems == []
    assert len(outcome.kills) == 3
    assert outcome.submissions <= 60 + 3
