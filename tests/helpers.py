"""Test helpers: a real nats-server, worker subprocesses, fake distributions, polling."""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# The public testing helper's (a role author's suite uses the same): one definition of each.
from dynamo_worker.testing import NatsServer, free_port, nats_server_binary  # noqa: F401

BIN = Path(sys.executable).parent
DYNAMO_WORKER = str(BIN / "dynamo-worker")


def free_kv_event_port(count: int = 1) -> int:
    """A base port in DYN_VLLM_KV_EVENT_PORT's range (1024-49151, unlike the OS's ephemeral ones)
    with ``count`` free ports from it (one per data-parallel rank)."""
    for _ in range(200):
        base = random.randint(20000, 49000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise AssertionError("no free port for KV events")


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


def worker_env(extra_path: Path | None = None, **env: str) -> dict[str, str]:
    e = dict(os.environ)
    e.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if extra_path is not None:
        e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), e.get("PYTHONPATH", "")]))
    e.update(env)
    return e


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DYNAMO_WORKER, *args],
        capture_output=True,
        text=True,
        env=env or worker_env(),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class WorkerProcess:
    """``dynamo-worker --role ...`` as a child process, with its log captured to a file."""

    started: list[WorkerProcess] = []  # every one of the session, for the failure report (conftest.py)

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        wrapper: list[str] | None = None,
    ) -> None:
        """``wrapper``: an argv prefix to run it under (``ip netns exec NS``: a host of tests/netns.py)."""
        self.args = args
        self.log_path = Path(tempfile.mkstemp(prefix="dw-worker-", suffix=".log", dir=log_dir)[1])
        WorkerProcess.started.append(self)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*(wrapper or []), DYNAMO_WORKER, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env or worker_env(),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40, width: int = 400) -> str:
        """The last ``lines`` lines of the log, each cut at ``width`` characters (vLLM logs its whole
        config on one line)."""
        return "\n".join(line[:width] for line in self.log().splitlines()[-lines:])

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and text not in self.log():
                raise AssertionError(f"worker exited {self.proc.returncode} before logging {text!r}:\n{self.log()}")
            return text in self.log()

        wait_until(seen, timeout, what=f"log line {text!r}")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def write_distribution(site: Path, dist: str, version: str, roles: dict[str, str], modules: dict[str, str]) -> None:
    """A real installed-distribution layout (``*.dist-info`` + modules) under ``site``."""
    site.mkdir(parents=True, exist_ok=True)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {value}\n" for name, value in roles.items())
    (info / "entry_points.txt").write_text(f"[dynamo_worker.roles]\n{lines}")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)


def slow_counter(cancelled: asyncio.Event) -> Any:
    """An endpoint handler counting to 1,000 one item per 10 ms; sets ``cancelled`` if it is cancelled."""

    async def slow(request: Any, context: Any) -> Any:
        try:
            for i in range(1000):
                yield i
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    return slow


def endpoint_inflight(port: int, endpoint: str = "generate") -> float:
    """Requests a worker's ``endpoint`` is serving now, read from its /metrics (the worker's own
    view: a caller's view lags, a stream can finish on the worker well before its caller sees it)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == "dynamo_component_inflight_requests" and s.labels.get("dynamo_endpoint") == endpoint
    )


async def signal_while_busy(
    proc: WorkerProcess,
    sig: int,
    start: Callable[[int], list[asyncio.Task[Any]]],
    inflight: Callable[[], float],
    *,
    at_least: int = 2,
    waves: int = 3,
    timeout: float = 60,
) -> tuple[float, list[Any]]:
    """Start a wave of calls (``start(wave)`` returns their tasks; wave 0, 1, ...) and send ``sig`` to ``proc`` once
    ``inflight()`` reaches ``at_least``; return that count and the wave's results (exceptions
    included). A wave that ends before (the worker answered faster than the poll) must have
    succeeded, and the next one is started; after ``waves`` of them the test fails, saying so."""
    seen = 0.0
    for wave in range(waves):
        calls = start(wave)
        deadline = time.monotonic() + timeout
        while not all(c.done() for c in calls) and time.monotonic() < deadline:
            n = await asyncio.to_thread(inflight)
            seen = max(seen, n)
            if n >= at_least:
                proc.signal(sig)
                return n, await asyncio.gather(*calls, return_exceptions=True)
            await asyncio.sleep(0.005)
        if not all(c.done() for c in calls):
            for c in calls:
                c.cancel()
            raise AssertionError(
                f"the calls neither finished nor had {at_least} in flight within {timeout}s (at most {seen:.0f} seen)"
            )
        results = [c.exception() or c.result() for c in calls]
        assert not any(isinstance(r, BaseException) for r in results), results
    raise AssertionError(
        f"{waves} waves of calls never had {at_least} in flight on the worker at once (at most {seen:.0f} seen)"
    )


def child_pids(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc: no psutil in the test dependencies)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return out


def process_name(pid: int) -> str:
    """A process's name (``comm``; vLLM sets it to its process title, e.g. ``VLLM::EngineCor``)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def metric_sum(url: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` (whose labels include ``labels``) on the /metrics page
    at ``url``, parsed with prometheus_client's text parser (a counter's samples end in ``_total``)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


