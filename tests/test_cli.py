"""The ``nanobanana`` command line, in-process and as a subprocess, against the fake server."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from nanobanana_async import NanoBananaClient, RetryPolicy
from nanobanana_async.cli import main
from nanobanana_async.cli._commands import _first_look
from nanobanana_async.cli._console import Output
from nanobanana_async.cli._context import Context
from nanobanana_async.cli._main import main_async
from nanobanana_async.testing import FakeNanoBanana, make_png

WAIT = 20.0  # upper bound on every wait here; nothing should come close
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ENTRY_KEYS = {"id", "state", "prompt", "image_urls", "error", "files", "elapsed"}
ENV_VARS = ("ACEDATACLOUD_API_TOKEN", "ACEDATACLOUD_API_BASE_URL")


@attrs.frozen
class Result:
    code: int
    out: str
    err: str

    @property
    def doc(self) -> Any:
        return json.loads(self.out)

    @property
    def tasks(self) -> list[dict[str, Any]]:
        tasks: list[dict[str, Any]] = self.doc["tasks"]
        for entry in tasks:
            assert set(entry) == ENTRY_KEYS
        return tasks


@pytest.fixture(autouse=True)
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read a real token or base URL from the environment."""
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def slow_server() -> AsyncIterator[FakeNanoBanana]:
    """A fake server whose tasks take far longer than any test waits."""
    async with FakeNanoBanana(duration=60.0) as fake:
        yield fake


