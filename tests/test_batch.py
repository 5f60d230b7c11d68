"""The durable batch runner (``nanobanana_async.batch``) against the fake server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sqlite3
import stat
import threading
from collections.abc import Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from conftest import FAST

from nanobanana_async import (
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    NanoBananaClient,
    PermissionDeniedError,
)
from nanobanana_async._batch_records import spec_text
from nanobanana_async._journal import Journal
from nanobanana_async.batch import (
    BatchChangedError,
    BatchJob,
    BatchResult,
    BatchRunner,
    JobState,
    JournalBusyError,
    JournalError,
    run_batch,
)
from nanobanana_async.testing import FakeNanoBanana

WAIT = 20.0
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

MakeClient = Callable[..., NanoBananaClient]


def jobs_of(*prompts: str) -> list[BatchJob]:
    return [BatchJob(str(n), prompt) for n, prompt in enumerate(prompts, start=1)]


def runner(
    client: NanoBananaClient, jobs: list[BatchJob], folder: Path, **options: Any
) -> BatchRunner:
    settings: dict[str, Any] = {
        "journal": folder / ".nanobanana" / "journal.sqlite3",
        "out": folder,
        "manifest": folder / "manifest.jsonl",
        **options,
    }
    return BatchRunner(client, jobs, **settings)


async def collect(batch: BatchRunner) -> list[BatchResult]:
    async with asyncio.timeout(WAIT):
        return [result async for result in batch]


def manifest(folder: Path) -> list[dict[str, Any]]:
    text = (folder / "manifest.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
async def varied() -> Any:
    async with FakeNanoBanana(duration=(0.05, 0.4), seed=7) as fake:
        yield fake


async def finish_everything(server: FakeNanoBanana) -> None:
    """Finish every task the server has, now and as new ones come, until cancelled."""
    while True:
        for task_id in list(server.tasks):
            server.finish(task_id)
        await asyncio.sleep(0.01)


def fast_client(server: FakeNanoBanana, **options: Any) -> NanoBananaClient:
    return NanoBananaClient(server.token, base_url=server.base_url, **{**FAST, **options})


async def test_a_batch_saves_every_image_and_writes_the_manifest(
    varied: FakeNanoBanana, tmp_path: Path
) -> None:
    jobs = [BatchJob(str(n), f"picture {n}", count=2 if n % 3 == 0 else None) for n in range(12)]
    async with fast_client(varied) as client, runner(client, jobs, tmp_path) as batch:
        results = await collect(batch)
    assert sorted(result.job.key for result in results) == sorted(job.key for job in jobs)
    assert all(result.state is JobState.SUCCEEDED for result in results)
    for result in results:
        task = varied.tasks[result.task_id or ""]
        assert task.prompt == result.job.prompt
        assert list(result.image_urls) == task.image_urls
        assert [path.name for path in result.files] == [
            f"{result.job.key}-{index}.png" for index in range(len(task.image_urls))
        ]
        assert all(path.read_bytes().startswith(PNG_MAGIC) for path in result.files)
    assert varied.counts["generate"] == 12
    assert batch.summary.to_json() == {
        "total": 12,
        "succeeded": 12,
        "failed": 0,
        "download_failed": 0,
        "outcome_unknown": 0,
        "pending": 0,
        "skipped": 0,
        "resumed": 0,
        "submitted": 12,
        "retried": 0,
        "resubmitted": 0,
    }
    lines = manifest(tmp_path)
    assert [line["key"] for line in lines] == [job.key for job in jobs]  # input order
    line = lines[0]
    assert set(line) == {
        "key", "action", "prompt", "options", "state", "task_id", "trace_id", "task_ids",
        "attempts", "image_urls", "files", "error",
    }  # fmt: skip
    assert line["options"] == {"count": 2}
    assert line["files"] == ["0-0.png", "0-1.png"]
    assert line["trace_id"] == varied.tasks[line["task_id"]].trace_id


async def test_the_window_slides_and_never_holds_more_than_max_in_flight(
    tmp_path: Path,
) -> None:
    async with FakeNanoBanana(duration=(0.02, 0.6), seed=3) as server:
        unfinished_at_submit: list[int] = []

        def on_submit(job: BatchJob, submission: Any) -> None:
            # Tasks the server has not finished are pending for the client too.
            unfinished_at_submit.append(sum(not t.finished for t in server.tasks.values()))

        jobs = jobs_of(*(f"p{n}" for n in range(20)))
        async with fast_client(server) as client:
            batch = runner(client, jobs, tmp_path, out=None, max_in_flight=4, on_submit=on_submit)
            async with batch:
                await collect(batch)
        assert len(unfinished_at_submit) == 20
        assert max(unfinished_at_submit) <= 4
        # Sliding, not windows of 4: some submission went out while 3 were still running.
        assert 3 in unfinished_at_submit[4:]


async def test_a_stopped_batch_resumes_without_paying_twice(tmp_path: Path) -> None:
    jobs = jobs_of(*(f"slow {n}" for n in range(8)))
    async with FakeNanoBanana(duration=60.0) as server:
        async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
            iterate = asyncio.ensure_future(collect(batch))
            async with asyncio.timeout(WAIT):
                while server.counts["generate"] < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            iterate.cancel()  # as Ctrl-C does
            with pytest.raises(asyncio.CancelledError):
                await iterate
        stopped = batch.summary
        assert stopped.submitted == server.counts["generate"]
        assert stopped.pending == 8
        assert stopped.outcome_unknown == 0  # the request in flight was allowed to end
        # The manifest keeps every task id the service gave, for jobs still pending.
        submitted = {line["task_id"] for line in manifest(tmp_path) if line["task_id"]}
        assert submitted == set(server.tasks)

        finisher = asyncio.create_task(finish_everything(server))
        try:
            async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
                results = await collect(batch)
        finally:
            finisher.cancel()
            await asyncio.wait([finisher])
        assert {result.state for result in results} == {JobState.SUCCEEDED}
        assert server.counts["generate"] == 8
        assert batch.summary.resumed == stopped.submitted
        assert batch.summary.submitted == 8 - stopped.submitted
        assert [line["state"] for line in manifest(tmp_path)] == ["succeeded"] * 8


async def test_a_rerun_skips_finished_jobs_and_refetches_lost_files(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    jobs = jobs_of("a", "b", "c")
    async with fast_client(server) as client:
        first = await run_batch(client, jobs, **_paths(tmp_path))
        assert first.succeeded == 3
        (tmp_path / "2-0.png").unlink()  # the user deleted one image
        (tmp_path / ".leftover.part").write_bytes(b"half")  # a killed download
        async with runner(client, jobs, tmp_path) as batch:
            results = await collect(batch)
    assert [result.job.key for result in results] == ["2"]
    assert (tmp_path / "2-0.png").read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / ".leftover.part").exists()
    assert server.counts["generate"] == 3
    assert (batch.summary.skipped, batch.summary.resumed, batch.summary.submitted) == (2, 1, 0)
    assert len(manifest(tmp_path)) == 3


def _paths(folder: Path) -> dict[str, Any]:
    return {
        "journal": folder / ".nanobanana" / "journal.sqlite3",
        "out": folder,
        "manifest": folder / "manifest.jsonl",
    }


async def test_failed_tasks_are_retried_but_refused_prompts_are_not(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    jobs = jobs_of("fine", "upstream trouble [fail:top]", "refused [fail]", "empty [fail:empty]")
    async with fast_client(server) as client, runner(client, jobs, tmp_path, retries=2) as batch:
        results = {result.job.key: result for result in await collect(batch)}
    assert results["1"].state is JobState.SUCCEEDED
    for key in ("2", "4"):
        assert results[key].state is JobState.FAILED
        assert results[key].attempts == 3
        assert len(set(results[key].task_ids)) == 3
    assert results["3"].state is JobState.FAILED
    assert results["3"].error is not None
    assert results["3"].error.code == "forbidden"
    assert results["3"].attempts == 1
    summary = batch.summary
    assert (summary.submitted, summary.retried, summary.failed) == (8, 4, 3)
    assert server.counts["generate"] == 8

    # A rerun with more retries allowed tries the retryable failures once more.
    async with fast_client(server) as client, runner(client, jobs, tmp_path, retries=3) as batch:
        await collect(batch)
    assert (batch.summary.retried, batch.summary.skipped) == (2, 2)
    assert server.counts["generate"] == 10


async def test_a_refused_submission_fails_its_job_unpaid(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    jobs = [BatchJob("ok", "a cat"), BatchJob("bad", "a dog", model="no-such-model")]
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        results = {result.job.key: result for result in await collect(batch)}
    assert results["ok"].state is JobState.SUCCEEDED
    bad = results["bad"]
    assert bad.state is JobState.FAILED
    assert bad.task_id is None
    assert bad.error is not None
    assert bad.error.code == "bad_request"
    assert bad.attempts == 0
    assert batch.summary.submitted == 1


async def test_an_unknown_outcome_is_reported_and_not_resubmitted_unless_asked(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    jobs = jobs_of("first", "second")
    server.inject("error", action="generate")  # a 500: the task may exist
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        results = {result.job.key: result for result in await collect(batch)}
    unknown = results["1"]
    assert unknown.state is JobState.OUTCOME_UNKNOWN
    assert unknown.error is not None
    assert "may have reached the service" in (unknown.error.message or "")
    assert results["2"].state is JobState.SUCCEEDED
    assert batch.summary.outcome_unknown == 1

    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        again = await collect(batch)
    assert [(r.job.key, r.job.prompt, r.state) for r in again] == [
        ("1", "first", JobState.OUTCOME_UNKNOWN)
    ]
    assert server.counts["generate"] == 2  # not submitted again

    async with fast_client(server) as client:
        batch = runner(client, jobs, tmp_path, resubmit_unknown=True)
        async with batch:
            (resubmitted,) = await collect(batch)
    assert resubmitted.state is JobState.SUCCEEDED
    assert resubmitted.attempts == 2
    assert batch.summary.resubmitted == 1
    assert batch.summary.complete


async def test_an_intent_without_task_id_is_an_unknown_outcome(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """What a process killed during its request leaves in the journal."""
    jobs = jobs_of("a lighthouse")
    journal = Journal(tmp_path / ".nanobanana" / "journal.sqlite3")
    await journal.open()
    await journal.intend("1", spec_text(jobs[0]), "first", 1)
    await journal.aclose()
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        (result,) = await collect(batch)
    assert result.state is JobState.OUTCOME_UNKNOWN
    assert result.job.prompt == "a lighthouse"
    assert result.error is not None
    assert result.error.code == "outcome_unknown"
    assert server.counts["generate"] == 0
    assert manifest(tmp_path)[0]["state"] == "outcome_unknown"


async def test_a_run_killed_between_the_outcome_and_the_download_saves_on_rerun(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """Found by the SIGKILL scenario: the journal said succeeded with no files yet, and
    the rerun took the job as done, so its manifest line listed no files."""
    jobs = jobs_of("a lighthouse")
    task_id = server.add_task()
    urls = server.tasks[task_id].image_urls
    journal = Journal(tmp_path / ".nanobanana" / "journal.sqlite3")
    await journal.open()
    await journal.intend("1", spec_text(jobs[0]), "first", 1)
    await journal.submitted("1", 1, task_id, None)
    await journal.finished(
        "1", succeeded=True, trace_id=None, image_urls=urls, error=None, retryable=False
    )
    await journal.aclose()  # the kill: no ``saved`` row
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        (result,) = await collect(batch)
    assert result.state is JobState.SUCCEEDED
    assert [file.name for file in result.files] == ["1-0.png"]
    assert (tmp_path / "1-0.png").read_bytes().startswith(PNG_MAGIC)
    assert manifest(tmp_path)[0]["files"] == ["1-0.png"]
    assert server.counts["generate"] == 0


async def test_an_id_the_service_refuses_stays_pending_for_the_next_run(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """A 400 for one id: the poll loop fails only that wait, and the batch keeps that
    job pending with its task id (it once stopped the whole batch for good; failing
    the job for good would drop a task that may be paid for and finish later)."""
    jobs = jobs_of("refused", "fine")
    refused = server.add_task(duration=0.05)
    server.inject("error", status=400, action="retrieve_batch", task_id=refused, times=1000)
    journal = Journal(tmp_path / ".nanobanana" / "journal.sqlite3")
    await journal.open()
    await journal.intend("1", spec_text(jobs[0]), "first", 1)
    await journal.submitted("1", 1, refused, None)
    await journal.aclose()
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        results = {result.job.key: result for result in await collect(batch)}
    assert results["1"].state is JobState.PENDING
    assert results["1"].task_id == refused
    assert results["1"].error is not None
    assert results["1"].error.code == "bad_request"
    assert results["2"].state is JobState.SUCCEEDED
    assert (batch.summary.pending, batch.summary.succeeded) == (1, 1)
    assert [line["state"] for line in manifest(tmp_path)] == ["pending", "succeeded"]
    server.clear_faults()
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        (result,) = await collect(batch)
    assert result.state is JobState.SUCCEEDED
    assert result.task_id == refused
    assert (batch.summary.resumed, batch.summary.submitted) == (1, 0)


async def test_an_unreadable_local_image_fails_its_job_only_and_unjournaled(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """A missing file once stopped the batch with the intent journaled, so the next
    run called a job that was never sent "outcome unknown"."""
    photo = tmp_path / "photo.png"
    jobs = [BatchJob("edit", "make it blue", image_urls=[str(photo)]), BatchJob("gen", "a cat")]
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        results = {result.job.key: result for result in await collect(batch)}
    assert results["edit"].state is JobState.FAILED
    assert results["edit"].error is not None
    assert results["edit"].error.code == "bad_image"
    assert "photo.png" in (results["edit"].error.message or "")
    assert results["gen"].state is JobState.SUCCEEDED
    assert server.counts["edit"] == 0
    photo.write_bytes(PNG_MAGIC + b"\0" * 64)
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        (result,) = await collect(batch)
    assert result.state is JobState.SUCCEEDED
    assert batch.summary.outcome_unknown == 0
    (task,) = (task for task in server.tasks.values() if task.request["action"] == "edit")
    assert task.request["image_urls"][0].startswith("data:image/png;base64,")


async def test_the_task_id_is_journaled_even_when_on_submit_raises(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """``on_submit`` is called before the journal write; a failing callback stops the
    batch, but the task id it was given is journaled, so the next run waits on it."""

    def broken(job: BatchJob, submission: object) -> None:
        raise RuntimeError("the caller's callback broke")

    jobs = jobs_of("a cat")
    async with fast_client(server) as client, runner(client, jobs, tmp_path, on_submit=broken) as b:
        with pytest.raises(RuntimeError, match="callback broke"):
            await collect(b)
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        (result,) = await collect(batch)
    assert result.state is JobState.SUCCEEDED
    assert (batch.summary.resumed, batch.summary.outcome_unknown) == (1, 0)
    assert server.counts["generate"] == 1


async def test_a_slow_image_is_a_download_failure_not_the_batch_timeout(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """The client's own per-request timeout (an APITimeoutError, also a TimeoutError)
    was reported as the batch's ``download_timeout`` running out."""
    server.inject_image("slow", delay=5.0, times=10)
    jobs = jobs_of("a cat")
    client = fast_client(server, timeout=0.2)
    async with client, runner(client, jobs, tmp_path, download_timeout=60) as batch:
        (result,) = await collect(batch)
    assert result.state is JobState.DOWNLOAD_FAILED
    assert result.error is not None
    assert result.error.code == "download_failed"
    async with (
        fast_client(server) as client,
        runner(client, jobs, tmp_path, download_timeout=0.1) as batch,
    ):
        (result,) = await collect(batch)  # the next run saves it: "slow" still queued
    assert result.error is not None
    assert result.error.code == "download_timeout"
    assert "took over 0.1 s" in (result.error.message or "")


