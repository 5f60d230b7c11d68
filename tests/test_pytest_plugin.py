"""The pytest plugin, as a user's project sees it: a tiny project in a temporary folder, run
by a separate pytest process with no configuration at all (no ``asyncio_mode``), under
pytest-asyncio's strict mode, under anyio, under both, and under neither."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from nanobanana_async import NanoBananaClient, TaskFailedError
from nanobanana_async.testing import FakeNanoBanana

README = Path(__file__).parent.parent / "README.md"

# Warnings are errors in the user's run too, but for the one pytest-asyncio itself gives
# about a setting it wants every project to choose (it says nothing about us).
STRICT_WARNINGS = ("-W", "error", "-W", "ignore:The configuration option:DeprecationWarning")

USER_TESTS = '''
import pytest
from nanobanana_async import ClientClosedError, NanoBananaClient, TaskFailedError
from nanobanana_async.testing import FakeNanoBanana

held = []


@pytest.mark.asyncio
async def test_the_fixtures_share_one_server(nanobanana_server, nanobanana_client):
    assert isinstance(nanobanana_server, FakeNanoBanana)
    assert isinstance(nanobanana_client, NanoBananaClient)
    assert nanobanana_client.base_url == nanobanana_server.base_url
    task_id = nanobanana_server.add_task(outcome="fail", duration=60)
    nanobanana_server.finish(task_id)
    with pytest.raises(TaskFailedError):
        await nanobanana_client.await_completion(task_id, timeout=5)
    held.append(nanobanana_client)


@pytest.mark.asyncio
async def test_the_client_was_closed_after_its_test():
    with pytest.raises(ClientClosedError):
        await held[0].retrieve("any")


class TestInAClass:
    @pytest.mark.asyncio
    async def test_a_method(self, nanobanana_client):
        sub = await nanobanana_client.generate("a cat")
        assert await nanobanana_client.await_completion(sub, timeout=5)
'''

USER_OPTIONS = '''
import pytest


@pytest.fixture
def nanobanana_server_options():
    return {"duration": 60.0, "token": "other-token"}


@pytest.mark.asyncio
async def test_the_server_takes_options(nanobanana_server, nanobanana_client):
    assert nanobanana_server.token == "other-token"
    sub = await nanobanana_client.generate("a slow cat")
    assert not (await nanobanana_client.retrieve(sub.task_id)).done
'''

USER_MISTAKES = '''
async def test_unmarked(nanobanana_client):
    pass


def test_not_async(nanobanana_server):
    pass
'''

ANYIO_TESTS = '''
import pytest

pytestmark = pytest.mark.anyio


async def test_under_anyio(nanobanana_client):
    sub = await nanobanana_client.generate("a cat")
    assert await nanobanana_client.await_completion(sub, timeout=5)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_other_backends_are_skipped(anyio_backend, nanobanana_server):
    assert anyio_backend == "asyncio"
'''

BOTH_TESTS = '''
import pytest


@pytest.mark.asyncio
async def test_with_pytest_asyncio(nanobanana_client):
    sub = await nanobanana_client.generate("a cat")
    assert await nanobanana_client.await_completion(sub, timeout=5)


@pytest.mark.anyio
async def test_with_anyio(nanobanana_client):
    sub = await nanobanana_client.generate("a cat")
    assert await nanobanana_client.await_completion(sub, timeout=5)
'''

NEITHER_TESTS = '''
def test_a_plain_test_is_untouched():
    assert True


async def test_asks_for_a_runner(nanobanana_client):
    pass
'''


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """An empty user project: a bare ini, so nothing of this repository's config applies."""
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.delenv("PYTEST_PLUGINS", raising=False)
    pytester.makeini("[pytest]\n")
    return pytester


def run(project: pytest.Pytester, *args: str) -> pytest.RunResult:
    # looptime is one of this repo's test tools, not the user project's: keep it out.
    return project.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:looptime_plugin", *args, timeout=120
    )


def readme_testing_snippet() -> str:
    """The first python block of the README's "Testing your code" section, as pasted."""
    section = README.read_text().split("\n## Testing your code\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, "the README's Testing your code section has no python snippet"
    return match.group(1)


def test_pytest_asyncio_strict_mode_with_no_configuration(project: pytest.Pytester) -> None:
    project.makepyfile(
        test_user=USER_TESTS,
        test_options=USER_OPTIONS,
        test_mistakes=USER_MISTAKES,
        test_readme=readme_testing_snippet(),
    )
    result = run(project, "-p", "no:anyio", *STRICT_WARNINGS)
    result.assert_outcomes(passed=5, errors=2)
    result.stdout.fnmatch_lines_random(
        [
            "*nanobanana_client runs on the test's event loop: mark the test @pytest.mark.asyncio*",
            "*nanobanana_server runs on the test's event loop: use it in an async def test*",
        ]
    )
    assert re.search(r"mode=(Mode\.)?strict", result.stdout.str(), re.IGNORECASE)


def test_anyio_alone(project: pytest.Pytester) -> None:
    project.makepyfile(test_anyio=ANYIO_TESTS)
    result = run(project, "-p", "no:asyncio", "-W", "error", "-rs")
    result.assert_outcomes(passed=2, skipped=1)
    result.stdout.fnmatch_lines(["*nanobanana_server needs anyio's asyncio backend*not trio*"])


def test_pytest_asyncio_and_anyio_together(project: pytest.Pytester) -> None:
    project.makepyfile(test_both=BOTH_TESTS)
    result = run(project, *STRICT_WARNINGS)
    result.assert_outcomes(passed=2)


def test_a_project_with_neither_plugin_is_not_broken(project: pytest.Pytester) -> None:
    project.makepyfile(test_plain=NEITHER_TESTS)
    result = run(project, "-p", "no:asyncio", "-p", "no:anyio", "-W", "error")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*no plugin here runs async tests: install pytest-asyncio*"])


def test_with_plugin_autoloading_off_the_plugins_load_by_module(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    project.makepyfile(test_readme=readme_testing_snippet())
    result = run(
        project, "-p", "pytest_asyncio.plugin", "-p", "nanobanana_async.pytest_plugin"
    )
    result.assert_outcomes(passed=1)


def test_the_plugin_is_registered_by_its_entry_point(project: pytest.Pytester) -> None:
    project.makepyfile(test_plain=NEITHER_TESTS.split("\n\n\nasync def")[0])
    result = run(project, "--trace-config", "-p", "no:asyncio", "-p", "no:anyio")
    result.assert_outcomes(passed=1)
    assert os.path.join("nanobanana_async", "pytest_plugin.py") in result.stdout.str()


# In this repository's own suite (pytest-asyncio auto mode), the fixtures work unmarked.


async def test_the_fixtures_in_auto_mode(
    nanobanana_server: FakeNanoBanana, nanobanana_client: NanoBananaClient
) -> None:
    task_id = nanobanana_server.add_task(outcome="fail_no_images")
    with pytest.raises(TaskFailedError):
        await nanobanana_client.await_completion(task_id, timeout=5)