# What the frontend's router logs for each retry and each migration (dynamo_worker/frontend/router.py);
# ``cause`` is the request-plane error as "code: message".
_RETRY_LINE = re.compile(r"failed before the first token \((?P<cause>.*)\); retry \d+ of \d+$", re.MULTILINE)
_MIGRATION_LINE = re.compile(r"failed after \d+ tokens \((?P<cause>.*)\); migrating \(\d+ of \d+\)$", re.MULTILINE)
# Retry causes that mean no worker ever took the request: the instance's NATS subscription was gone
# ("no responders") or its TCP listener no longer served the endpoint. A draining worker gives them
# to requests routed to it in the moment before the frontend saw it withdraw: nothing it had
# accepted is lost, the request simply goes to another worker.
NEVER_TAKEN = ("unavailable: no instance listens on ", "unavailable: this instance does not serve ")


class FrontendRecoveries:
    """What a frontend recovered from here on: its retries and migrations, counted on its /metrics
    and, each with its cause, in its log.

    A frontend with ``--request-retries`` and ``--migration-limit`` hides from clients a worker
    that cut its streams (the cut requests are retried or migrated and complete): a drain test run
    through one must also check that the frontend recovered nothing. ``base`` is the frontend's
    URL; None for a frontend that will not be there to ask at the end (the log alone is checked).
    """

    def __init__(self, frontend: WorkerProcess, base: str | None) -> None:
        self.frontend, self.base = frontend, base
        self.log_start = len(frontend.log())
        self.start = self.counters() if base is not None else None

    def counters(self) -> tuple[float, float]:
        """The frontend's retries and migrations counters (every model)."""
        return (
            metric_sum(f"{self.base}/metrics", "dynamo_frontend_retries_total"),
            metric_sum(f"{self.base}/metrics", "dynamo_frontend_migrations_total"),
        )

    def logged(self) -> tuple[list[str], list[str]]:
        """The causes of the retries and of the migrations the frontend logged since."""
        new = self.frontend.log()[self.log_start :]
        return ([m["cause"] for m in _RETRY_LINE.finditer(new)], [m["cause"] for m in _MIGRATION_LINE.finditer(new)])

    def assert_none_cut(self) -> dict[str, Any]:
        """No stream was migrated, and every retry was of a request no worker had taken; returns the
        figures (counter moves and causes) for the test's report."""
        retry_causes, migration_causes = self.logged()
        figures: dict[str, Any] = {"retry_causes": retry_causes, "migration_causes": migration_causes}
        if self.start is not None:
            retries, migrations = (now - then for now, then in zip(self.counters(), self.start, strict=True))
            figures.update(retries=int(retries), migrations=int(migrations))
            # The counters and the log agree, so the log's causes are every recovery's (a log that
            # said nothing, at another log level, could not pass for "nothing recovered").
            assert (retries, migrations) == (len(retry_causes), len(migration_causes)), figures
        else:  # the log alone: it must be one that would show a retry (they are logged at INFO)
            assert " INFO " in self.frontend.log(), "the frontend logs nothing at INFO: retries would not show"
        assert not migration_causes, f"streams cut after their first token, migrated by the frontend: {figures}"
        cut = [c for c in retry_causes if not c.startswith(NEVER_TAKEN)]
        assert not cut, f"requests a worker had taken were cut and retried by the frontend: {figures}"
        return figures
