"""Shared fixtures: a fake server on loopback and clients tuned to be fast in tests."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

from nanobanana_async import NanoBananaClient, RetryPolicy
from nanobanana_async.testing import FakeNanoBanana

# CI explores the same examples on every run; locally each run explores new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

pytest_plugins = ["pytester"]  # tests/test_pytest_plugin.py runs small user projects

FIXTURES = Path(__file__).parent / "fixtures"

# Fast, deterministic settings: short polls, retries without waiting.
FAST: dict[str, Any] = {
    "poll_interval": 0.02,
    "max_poll_interval": 0.1,
    "not_found_grace": 0.3,
    "retry": RetryPolicy.no_wait(),
    "timeout": 5.0,
}


def load_fixture(name: str) -> Any:
    """A recorded sample from tests/fixtures, parsed if it is JSON."""
    text = (FIXTURES / name).read_text()
    return json.loads(text) if name.endswith(".json") else text


@pytest.fixture
async def server() -> AsyncIterator[FakeNanoBanana]:
    async with FakeNanoBanana() as fake:
        yield fake


@pytest.fixture
def make_client(server: FakeNanoBanana) -> Callable[..., NanoBananaClient]:
    """Build a client for the fake server; the test closes it (``async with``)."""

    def make(**options: Any) -> NanoBananaClient:
        settings = {"base_url": server.base_url, **FAST, **options}
        return NanoBananaClient(server.token, **settings)

    return make


@pytest.fixture
async def client(
    make_client: Callable[..., NanoBananaClient],
) -> AsyncIterator[NanoBananaClient]:
    async with make_client() as fast_client:
        yield fast_client
