from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from agent.gateway import create_app
from tests.gateway.fake_engine import FakeEngine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(create_app(engine, aliases=["fake-alias"]), raise_server_exceptions=False)
