"""Shared fixtures: one real nats-server per test session, isolated temp dirs."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings

from tests.helpers import NatsServer, WorkerProcess

# Hypothesis (tests/test_fuzz.py, tests/test_fuzz_multimodal.py) in CI: derandomized, so each fuzz
# test draws the same inputs on every CI run (its seed comes from the test's own source) and a CI
# failure reproduces with the same command; print_blob adds the @reproduce_failure line to a
# failure's report. No example database and no deadline there either. Loaded when the environment
# has CI=true (GitHub Actions sets it); tests/test_ci.py checks it is. Hypothesis has a built-in
# "ci" profile it loads itself on seeing a CI variable: this one replaces it, so CI runs what is
# written here whatever Hypothesis's version. The fuzz tests' settings objects are created at import,
# after this conftest, and inherit what they do not set from this profile; they set max_examples,
# deadline=None, database=None and suppress_health_check (a superset of the built-in profile's),
# never derandomize or print_blob, so nothing here is overridden. Elsewhere the default profile
# stays: random inputs on every run, and a failure that does not replay says its
# --hypothesis-seed to rerun it.
HYPOTHESIS_CI_PROFILE = "ci"
HYPOTHESIS_CI = settings(
    settings.get_profile("default"), derandomize=True, print_blob=True, database=None, deadline=None
)
settings.register_profile(HYPOTHESIS_CI_PROFILE, HYPOTHESIS_CI)
if os.environ.get("CI") == "true":
    settings.load_profile(HYPOTHESIS_CI_PROFILE)


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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On a failure, the tail of every worker log written during the test, so a CI log alone
    shows what the workers saw."""
    report = yield
    if report.failed:
        since = getattr(item, "_worker_logs_since", 0.0)
        for worker in WorkerProcess.started:
            if worker.log_path.exists() and worker.log_path.stat().st_mtime >= since:
                report.sections.append(
                    (f"worker log tail: {' '.join(worker.args[:2])} pid {worker.pid}", worker.log_tail())
                )
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item._worker_logs_since = time.time()  # type: ignore[attr-defined]
