"""The recipes in ``examples/`` run against the fake server, in process and as scripts."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from nanobanana_async import NanoBananaClient, RetryPolicy
from nanobanana_async.testing import FakeNanoBanana

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WAIT = 15.0  # upper bound for every wait here


def load(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` by path: the folder is not a package."""
    module_name = f"examples_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


service = load("aiohttp_service")
batch = load("batch_script")
chat_bot = load("chat_bot")


@pytest.fixture
async def server() -> AsyncIterator[FakeNanoBanana]:
    async with FakeNanoBanana(duration=(0.05, 0.3)) as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


def fast_client(server: FakeNanoBanana) -> NanoBananaClient:
    return NanoBananaClient(
        server.token,
        base_url=server.base_url,
        poll_interval=0.02,
        max_poll_interval=0.1,
        retry=RetryPolicy.no_wait(),
    )


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polls plain state, no event to await
            await asyncio.sleep(0.005)


async def finish_everything(server: FakeNanoBanana) -> None:
    """Finish every task the server has, now and as new ones come, until cancelled."""
    while True:
        for task_id in list(server.tasks):
            server.finish(task_id)
        await asyncio.sleep(0.01)


def script_env(server: FakeNanoBanana) -> dict[str, str]:
    env = dict(os.environ)
    env["ACEDATACLOUD_API_TOKEN"] = server.token
    env["ACEDATACLOUD_API_BASE_URL"] = server.base_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def run_example(server: FakeNanoBanana, script: str, *args: str) -> bytes:
    """Run an example as its own process against ``server``; its stdout, once it exited 0."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / script),
        *args,
        env=script_env(server),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT):
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    return stdout


# --------------------------------------------------------------------------- aiohttp service


async def test_service_generates_through_callbacks(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    settings = service.Settings(
        base_url=server.base_url, token=server.token, wait=WAIT, callback_poll_interval=60.0
    )
    runner = web.AppRunner(service.create_app(settings), handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        settings.public_url = base

        async with http.post(base + "/images", json={"prompt": "a cat"}) as response:
            assert response.status == 200
            made = await response.json()
        task = server.tasks[made["task_id"]]
        assert made["image_urls"] == task.image_urls
        assert made["state"] == "succeeded"
        assert task.callback_url is not None
        assert task.callback_url.startswith(base)
        assert [d.status for d in server.callback_deliveries] == [200]
        assert server.counts["retrieve_batch"] == 0  # the callback finished the wait

        async with http.get(f"{base}/images/{made['task_id']}") as response:
            assert response.status == 200
            assert (await response.json())["image_urls"] == task.image_urls

        async with http.post(base + "/images", json={"prompt": "a cat [fail]"}) as response:
            assert response.status == 422
            assert (await response.json())["error"]["code"] == "forbidden"
        for bad in ({"prompt": ""}, {"no": "prompt"}, ["a list"]):
            async with http.post(base + "/images", json=bad) as response:
                assert response.status == 400
        async with http.post(base + "/images", data=b"{not json") as response:
            assert response.status == 400
        async with http.get(base + "/images/no-such-task") as response:
            assert response.status == 404

        # Shut down while a request still waits (its callback was lost): it is
        # answered 503 with its task id, and the app closes cleanly.
        server.drop_callbacks(1)
        pending = asyncio.create_task(http.post(base + "/images", json={"prompt": "a dog"}))
        await wait_until(lambda: server.callbacks_dropped == 1)
    finally:
        await asyncio.wait_for(runner.cleanup(), WAIT)
    async with await pending as response:
        assert response.status == 503
        assert (await response.json())["task_id"] in server.tasks


async def test_service_script_runs_and_stops_on_sigterm(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(EXAMPLES / "aiohttp_service.py"),
        "--port",
        "0",
        env=script_env(server),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(WAIT):
            line = (await process.stdout.readline()).decode()
        assert line.startswith("listening on http://127.0.0.1:"), line
        base = line.split()[-1]
        async with http.post(base + "/images", json={"prompt": "a cat"}) as response:
            assert response.status == 200
            made = await response.json()
        assert made["image_urls"] == server.tasks[made["task_id"]].image_urls
        assert [d.status for d in server.callback_deliveries] == [200]
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
        assert "shutting down" in stdout.decode()
        # The access log shows paths only: the callback secret stays out of it.
        assert "/nanobanana/callback" in stderr.decode()
        assert "nb_secret" not in stderr.decode()
        assert server.token not in stderr.decode() + stdout.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --------------------------------------------------------------------------- batch script


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("# prompts, one per line\n\n" + "\n".join(prompts) + "\n", encoding="utf-8")
    return path


def results(folder: Path) -> list[dict[str, Any]]:
    text = (folder / "manifest.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


async def test_batch_script_writes_results_and_resumes(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    prompts = [f"picture {i}" for i in range(9)] + ["a refused one [fail]"]
    prompts_file = write_prompts(tmp_path / "prompts.txt", prompts)
    out = tmp_path / "out"
    async with fast_client(server) as client:
        first = await batch.run(client, prompts_file, out, max_in_flight=3, echo=False)
    assert (first.submitted, first.succeeded, first.failed, first.pending) == (10, 9, 1, 0)
    lines = results(out)
    assert [r["prompt"] for r in lines] == prompts
    for record in lines:
        task = server.tasks[record["task_id"]]
        assert record["prompt"] == task.prompt
        assert record["image_urls"] == task.image_urls
        assert record["state"] == ("failed" if "[fail]" in task.prompt else "succeeded")
        assert all((out / name).is_file() for name in record["files"])
    assert server.counts["generate"] == 10

    async with fast_client(server) as client:  # a second run has nothing left to do
        second = await batch.run(client, prompts_file, out, max_in_flight=3, echo=False)
    assert (second.skipped, second.submitted, second.resumed) == (10, 0, 0)
    assert server.counts["generate"] == 10
    assert results(out) == lines


async def test_batch_script_waits_on_tasks_it_already_submitted(tmp_path: Path) -> None:
    prompts_file = write_prompts(tmp_path / "prompts.txt", [f"slow {i}" for i in range(6)])
    out = tmp_path / "out"
    async with FakeNanoBanana(duration=60.0) as server:
        async with fast_client(server) as client:  # stopped: nothing finishes in time
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await batch.run(client, prompts_file, out, max_in_flight=4, echo=False)
        assert server.counts["generate"] == 4
        finisher = asyncio.create_task(finish_everything(server))
        try:
            async with fast_client(server) as client:
                second = await batch.run(client, prompts_file, out, max_in_flight=4, echo=False)
        finally:
            finisher.cancel()
            await asyncio.wait([finisher])
        assert (second.resumed, second.submitted, second.succeeded) == (4, 2, 6)
        assert server.counts["generate"] == 6  # the first four were not paid for twice
        assert [r["key"] for r in results(out)] == ["3", "4", "5", "6", "7", "8"]


async def test_batch_script_refuses_a_changed_prompts_file(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    prompts_file = write_prompts(tmp_path / "prompts.txt", ["one", "two"])
    out = tmp_path / "out"
    async with fast_client(server) as client:
        await batch.run(client, prompts_file, out, echo=False)
        write_prompts(prompts_file, ["uno", "two"])
        with pytest.raises(ValueError, match="changed"):
            await batch.run(client, prompts_file, out, echo=False)
    assert server.counts["generate"] == 2


async def test_batch_script_as_a_script(server: FakeNanoBanana, tmp_path: Path) -> None:
    prompts_file = write_prompts(tmp_path / "prompts.txt", ["a cat", "a dog", "a bird"])
    out = tmp_path / "results"
    stdout = await run_example(
        server, "batch_script.py", str(prompts_file), "--out", str(out), "--max-in-flight", "2"
    )
    summary = json.loads(stdout.decode().splitlines()[-1])
    assert summary["succeeded"] == 3
    assert summary["pending"] == 0
    assert len(results(out)) == 3


async def test_batch_script_stops_on_ctrl_c_without_a_traceback(tmp_path: Path) -> None:
    prompts_file = write_prompts(tmp_path / "prompts.txt", [f"slow {i}" for i in range(4)])
    out = tmp_path / "out"
    async with FakeNanoBanana(duration=60.0) as slow:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "batch_script.py"),
            str(prompts_file),
            "--out",
            str(out),
            env=script_env(slow),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await wait_until(lambda: slow.counts["retrieve_batch"] >= 1)
            process.send_signal(signal.SIGINT)
            async with asyncio.timeout(WAIT):
                _, stderr = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        assert process.returncode == 130
        assert "Traceback" not in stderr.decode()
        assert "run the same command again to resume" in stderr.decode()
        assert {r["task_id"] for r in results(out)} == set(slow.tasks)


# --------------------------------------------------------------------------- chat bot


class FakeReply:
    def __init__(self, chat: FakeChat, text: str) -> None:
        self.chat = chat
        self.text = text
        self.image_url: str | None = None
        self.edits = 0

    async def edit(self, text: str, *, image_url: str | None = None) -> None:
        self.text, self.image_url = text, image_url
        self.edits += 1


class FakeChat:
    def __init__(self) -> None:
        self.replies: list[FakeReply] = []

    async def reply(self, text: str) -> FakeReply:
        reply = FakeReply(self, text)
        self.replies.append(reply)
        return reply


async def test_chat_bot_replies_then_edits_in_the_image(server: FakeNanoBanana) -> None:
    async with fast_client(server) as client:
        bot = chat_bot.ImageBot(client, per_user=1, timeout=WAIT)
        chat = FakeChat()
        await bot.imagine("ann", "a cat", chat)
        [reply] = chat.replies
        task = next(iter(server.tasks.values()))
        assert reply.edits == 1
        assert (reply.text, reply.image_url) == ("a cat", task.image_urls[0])

        await bot.imagine("ann", "a cat [fail]", chat)
        assert chat.replies[-1].text.startswith("Sorry, no image")
        await bot.imagine("ann", "   ", chat)
        assert chat.replies[-1].text == chat_bot.USAGE


async def test_chat_bot_limits_each_user_and_times_out() -> None:
    async with FakeNanoBanana(duration=60.0) as server, fast_client(server) as client:
        bot = chat_bot.ImageBot(client, per_user=1, timeout=0.3)
        ann, bob = FakeChat(), FakeChat()
        await asyncio.wait_for(
            asyncio.gather(
                bot.imagine("ann", "one", ann),
                bot.imagine("ann", "two", ann),  # over ann's limit: refused at once
                bot.imagine("bob", "three", bob),  # another user is not affected
            ),
            WAIT,
        )
        texts = sorted(reply.text for reply in ann.replies)
        assert texts[0].startswith("Sorry, that is taking longer than 0.3 s")
        assert texts[1].startswith("You already have 1 image")
        assert bob.replies[0].text.startswith("Sorry, that is taking longer")
        assert server.counts["generate"] == 2
        # The limit is released once a request ends.
        await asyncio.wait_for(bot.imagine("ann", "four", ann), WAIT)
        assert ann.replies[-1].text.startswith("Sorry, that is taking longer")
        assert server.counts["generate"] == 3


async def test_chat_bot_console_mode(server: FakeNanoBanana) -> None:
    stdout = await run_example(server, "chat_bot.py", "ann: a cat", "ann: a dog", "bob: a bird")
    text = stdout.decode()
    assert text.count("Working on it") == 2
    assert text.count("You already have 1 image") == 1
    assert text.count("[image: http") == 2