async def test_an_error_no_job_can_pass_stops_the_batch_cleanly(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    jobs = jobs_of("a", "b")
    wrong = NanoBananaClient("wrong", base_url=server.base_url, **FAST)
    async with wrong as client, runner(client, jobs, tmp_path) as batch:
        with pytest.raises(AuthenticationError):
            await collect(batch)
    assert batch.summary.pending == 2
    assert batch.summary.submitted == 0
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        await collect(batch)
    assert batch.summary.submitted == 2  # the refused intent was withdrawn, not "unknown"
    assert batch.summary.complete


async def test_a_proxy_403_page_stops_the_batch_and_the_jobs_stay_to_submit(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """A 403 with no error code is no verdict on one prompt: it once failed every job
    for good (refused, not retryable), and the rerun skipped them all."""
    server.inject("html", status=403, action="generate", times=10)
    jobs = jobs_of("a", "b", "c")
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        with pytest.raises(PermissionDeniedError):
            await collect(batch)
    assert batch.summary.failed == 0
    server.clear_faults()
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        await collect(batch)
    assert (batch.summary.submitted, batch.summary.succeeded) == (3, 3)


async def test_a_client_closed_during_a_submission_leaves_an_unknown_outcome(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """The request was out when the client closed: the service may have made the task.
    The intent was once withdrawn as if nothing had been sent, so the next run paid
    again and nothing recorded the first task."""
    server.inject("slow", action="generate", delay=2.0)
    jobs = jobs_of("a cat")
    client = fast_client(server)
    async with client, runner(client, jobs, tmp_path) as batch:
        running = asyncio.ensure_future(collect(batch))
        async with asyncio.timeout(WAIT):
            while not server.counts["generate"]:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await client.aclose()
        with pytest.raises(ClientClosedError) as caught:
            await running
    assert caught.value.request_sent
    assert batch.summary.outcome_unknown == 1
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        (result,) = await collect(batch)
    assert result.state is JobState.OUTCOME_UNKNOWN
    assert batch.summary.submitted == 0
    assert server.counts["generate"] == 1


async def test_an_account_refusal_while_waiting_stops_the_batch(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """A 400 token_mismatched fails every waiter of the poll loop; the batch took it
    for one task's read error and ran to its end with every job pending."""
    jobs = jobs_of("a", "b")
    server.inject(
        "error", status=400, code="token_mismatched", action="retrieve_batch", times=100
    )
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        with pytest.raises(BadRequestError):
            await collect(batch)
    assert batch.summary.pending == 2
    assert batch.summary.submitted == 2


async def test_jobs_left_out_of_the_input_are_a_change(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    async with fast_client(server) as client:
        await run_batch(client, jobs_of("a cat", "a dog"), **_paths(tmp_path))
        with pytest.raises(BatchChangedError) as caught:
            await run_batch(client, jobs_of("a cat"), **_paths(tmp_path))
    (change,) = caught.value.changes
    assert (change.key, change.after) == ("2", None)
    assert change.task_id == manifest(tmp_path)[1]["task_id"]
    assert "now missing" in str(caught.value)


async def test_a_second_cancel_during_a_submission_says_the_outcome_is_unknown(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """Found in review: a second Ctrl-C abandoned the request and the run reported the
    job pending, with no task, though the service may have made one."""
    server.inject("slow", action="generate", delay=2.0)
    async with fast_client(server) as client:
        batch = runner(client, jobs_of("a cat"), tmp_path)
        async with batch:
            running = asyncio.ensure_future(collect(batch))
            async with asyncio.timeout(WAIT):
                while not server.counts["generate"]:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            running.cancel()  # the first stop lets the request finish...
            await asyncio.sleep(0.05)
            running.cancel()  # ...a second gives up on it, and ends only once it is over
            with pytest.raises(asyncio.CancelledError):
                await running
            # The client is still open: the job was stopped, not its client closed.
            assert batch.result("1").state is JobState.OUTCOME_UNKNOWN
            assert batch.summary.outcome_unknown == 1
            assert not [t for t in asyncio.all_tasks() if "_run_job" in repr(t.get_coro())]


async def test_changed_jobs_are_refused_before_any_submission(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    async with fast_client(server) as client:
        await run_batch(client, jobs_of("a cat", "a dog"), **_paths(tmp_path))
        changed = [BatchJob("1", "a cat"), BatchJob("2", "a wolf"), BatchJob("3", "new")]
        with pytest.raises(BatchChangedError) as caught:
            await run_batch(client, changed, **_paths(tmp_path))
    assert [change.key for change in caught.value.changes] == ["2"]
    assert "'a dog'" in str(caught.value)
    assert "'a wolf'" in str(caught.value)
    assert server.counts["generate"] == 2
    assert len(manifest(tmp_path)) == 2  # untouched by the refused run


async def test_one_journal_one_runner(server: FakeNanoBanana, tmp_path: Path) -> None:
    jobs = jobs_of("a")
    async with fast_client(server) as client, runner(client, jobs, tmp_path):
        with pytest.raises(JournalBusyError):
            async with runner(client, jobs, tmp_path):
                pass


async def test_a_failed_download_is_retried_by_the_next_run(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    server.inject_image("html", times=10)
    jobs = jobs_of("a cat")
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        (result,) = await collect(batch)
    assert result.state is JobState.DOWNLOAD_FAILED
    assert result.image_urls
    assert result.error is not None
    assert result.error.code == "download_failed"
    server.clear_faults()
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        (result,) = await collect(batch)
    assert result.state is JobState.SUCCEEDED
    assert server.counts["generate"] == 1


async def test_edit_jobs_and_data_urls_in_the_manifest(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    data_url = "data:image/png;base64," + "A" * 400
    jobs = [BatchJob("blue", "make it blue", image_urls=["https://example.com/a.png", data_url])]
    async with fast_client(server) as client:
        await run_batch(client, jobs, **_paths(tmp_path))
    (task,) = server.tasks.values()
    assert task.request["action"] == "edit"
    assert task.request["image_urls"][1] == data_url
    (line,) = manifest(tmp_path)
    assert line["action"] == "edit"
    assert line["source_images"][0] == "https://example.com/a.png"
    assert line["source_images"][1].startswith("data:image/png;sha256,")


async def test_saved_images_honour_the_umask(server: FakeNanoBanana, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        async with fast_client(server) as client:
            await run_batch(client, jobs_of("a cat"), **_paths(tmp_path))
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "1-0.png").stat().st_mode)
    assert mode == 0o640


async def test_leaving_the_loop_early_stops_the_jobs(
    slow_server_batch: FakeNanoBanana, tmp_path: Path
) -> None:
    jobs = jobs_of("a", "b", "c")
    async with (
        fast_client(slow_server_batch) as client,
        runner(client, jobs, tmp_path) as batch,
        aclosing(batch.__aiter__()) as results,
    ):
        async for first in results:
            assert first.state is JobState.OUTCOME_UNKNOWN
            break
    assert (batch.summary.outcome_unknown, batch.summary.pending) == (1, 2)


@pytest.fixture
async def slow_server_batch() -> Any:
    async with FakeNanoBanana(duration=60.0) as fake:
        fake.inject("error", action="generate")  # the first job ends at once, unknown
        yield fake


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"retries": -1}, "retries"),
        ({"name_template": "{key}.png"}, "{index}"),
        ({"name_template": "../{key}-{index}"}, "plain"),
        ({"name_template": "{key}-{index}-{nope}"}, "unknown field"),
        ({"max_in_flight": True}, "max_in_flight"),
        ({"retries": 1.5}, "retries"),
        ({"download_timeout": float("nan")}, "download_timeout"),
        ({"download_timeout": True}, "download_timeout"),
        ({"download_timeout": 0}, "download_timeout"),
    ],
)
def test_bad_options_raise_value_error(
    kwargs: dict[str, Any], message: str, tmp_path: Path
) -> None:
    client = NanoBananaClient("token")
    with pytest.raises(ValueError, match=message):
        runner(client, jobs_of("a"), tmp_path, **kwargs)


def test_bad_jobs_raise_value_error(tmp_path: Path) -> None:
    client = NanoBananaClient("token")
    with pytest.raises(ValueError, match="job '1': aspect_ratio"):
        runner(client, [BatchJob("1", "x", aspect_ratio="5:4")], tmp_path)
    with pytest.raises(ValueError, match="two jobs have the key"):
        runner(client, [BatchJob("1", "x"), BatchJob("1", "y")], tmp_path)
    with pytest.raises(ValueError, match="same file names"):
        runner(client, [BatchJob("Cat", "x"), BatchJob("cat", "y")], tmp_path)
    with pytest.raises(ValueError, match="key"):
        BatchJob("", "x")


async def test_breaking_out_without_aclosing_still_closes_cleanly(
    slow_server_batch: FakeNanoBanana, tmp_path: Path
) -> None:
    jobs = jobs_of("a", "b", "c")
    async with fast_client(slow_server_batch) as client, runner(client, jobs, tmp_path) as batch:
        async for _ in batch:
            break  # the generator is left suspended; leaving "async with" stops the jobs
    assert batch.summary.pending == 2
    assert len(manifest(tmp_path)) == 3


async def test_keys_become_safe_file_names(server: FakeNanoBanana, tmp_path: Path) -> None:
    jobs = [BatchJob("../up", "a cat"), BatchJob(".hidden", "a dog")]
    seen: list[str] = []
    async with fast_client(server) as client:
        batch = runner(client, jobs, tmp_path, on_submit=lambda job, sub: seen.append(job.key))
        async with batch:
            await collect(batch)
    assert seen == ["../up", ".hidden"]
    up, hidden = sorted(pngs(tmp_path))
    assert re.fullmatch(r"_up-[0-9a-f]{10}-0\.png", up)
    assert re.fullmatch(r"hidden-[0-9a-f]{10}-0\.png", hidden)


async def test_keys_that_differ_get_different_file_names(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    """Keys were made safe twice (by the batch, then again by the download), so the
    checked names were not the written ones: "a b" and "a_b" overwrote each other."""
    long = "x" * 150
    keys = ["a b", "a_b", "a/b", "é", "ü", long, long + "y", "z" * 99]
    jobs = [BatchJob(key, f"picture {n}", count=2) for n, key in enumerate(keys)]
    async with fast_client(server) as client, runner(client, jobs, tmp_path) as batch:
        results = await collect(batch)
    assert all(result.state is JobState.SUCCEEDED for result in results)
    names = [path.name for result in results for path in result.files]
    assert len(set(names)) == 2 * len(keys)
    assert "a_b-0.png" in names  # a key that is already a safe name stays as it is
    assert all(len(name) <= 100 for name in names)


def pngs(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.suffix == ".png")


async def test_a_database_that_is_not_a_journal_is_refused_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE users (name TEXT)")
        db.commit()
    client = NanoBananaClient("token")
    with pytest.raises(JournalError, match="not a batch journal"):
        async with BatchRunner(client, jobs_of("a"), journal=path):
            pass
    with contextlib.closing(sqlite3.connect(path)) as db:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master")}
    assert tables == {"users"}  # none of ours added


async def test_a_journal_whose_rows_do_not_read_is_closed_again(tmp_path: Path) -> None:
    """Found in review: it stayed open and locked, so a second try said "busy"."""
    path = tmp_path / "journal.sqlite3"
    journal = Journal(path)
    await journal.open()
    await journal.intend("1", spec_text(jobs_of("a")[0]), "first", 1)
    await journal.aclose()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("UPDATE jobs SET image_urls = 'not json'")
        db.commit()
    client = NanoBananaClient("token")
    for _ in range(2):  # the same error both times: not JournalBusyError the second
        with pytest.raises(JournalError, match="cannot be used") as caught:
            async with BatchRunner(client, jobs_of("a"), journal=path):
                pass
        assert not isinstance(caught.value, JournalBusyError)


async def test_a_journal_call_ends_before_a_cancel_goes_on(tmp_path: Path) -> None:
    """A second cancel (a second Ctrl-C) once let the caller go on while the write
    still ran in the journal's thread."""
    journal = Journal(tmp_path / "journal.sqlite3")
    await journal.open()
    release = threading.Event()
    done: list[bool] = []

    def slow_write() -> None:
        release.wait(5)
        done.append(True)

    call = asyncio.ensure_future(journal.run_io(slow_write))
    await asyncio.sleep(0.05)
    for _ in range(2):
        call.cancel()
        await asyncio.sleep(0.05)
    assert not call.done()
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, WAIT)
    assert done == [True]
    await journal.aclose()
