"""The pytest plugin of nanobanana-async: a fake server and a client bound to it, as fixtures.

pytest loads it by itself once nanobanana-async is installed (the ``pytest11`` entry point
``nanobanana``; ``-p no:nanobanana`` turns it off). It adds fixtures, and no hooks:

``nanobanana_server``
    A started [FakeNanoBanana][nanobanana_async.testing.FakeNanoBanana] on 127.0.0.1,
    closed after the test. Override the ``nanobanana_server_options`` fixture (a dict of
    its keyword arguments) to change it, e.g. ``{"duration": 0.5}``.
``nanobanana_client``
    A [NanoBananaClient][nanobanana_async.NanoBananaClient] bound to that server, with
    fast poll settings and retries that do not wait, closed after the test.

Both live on the test's event loop, so they are for ``async def`` tests run by
pytest-asyncio (``@pytest.mark.asyncio`` in its default strict mode; any async test in
auto mode) or by anyio (``@pytest.mark.anyio``; backends other than asyncio are skipped,
since the client is built on aiohttp). No ``asyncio_mode`` setting is needed. They run on
the loop of the test's own (function) scope.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Final

import pytest

if TYPE_CHECKING:
    from nanobanana_async import NanoBananaClient
    from nanobanana_async.testing import FakeNanoBanana

try:
    import pytest_asyncio
    import pytest_asyncio.plugin
except ImportError:  # anyio alone, or neither
    pytest_asyncio = None  # type: ignore[assignment]

__all__ = ["CLIENT_OPTIONS", "nanobanana_client", "nanobanana_server", "nanobanana_server_options"]

#: The ``nanobanana_client`` fixture's settings, besides ``retry=RetryPolicy.no_wait()``:
#: short polls and request timeouts, so tests stay fast.
CLIENT_OPTIONS: Final[dict[str, Any]] = {
    "poll_interval": 0.02,
    "max_poll_interval": 0.1,
    "not_found_grace": 1.0,
    "timeout": 10.0,
}


@pytest.fixture
def nanobanana_server_options() -> dict[str, Any]:
    """Keyword arguments of the ``nanobanana_server`` fixture's FakeNanoBanana."""
    return {}


@pytest.fixture
def nanobanana_server(request: pytest.FixtureRequest) -> FakeNanoBanana:
    """A started FakeNanoBanana on 127.0.0.1, closed after the test."""
    server: FakeNanoBanana = request.getfixturevalue(_variant(request, "server"))
    return server


@pytest.fixture
def nanobanana_client(request: pytest.FixtureRequest) -> NanoBananaClient:
    """A NanoBananaClient bound to ``nanobanana_server``, fast settings, closed after the test."""
    client: NanoBananaClient = request.getfixturevalue(_variant(request, "client"))
    return client


def _variant(request: pytest.FixtureRequest, what: str) -> str:
    """The private fixture that builds ``what`` under the plugin that runs this test.

    An async fixture must run on the test's loop, so the plugin that runs the test must
    run the fixture too, and each recognises its own kind: anyio takes plain async
    fixtures of tests that use its ``anyio_backend``, while pytest-asyncio in strict
    mode takes only fixtures made with its own decorator. Each gets a variant; this
    picks one, or explains what the test lacks.
    """
    fixture = f"nanobanana_{what}"
    test = getattr(request.node, "function", None)
    test = getattr(getattr(test, "hypothesis", None), "inner_test", test)  # under @given
    if not inspect.iscoroutinefunction(test):
        pytest.fail(
            f"{fixture} runs on the test's event loop: use it in an async def test",
            pytrace=False,
        )
    if "anyio_backend" in request.fixturenames:
        backend = request.getfixturevalue("anyio_backend")
        name = backend if isinstance(backend, str) else backend[0]
        if name != "asyncio":
            pytest.skip(f"{fixture} needs anyio's asyncio backend (aiohttp), not {name}")
        return f"_{fixture}_anyio"
    # Registered under whatever name it was loaded by (entry point "asyncio", or -p).
    if pytest_asyncio is not None and request.config.pluginmanager.is_registered(
        pytest_asyncio.plugin
    ):
        mode = request.config.getoption("asyncio_mode", None) or request.config.getini(
            "asyncio_mode"
        )
        if mode != "auto" and request.node.get_closest_marker("asyncio") is None:
            pytest.fail(
                f"{fixture} runs on the test's event loop: mark the test "
                "@pytest.mark.asyncio (pytest-asyncio's strict mode runs only marked tests)",
                pytrace=False,
            )
        return f"_{fixture}_asyncio"
    pytest.fail(
        f"{fixture} runs on the test's event loop, and no plugin here runs async tests: "
        "install pytest-asyncio and mark the test @pytest.mark.asyncio, or mark it "
        "@pytest.mark.anyio",
        pytrace=False,
    )


def _new_server(options: dict[str, Any]) -> FakeNanoBanana:
    from nanobanana_async.testing import FakeNanoBanana

    return FakeNanoBanana(**options)


def _new_client(server: FakeNanoBanana) -> NanoBananaClient:
    from nanobanana_async import NanoBananaClient, RetryPolicy

    return NanoBananaClient(
        server.token, base_url=server.base_url, retry=RetryPolicy.no_wait(), **CLIENT_OPTIONS
    )


@pytest.fixture
async def _nanobanana_server_anyio(
    nanobanana_server_options: dict[str, Any],
) -> AsyncIterator[FakeNanoBanana]:
    async with _new_server(nanobanana_server_options) as server:
        yield server


@pytest.fixture
async def _nanobanana_client_anyio(
    _nanobanana_server_anyio: FakeNanoBanana,
) -> AsyncIterator[NanoBananaClient]:
    async with _new_client(_nanobanana_server_anyio) as client:
        yield client


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def _nanobanana_server_asyncio(
        nanobanana_server_options: dict[str, Any],
    ) -> AsyncIterator[FakeNanoBanana]:
        async with _new_server(nanobanana_server_options) as server:
            yield server

    @pytest_asyncio.fixture
    async def _nanobanana_client_asyncio(
        _nanobanana_server_asyncio: FakeNanoBanana,
    ) -> AsyncIterator[NanoBananaClient]:
        async with _new_client(_nanobanana_server_asyncio) as client:
            yield client
