"""Shared fixtures: one real nats-server per test session, isolated temp dirs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.helpers import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    server = NatsServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def namespace() -> str:
    """A namespace per test, so tests sharing one NATS server never see each other's instances."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny demo Llama, written once per test session."""
    from dynamo_worker.demo_model import write_demo_model

    return str(write_demo_model(tmp_path_factory.mktemp("demo-model") / "model"))


@pytest.fixture(scope="session")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny Blip2 of the multimodal tests, written once per session (read-only for them)."""
    from dynamo_worker.demo_vlm import write_demo_vlm

    return str(write_demo_vlm(tmp_path_factory.mktemp("vlm") / "model"))