Cli = Callable[..., Any]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run the command line in this event loop against a server; returns a Result."""

    async def run(server: FakeNanoBanana | None, *args: str, stdin: str = "") -> Result:
        options = []
        if server is not None:
            options = ["--token", server.token, "--base-url", server.base_url]
        argv = [*options, "--poll-interval", "0.02", *args]
        capsys.readouterr()
        async with asyncio.timeout(WAIT):
            code = await main_async(argv, stdin=io.StringIO(stdin))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def one_line_error(result: Result) -> str:
    """The stderr error line; checks there is exactly one and no traceback."""
    assert "Traceback" not in result.err
    lines = [line for line in result.err.splitlines() if line.startswith("nanobanana: error:")]
    assert len(lines) == 1, result.err
    return lines[0]


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (server counters and captured output signal no event)."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def listing(folder: Path) -> list[Path]:
    """Everything in ``folder``, hidden files included, sorted."""
    return sorted(folder.iterdir())


# --- generate ---------------------------------------------------------------------------


async def test_generate_prints_urls(cli: Cli, server: FakeNanoBanana) -> None:
    result = await cli(server, "generate", "a cat", "--count", "2")
    assert result.code == 0
    (task_id,) = server.tasks
    assert result.out.split() == server.tasks[task_id].image_urls
    assert f"Task {task_id} succeeded" in result.err


async def test_generate_json_sends_options(cli: Cli, server: FakeNanoBanana) -> None:
    result = await cli(
        server,
        "generate",
        "a cat",
        "--model",
        "nano-banana-pro",
        "--aspect-ratio",
        "16:9",
        "--resolution",
        "2K",
        "--count",
        "3",
        "--json",
    )
    assert result.code == 0
    (entry,) = result.tasks
    task = server.tasks[entry["id"]]
    assert task.request == {
        "action": "generate",
        "prompt": "a cat",
        "model": "nano-banana-pro",
        "aspect_ratio": "16:9",
        "resolution": "2K",
        "count": 3,
        "async": True,
    }
    assert entry["state"] == "succeeded"
    assert entry["image_urls"] == task.image_urls
    assert entry["error"] is None
    assert entry["files"] == []


async def test_generate_out_downloads_without_the_token(
    cli: Cli, server: FakeNanoBanana, tmp_path: Path
) -> None:
    out = tmp_path / "images"
    result = await cli(server, "generate", "a cat", "--count", "2", "--out", str(out), "--json")
    assert result.code == 0
    (entry,) = result.tasks
    files = [Path(name) for name in entry["files"]]
    assert len(files) == 2
    assert sorted(files) == listing(out)
    assert all(path.read_bytes().startswith(PNG_MAGIC) for path in files)
    assert len(server.image_requests) == 2
    for _, headers in server.image_requests:
        assert "authorization" not in {name.lower() for name in headers}


async def test_generate_human_out_prints_files(
    cli: Cli, server: FakeNanoBanana, tmp_path: Path
) -> None:
    result = await cli(server, "generate", "a cat", "--out", str(tmp_path))
    assert result.code == 0
    assert result.out.split() == [str(path) for path in listing(tmp_path)]


async def test_generate_failed_task_exits_1(cli: Cli, server: FakeNanoBanana) -> None:
    result = await cli(server, "generate", "a cat [fail]", "--json")
    assert result.code == 1
    (entry,) = result.tasks
    assert entry["state"] == "failed"
    assert entry["error"]["code"] == "forbidden"
    assert entry["image_urls"] == []
    assert "forbidden" in one_line_error(result)


async def test_generate_no_wait(cli: Cli, slow_server: FakeNanoBanana) -> None:
    result = await cli(slow_server, "generate", "a cat", "--no-wait", "--json")
    assert result.code == 0
    (entry,) = result.tasks
    assert entry["id"] in slow_server.tasks
    assert entry["state"] == "pending"
    assert f"tasks wait --base-url {slow_server.base_url} {entry['id']}" in result.err
    assert slow_server.counts["retrieve_batch"] == 0


async def test_generate_timeout_exits_4(cli: Cli, slow_server: FakeNanoBanana) -> None:
    result = await cli(slow_server, "generate", "a cat", "--timeout", "0.2", "--json")
    assert result.code == 4
    (entry,) = result.tasks
    assert entry["state"] == "pending"
    line = one_line_error(result)
    assert "keep running" in line
    assert f"nanobanana tasks wait --base-url {slow_server.base_url} {entry['id']}" in line
    assert slow_server.token not in result.err


async def test_bad_token_exits_3(cli: Cli, server: FakeNanoBanana) -> None:
    result = await cli(None, "--token", "wrong", "--base-url", server.base_url, "generate", "x")
    assert result.code == 3
    assert result.out == ""
    assert "invalid_token" in one_line_error(result)
    assert not server.tasks


async def test_missing_token_exits_3(cli: Cli, server: FakeNanoBanana) -> None:
    result = await cli(None, "--base-url", server.base_url, "generate", "x", "--json")
    assert result.code == 3
    assert result.out == ""
    assert "ACEDATACLOUD_API_TOKEN" in one_line_error(result)


async def test_token_and_base_url_from_environment(
    cli: Cli, server: FakeNanoBanana, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACEDATACLOUD_API_TOKEN", server.token)
    monkeypatch.setenv("ACEDATACLOUD_API_BASE_URL", server.base_url)
    result = await cli(None, "generate", "a cat", "--json")
    assert result.code == 0
    assert result.tasks[0]["state"] == "succeeded"


async def test_debug_shows_the_traceback(cli: Cli, server: FakeNanoBanana) -> None:
    result = await cli(
        None, "--base-url", server.base_url, "generate", "x", "--token", "wrong", "--debug"
    )
    assert result.code == 3
    assert "Traceback" in result.err
    assert "AuthenticationError" in result.err


async def test_download_cut_short_leaves_no_file(
    cli: Cli, server: FakeNanoBanana, tmp_path: Path
) -> None:
    server.inject_image("truncate", times=10)
    result = await cli(server, "generate", "a cat", "--out", str(tmp_path), "--json")
    assert result.code == 3
    # The task succeeded: its id and image URL are on stdout, with the download's error.
    (entry,) = result.tasks
    assert entry["state"] == "succeeded"
    assert entry["image_urls"] == server.tasks[entry["id"]].image_urls
    assert entry["files"] == []
    assert entry["error"]["code"] == "download_failed"
    assert "cut short" in entry["error"]["message"]
    line = one_line_error(result)
    assert "cut short" in line
    assert f"tasks download --base-url {server.base_url} {entry['id']} --out" in line
    assert listing(tmp_path) == []  # no image, no hidden .part file


# --- edit -------------------------------------------------------------------------------


async def test_edit_sends_a_local_file_as_data_url(
    cli: Cli, server: FakeNanoBanana, tmp_path: Path
) -> None:
    picture = tmp_path / "in.png"
    picture.write_bytes(make_png(4, 4))
    result = await cli(
        server,
        "edit",
        "make it blue",
        "--image",
        str(picture),
        "--image",
        "https://example.com/b.jpg",
        "--json",
    )
    assert result.code == 0
    (entry,) = result.tasks
    sent = server.tasks[entry["id"]].request["image_urls"]
    prefix = "data:image/png;base64,"
    assert sent[0].startswith(prefix)
    assert base64.b64decode(sent[0][len(prefix) :]) == picture.read_bytes()
    assert sent[1] == "https://example.com/b.jpg"
    assert "aspect_ratio" not in server.tasks[entry["id"]].request


async def test_edit_missing_file_exits_2_before_any_request(
    cli: Cli, server: FakeNanoBanana, tmp_path: Path
) -> None:
    result = await cli(server, "edit", "x", "--image", str(tmp_path / "nope.png"), "--json")
    assert result.code == 2
    assert result.out == ""
    assert "not found" in one_line_error(result)
    assert not server.counts


async def test_edit_non_image_file_exits_2(
    cli: Cli, server: FakeNanoBanana, tmp_path: Path
) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    result = await cli(server, "edit", "x", "--image", str(fake))
    assert result.code == 2
    assert "not an image" in one_line_error(result)
    assert not server.counts


async def test_edit_too_large_file_exits_2(
    cli: Cli, server: FakeNanoBanana, tmp_path: Path
) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as file:
        file.write(make_png())
        file.truncate(9 * 1024 * 1024)  # sparse: large on paper, cheap on disk
    result = await cli(server, "edit", "x", "--image", str(big))
    assert result.code == 2
    assert "too large" in one_line_error(result)
    assert not server.counts


# --- tasks get --------------------------------------------------------------------------


async def test_tasks_get_one(cli: Cli, server: FakeNanoBanana) -> None:
    task_id = server.add_task(count=2)
    result = await cli(server, "tasks", "get", task_id, "--json")
    assert result.code == 0
    (entry,) = result.tasks
    assert entry["id"] == task_id
    assert entry["state"] == "succeeded"
    assert entry["image_urls"] == server.tasks[task_id].image_urls
    assert isinstance(entry["elapsed"], float)
    assert server.counts == {"retrieve": 1}


async def test_tasks_get_many_in_one_batch(cli: Cli, slow_server: FakeNanoBanana) -> None:
    ok = slow_server.add_task(duration=0)
    failed = slow_server.add_task(duration=0, outcome="fail_top_level")
    pending = slow_server.add_task()
    result = await cli(slow_server, "tasks", "get", ok, failed, pending, "--json")
    assert result.code == 1
    assert [entry["state"] for entry in result.tasks] == ["succeeded", "failed", "pending"]
    assert result.tasks[1]["error"]["code"] == "api_error"
    assert slow_server.counts == {"retrieve_batch": 1}
    assert "1 of 3 tasks failed" in one_line_error(result)


async def test_tasks_get_unknown_id_exits_3(cli: Cli, server: FakeNanoBanana) -> None:
    known = server.add_task()
    result = await cli(server, "tasks", "get", known, "no-such-task", "--json")
    assert result.code == 3
    assert [entry["state"] for entry in result.tasks] == ["succeeded", "not_found"]
    assert result.tasks[1]["error"]["code"] == "not_found"
    assert "no-such-task" in one_line_error(result)
    result = await cli(server, "tasks", "get", "no-such-task")
    assert result.code == 3


async def test_tasks_get_human_table(cli: Cli, server: FakeNanoBanana) -> None:
    ids = [server.add_task(), server.add_task(outcome="fail")]
    result = await cli(server, "tasks", "get", *ids)
    assert result.code == 1
    for task_id in ids:
        assert task_id in result.out
    assert "succeeded" in result.out
    assert "forbidden" in result.out
    assert server.tasks[ids[0]].image_urls[0] in result.out.splitlines()


# --- tasks wait -------------------------------------------------------------------------


async def test_tasks_wait_ids_from_stdin(cli: Cli, server: FakeNanoBanana) -> None:
    ids = [server.add_task(duration=0.1 * i) for i in range(4)]
    ids.append(server.add_task(duration=0.05, outcome="fail_no_images"))
    result = await cli(server, "tasks", "wait", ids[0], "-", "--json", stdin=" ".join(ids[1:]))
    assert result.code == 1
    assert [entry["id"] for entry in result.tasks] == ids
    assert [entry["state"] for entry in result.tasks] == ["succeeded"] * 4 + ["failed"]
    assert result.tasks[4]["error"]["code"] == "no_images"
    assert "counts" not in result.out
    assert "5/5" in result.err  # the progress bar's final state
    assert server.counts["retrieve"] == 0  # only coalesced batch reads


async def test_tasks_wait_reads_json_of_another_command(
    cli: Cli, server: FakeNanoBanana, tmp_path: Path
) -> None:
    submitted = await cli(server, "generate", "a cat", "--count", "2", "--no-wait", "--json")
    result = await cli(
        server, "tasks", "wait", "-", "--out", str(tmp_path), "--json", stdin=submitted.out
    )
    assert result.code == 0
    (entry,) = result.tasks
    assert entry["id"] == submitted.tasks[0]["id"]
    assert len(entry["files"]) == 2
    assert all(Path(name).parent == tmp_path for name in entry["files"])


async def test_tasks_wait_human_summary(cli: Cli, server: FakeNanoBanana) -> None:
    ids = [server.add_task(), server.add_task()]
    result = await cli(server, "tasks", "wait", *ids)
    assert result.code == 0
    for task_id in ids:
        assert task_id in result.out
        assert server.tasks[task_id].image_urls[0] in result.out.splitlines()


async def test_tasks_wait_timeout_lists_pending(cli: Cli, slow_server: FakeNanoBanana) -> None:
    done = slow_server.add_task(duration=0)
    pending = [slow_server.add_task(), slow_server.add_task()]
    result = await cli(slow_server, "tasks", "wait", done, *pending, "--timeout", "0.3", "--json")
    assert result.code == 4
    assert [entry["state"] for entry in result.tasks] == ["succeeded", "pending", "pending"]
    line = one_line_error(result)
    assert "2 tasks still pending" in line
    assert f"{pending[0]} {pending[1]}" in line
    assert done not in line


@pytest.mark.parametrize(
    ("command", "action"), [("wait", "retrieve_batch"), ("download", "retrieve")]
)
async def test_the_timeout_covers_the_first_read(
    cli: Cli, server: FakeNanoBanana, tmp_path: Path, command: str, action: str
) -> None:
    """The first read of ``tasks wait`` and the read of ``tasks download`` ran outside
    ``--timeout``: a service that held its answer held the command past it."""
    task_id = server.add_task(duration=0)
    server.inject("slow", action=action, delay=60.0, times=10)
    argv = ["tasks", command, task_id, "--out", str(tmp_path), "--timeout", "0.3", "--json"]
    result = await cli(server, *argv)
    assert result.code == 4
    assert result.out == ""  # nothing was read
    line = one_line_error(result)
    assert "timed out after 0.3 s with 1 task still pending" in line
    assert task_id in line


async def test_a_request_timeout_on_the_first_read_falls_back_to_waiting(
    server: FakeNanoBanana,
) -> None:
    """The first look is a courtesy: the client's own per-request timeout (an
    APITimeoutError, also a TimeoutError) was taken for the --timeout and raised."""
    task_id = server.add_task(duration=0)
    server.inject("slow", action="retrieve_batch", delay=5.0, times=10)
    ctx = Context(argparse.Namespace(not_found_grace=30.0), Output(json_mode=True))
    client = NanoBananaClient(
        server.token, base_url=server.base_url, timeout=0.2, retry=RetryPolicy.no_wait()
    )
    async with client:
        when = asyncio.get_running_loop().time() + 60
        assert await _first_look(client, ctx, [task_id], when) == [task_id]


async def test_a_null_id_on_stdin_is_a_usage_error(cli: Cli, server: FakeNanoBanana) -> None:
    # Found in review: {"id": null} was read as the task id "None".
    result = await cli(server, "tasks", "get", "-", stdin='{"tasks": [{"id": null}]}')
    assert result.code == 2
    assert "not a non-empty string: None" in one_line_error(result)
    assert not server.counts


async def test_tasks_wait_empty_stdin_is_a_usage_error(cli: Cli, server: FakeNanoBanana) -> None:
    result = await cli(server, "tasks", "wait", "-", stdin="  \n")
    assert result.code == 2
    assert "no task ids" in one_line_error(result)


async def test_interrupted_wait_says_how_to_resume(
    slow_server: FakeNanoBanana, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [slow_server.add_task(), slow_server.add_task()]
    argv = ["--token", slow_server.token, "--base-url", slow_server.base_url]
    argv += ["--poll-interval", "0.02", "tasks", "wait", *ids]
    run = asyncio.create_task(main_async(argv))
    await wait_until(lambda: slow_server.counts["retrieve_batch"] >= 1)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    err = capsys.readouterr().err
    assert "keep running on the service" in err
    assert f"tasks wait --base-url {slow_server.base_url} {ids[0]} {ids[1]}" in err


async def test_a_wait_interrupted_during_its_first_read_says_how_to_resume(
    slow_server: FakeNanoBanana, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found flaky: a stop before the first read answered printed only "Interrupted.".
    ids = [slow_server.add_task(), slow_server.add_task()]
    slow_server.inject("slow", delay=30, action="retrieve_batch")  # holds the first read
    argv = ["--token", slow_server.token, "--base-url", slow_server.base_url]
    argv += ["--poll-interval", "0.02", "tasks", "wait", *ids]
    run = asyncio.create_task(main_async(argv))
    await wait_until(lambda: slow_server.counts["retrieve_batch"] >= 1)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    err = capsys.readouterr().err
    assert f"tasks wait --base-url {slow_server.base_url} {ids[0]} {ids[1]}" in err


async def test_interrupted_generate_names_its_task(
    slow_server: FakeNanoBanana, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--token", slow_server.token, "--base-url", slow_server.base_url]
    run = asyncio.create_task(main_async([*argv, "--poll-interval", "0.02", "generate", "x"]))
    await wait_until(lambda: slow_server.counts["retrieve_batch"] >= 1)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    (task_id,) = slow_server.tasks
    captured = capsys.readouterr()
    assert captured.out.split() == [task_id]  # the paid task's id, on stdout too
    assert "The task keeps running on the service" in captured.err
    assert captured.err.rstrip().endswith(task_id)


# --- usage ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["generate"],
        ["generate", "x", "--count", "9"],
        ["generate", "x", "--aspect-ratio", "5:4"],
        ["generate", "x", "--timeout", "-1"],
        ["edit", "x"],
        ["tasks"],
        ["tasks", "get"],
        ["fake-server", "--fail-rate", "2"],
    ],
)
async def test_usage_errors_exit_2(cli: Cli, argv: list[str]) -> None:
    result = await cli(None, *argv)
    assert result.code == 2
    assert result.out == ""
    assert "usage:" in result.err


async def test_help_documents_json_and_exit_codes(cli: Cli) -> None:
    result = await cli(None, "tasks", "wait", "--help")
    assert result.code == 0
    assert '"image_urls"' in result.out
    assert "130" in result.out


async def test_out_must_be_a_folder(cli: Cli, server: FakeNanoBanana, tmp_path: Path) -> None:
    not_folder = tmp_path / "file"
    not_folder.write_text("")
    result = await cli(server, "generate", "x", "--out", str(not_folder))
    assert result.code == 2
    assert "folder" in one_line_error(result)
    assert not server.counts


def test_missing_rich_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)  # makes "import rich" fail
    assert main(["demo"]) == 2
    assert "pip install 'nanobanana-async[cli]'" in capsys.readouterr().err


# --- demo and fake-server ---------------------------------------------------------------


async def test_demo_runs_offline(cli: Cli, tmp_path: Path) -> None:
    result = await cli(None, "demo", "--out", str(tmp_path), "--json")
    assert result.code == 0
    states = [entry["state"] for entry in result.tasks]
    assert states.count("succeeded") == 4
    assert states.count("failed") == 1
    files = [Path(name) for entry in result.tasks for name in entry["files"]]
    assert len(files) == 5
    assert sorted(files) == listing(tmp_path)
    assert "local simulated server" in result.err
    assert "no real images" in result.err


async def test_fake_server_serves_a_real_client(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = asyncio.create_task(main_async(["fake-server", "--duration", "0", "0.1"]))
    printed = ""

    def started() -> bool:
        nonlocal printed
        printed += capsys.readouterr().out
        return "export " in printed

    await wait_until(started)
    settings = dict(
        part.split("=", 1) for part in printed.split("export ", 1)[1].split() if "=" in part
    )
    async with NanoBananaClient(
        settings["ACEDATACLOUD_API_TOKEN"],
        base_url=settings["ACEDATACLOUD_API_BASE_URL"],
        poll_interval=0.02,
        max_poll_interval=0.1,
        retry=RetryPolicy.no_wait(),
    ) as client:
        submission = await client.generate("a cat", count=2)
        task = await client.wait(submission, timeout=WAIT)
        paths = await client.download_all(task, tmp_path)
    assert len(paths) == 2
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    assert "Fake server stopped." in capsys.readouterr().err


# --- as a subprocess --------------------------------------------------------------------


async def spawn(
    *args: str,
    server: FakeNanoBanana | None = None,
    env: dict[str, str] | None = None,
    stdin: bool = False,
    umask: int = -1,
) -> asyncio.subprocess.Process:
    environment = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    if server is not None:
        environment["ACEDATACLOUD_API_TOKEN"] = server.token
        environment["ACEDATACLOUD_API_BASE_URL"] = server.base_url
    environment.update(env or {})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nanobanana_async.cli",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment,
        umask=umask,
    )


async def finish(process: asyncio.subprocess.Process, stdin: str | None = None) -> Result:
    """Wait for the process (killing it if it overstays) and collect its output."""
    try:
        async with asyncio.timeout(WAIT):
            out, err = await process.communicate(None if stdin is None else stdin.encode())
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


@pytest.mark.parametrize("encoding", ["utf-8", "latin-1"])
async def test_subprocess_stdin_bytes_that_are_not_utf8_are_refused(
    server: FakeNanoBanana, encoding: str
) -> None:
    """Whatever the locale decodes stdin as: under Latin-1 any bytes decode, and UTF-8
    text would have gone to the service as mojibake."""
    process = await spawn(
        "generate", "-", "--no-wait", server=server, env={"PYTHONIOENCODING": encoding},
        stdin=True,
    )  # fmt: skip
    assert process.stdin is not None
    async with asyncio.timeout(WAIT):
        _, err = await process.communicate(b"a cat \xff\xfe")
    assert process.returncode == 2, err
    assert b"stdin is not UTF-8 text" in err
    assert not server.counts
    process = await spawn(
        "generate", "-", "--no-wait", "--json", server=server,
        env={"PYTHONIOENCODING": encoding}, stdin=True,
    )  # fmt: skip
    async with asyncio.timeout(WAIT):
        _, err = await process.communicate("un café".encode())
    assert process.returncode == 0, err
    (task,) = server.tasks.values()
    assert task.prompt == "un café"


async def test_subprocess_generate_json(server: FakeNanoBanana) -> None:
    process = await spawn(
        "generate", "a cat", "--count", "2", "--poll-interval", "0.02", "--json", server=server
    )
    result = await finish(process)
    assert result.code == 0, result.err
    (entry,) = result.tasks
    assert entry["image_urls"] == server.tasks[entry["id"]].image_urls


async def test_subprocess_bad_token(server: FakeNanoBanana) -> None:
    process = await spawn("tasks", "get", "some-id", "--token", "wrong", server=server)
    result = await finish(process)
    assert result.code == 3
    assert "invalid_token" in one_line_error(result)
    assert result.err.count("\n") == 1


async def test_subprocess_ctrl_c_while_waiting(slow_server: FakeNanoBanana) -> None:
    ids = [slow_server.add_task(), slow_server.add_task()]
    process = await spawn(
        "tasks", "wait", *ids, "--poll-interval", "0.02", "--json", server=slow_server
    )
    try:
        # The second read is the poll loop's: the first (a look at every id) is answered.
        await wait_until(lambda: slow_server.counts["retrieve_batch"] >= 2)
        process.send_signal(signal.SIGINT)
    finally:
        result = await finish(process)
    assert result.code == 130
    assert [(entry["id"], entry["state"]) for entry in result.tasks] == [
        (ids[0], "pending"),
        (ids[1], "pending"),
    ]
    assert "Traceback" not in result.err
    assert "keep running on the service" in result.err
    assert f"nanobanana tasks wait {ids[0]} {ids[1]}" in result.err


async def test_subprocess_demo_needs_no_token(tmp_path: Path) -> None:
    process = await spawn("demo", env={"TMPDIR": str(tmp_path)})
    result = await finish(process)
    assert result.code == 0, result.err
    assert "local simulated server" in result.err
    (folder,) = listing(tmp_path)
    images = listing(folder)
    assert len(images) == 5
    assert all(path.suffix == ".png" and str(path) in result.out for path in images)


async def test_subprocess_fake_server_until_ctrl_c() -> None:
    process = await spawn("fake-server", "--duration", "0", "0")
    try:
        assert process.stdout is not None
        lines: list[str] = []
        async with asyncio.timeout(WAIT):
            while not lines or "export " not in lines[-1]:
                lines.append((await process.stdout.readline()).decode())
        base_url = next(line.split()[-1] for line in lines if "base URL:" in line)
        async with NanoBananaClient(
            "test-token", base_url=base_url, poll_interval=0.02, retry=RetryPolicy.no_wait()
        ) as client:
            urls = await client.await_completion(await client.generate("a cat"), timeout=WAIT)
        assert len(urls) == 1
        process.send_signal(signal.SIGINT)
    finally:
        result = await finish(process)
    assert result.code == 0
    assert "Fake server stopped." in result.err
    assert "Traceback" not in result.err


async def read_stderr_until(process: asyncio.subprocess.Process, text: str) -> str:
    """Read the process's stderr line by line until a line holds ``text``."""
    assert process.stderr is not None
    seen = ""
    async with asyncio.timeout(WAIT):
        while text not in seen:
            line = (await process.stderr.readline()).decode()
            assert line, f"stderr ended without {text!r}: {seen}"
            seen += line
    return seen


# --- the CLI never drops what it has (issue 10), each as a subprocess -------------------


async def test_subprocess_failed_download_still_prints_the_task(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    server.inject_image("error", times=100)  # every image answer is a 500
    process = await spawn(
        "tasks", "wait", server.add_task(count=2), server.add_task(), "--out", str(tmp_path),
        "--poll-interval", "0.02", "--json", server=server,
    )  # fmt: skip
    result = await finish(process)
    assert result.code == 3
    assert [entry["state"] for entry in result.tasks] == ["succeeded", "succeeded"]
    for entry in result.tasks:
        assert entry["image_urls"] == server.tasks[entry["id"]].image_urls
        assert entry["error"]["code"] == "download_failed"
    assert "tasks download" in one_line_error(result)
    assert "2/2" in result.err  # the bar counts finished tasks, downloads or not


async def test_subprocess_unknown_id_among_good_ones(server: FakeNanoBanana) -> None:
    good = [server.add_task(), server.add_task(count=2)]
    process = await spawn(
        "tasks", "wait", *good, "typo", "--not-found-grace", "0.3",
        "--poll-interval", "0.02", "--json", server=server,
    )  # fmt: skip
    result = await finish(process)
    assert result.code == 3
    assert [entry["state"] for entry in result.tasks] == ["succeeded", "succeeded", "not_found"]
    assert result.tasks[1]["image_urls"] == server.tasks[good[1]].image_urls
    assert "does not know typo (yet); waiting up to 0.3 s" in result.err
    assert "typo" in one_line_error(result)


async def test_subprocess_unknown_id_says_what_it_waits_for(server: FakeNanoBanana) -> None:
    process = await spawn(
        "tasks", "wait", "nope", "--not-found-grace", "0", "--poll-interval", "0.02", server=server
    )
    result = await finish(process)
    assert result.code == 3
    assert "does not know nope (yet); waiting up to 0 s for it to appear" in result.err
    assert "--not-found-grace" in result.err
    assert result.out.split() == ["nope"]


async def test_subprocess_ctrl_c_generate_json_keeps_the_id(
    slow_server: FakeNanoBanana,
) -> None:
    process = await spawn(
        "generate", "a cat", "--json", "--poll-interval", "0.02", server=slow_server
    )
    try:
        await read_stderr_until(process, "Submitted task")
        process.send_signal(signal.SIGINT)
    finally:
        result = await finish(process)
    assert result.code == 130
    ((task_id, _),) = slow_server.tasks.items()
    assert [(e["id"], e["state"], e["prompt"]) for e in result.tasks] == [
        (task_id, "pending", "a cat")
    ]
    assert f"tasks wait {task_id}" in result.err


async def test_subprocess_sigterm_during_generate(slow_server: FakeNanoBanana) -> None:
    process = await spawn("generate", "a cat", "--poll-interval", "0.02", server=slow_server)
    try:
        # Logged at once though stderr is a pipe, not a terminal: the id of a paid task.
        seen = await read_stderr_until(process, "Submitted task")
        (task_id,) = slow_server.tasks
        assert task_id in seen
        process.send_signal(signal.SIGTERM)
    finally:
        result = await finish(process)
    assert result.code == 143
    assert result.out.split() == [task_id]
    assert "Terminated. The task keeps running on the service" in result.err
    assert result.err.rstrip().endswith(f"tasks wait {task_id}")
    assert "Traceback" not in result.err


async def test_subprocess_no_wait_prints_the_id_on_stdout(slow_server: FakeNanoBanana) -> None:
    result = await finish(await spawn("generate", "a cat", "--no-wait", server=slow_server))
    assert result.code == 0
    (task_id,) = slow_server.tasks
    assert result.out.split() == [task_id]  # ID=$(nanobanana generate x --no-wait)
    assert slow_server.counts["retrieve_batch"] == 0


async def test_subprocess_wait_reads_several_no_wait_documents(
    server: FakeNanoBanana, cli: Cli
) -> None:
    documents = [
        (await cli(server, "generate", f"picture {n}", "--no-wait", "--json")).out for n in range(3)
    ]
    loose = server.add_task()
    process = await spawn(
        "tasks", "wait", "-", "--poll-interval", "0.02", "--json", server=server, stdin=True
    )
    result = await finish(process, stdin="".join(documents) + f"\n{loose}\n")
    assert result.code == 0, result.err
    ids = [json.loads(document)["tasks"][0]["id"] for document in documents] + [loose]
    assert [entry["id"] for entry in result.tasks] == ids
    assert [entry["prompt"] for entry in result.tasks][:3] == [f"picture {n}" for n in range(3)]


async def test_subprocess_generate_reads_the_prompt_from_stdin(server: FakeNanoBanana) -> None:
    process = await spawn(
        "generate", "-", "--json", "--poll-interval", "0.02", server=server, stdin=True
    )
    result = await finish(process, stdin="a white siamese cat\non a red sofa\n")
    assert result.code == 0, result.err
    (entry,) = result.tasks
    assert server.tasks[entry["id"]].prompt == "a white siamese cat\non a red sofa"
    assert entry["prompt"] == "a white siamese cat\non a red sofa"


async def test_subprocess_saved_images_honour_the_umask(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    process = await spawn(
        "generate", "a cat", "--out", str(tmp_path), "--poll-interval", "0.02",
        server=server, umask=0o022,
    )  # fmt: skip
    result = await finish(process)
    assert result.code == 0, result.err
    (image,) = listing(tmp_path)
    assert oct(image.stat().st_mode & 0o777) == oct(0o644)


async def test_subprocess_timeout_covers_downloads(server: FakeNanoBanana, tmp_path: Path) -> None:
    # The image host holds its answer far longer than any read timeout fires: only
    # the command's own deadline can end this.
    server.inject_image("slow", times=10, delay=120.0)
    task_id = server.add_task(count=2)
    process = await spawn(
        "tasks", "wait", task_id, "--out", str(tmp_path), "--timeout", "1",
        "--poll-interval", "0.02", "--json", server=server,
    )  # fmt: skip
    result = await finish(process)  # within WAIT (20 s), far below the image's 120 s
    assert result.code == 4
    (entry,) = result.tasks
    assert entry["state"] == "succeeded"
    assert entry["image_urls"] == server.tasks[task_id].image_urls
    assert entry["error"]["code"] == "incomplete"
    line = one_line_error(result)
    assert "timed out after 1 s before every image was saved" in line
    assert f"nanobanana tasks download {task_id} --out {tmp_path}" in line
    assert listing(tmp_path) == []


async def test_subprocess_tasks_download(server: FakeNanoBanana, tmp_path: Path) -> None:
    done = server.add_task(count=2)
    failed = server.add_task(outcome="fail")
    process = await spawn(
        "tasks", "download", done, failed, "--out", str(tmp_path), "--json", server=server
    )
    result = await finish(process)
    assert result.code == 1  # the failed task
    assert [entry["state"] for entry in result.tasks] == ["succeeded", "failed"]
    files = [Path(name) for name in result.tasks[0]["files"]]
    assert sorted(files) == listing(tmp_path)
    assert all(path.read_bytes().startswith(PNG_MAGIC) for path in files)


async def test_subprocess_tasks_download_of_a_pending_task(
    slow_server: FakeNanoBanana, tmp_path: Path
) -> None:
    task_id = slow_server.add_task()
    process = await spawn("tasks", "download", task_id, "--out", str(tmp_path), server=slow_server)
    result = await finish(process)
    assert result.code == 4
    assert result.out.split() == [task_id]
    assert f"nanobanana tasks wait --out {tmp_path} {task_id}" in one_line_error(result)


async def test_subprocess_models() -> None:
    result = await finish(await spawn("models", "--json"))
    assert result.code == 0
    models = {model["name"]: model for model in json.loads(result.out)["models"]}
    assert models["nano-banana"]["resolutions"] == ["1K"]
    assert models["nano-banana"]["default"] is True
    assert models["nano-banana-pro"]["resolutions"] == ["1K", "2K", "4K"]
    assert models["nano-banana-2.1"]["official_variant"] is None
    human = await finish(await spawn("models"))
    assert "nano-banana-2-lite" in human.out
    assert "passed to the service as they are" in human.err


async def test_unknown_models_pass_through_with_a_resolution_note(
    cli: Cli, server: FakeNanoBanana
) -> None:
    result = await cli(server, "generate", "x", "--model", "nano-banana", "--resolution", "4K")
    assert result.code == 0
    assert "nano-banana honours only 1K" in result.err
    result = await cli(server, "generate", "x", "--model", "brand-new-model", "--json")
    assert result.code == 3  # the fake server refuses it; the CLI passed it on
    assert "bad_request" in one_line_error(result)
    assert server.counts["generate"] == 2


async def test_subprocess_sigterm_during_the_submission_keeps_its_id(
    slow_server: FakeNanoBanana,
) -> None:
    slow_server.inject("slow", action="generate", delay=1.0)  # held, then a task is made
    process = await spawn("generate", "a cat", "--json", server=slow_server)
    try:
        await wait_until(lambda: slow_server.counts["generate"] >= 1)
        process.send_signal(signal.SIGTERM)
    finally:
        result = await finish(process)
    assert result.code == 143
    (task_id,) = slow_server.tasks
    assert [entry["id"] for entry in result.tasks] == [task_id]
    assert "waiting for the submission in flight to answer" in result.err
    assert f"Submitted task {task_id}" in result.err
    assert result.err.rstrip().endswith(f"tasks wait {task_id}")
