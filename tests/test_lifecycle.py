"""A worker's life, start to shutdown, through the real CLI, runtime and a real nats-server."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import NatsServer, WorkerProcess, free_port, run_cli, wait_until, worker_env, write_distribution

RECORDING_ROLE = '''
import os
from dynamo_worker.core.hookspecs import hookimpl

def record(entry):
    with open(os.environ["RECORD_FILE"], "a") as f:
        f.write(entry + "\\n")

class RecordingRole:
    """Records every hook call, in order."""
    name = "recording"

    @hookimpl
    def dynamo_worker_add_arguments(self, parser):
        record("add_arguments")

    @hookimpl
    def dynamo_worker_configure(self, ctx):
        record("configure")

    @hookimpl
    async def dynamo_worker_create_engine(self, ctx):
        record("create_engine(runtime_connected=%s)" % (not ctx.runtime.nc.is_closed))
        return "engine"

    @hookimpl
    def dynamo_worker_register_metrics(self, registry, ctx):
        record("register_metrics(engine=%s)" % ctx.engine)

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar, ctx):
        record("register_endpoints")
        async def generate(request, context):
            yield {"ok": True}
        registrar.endpoint("generate", generate)

    @hookimpl
    def dynamo_worker_health_payload(self, ctx):
        record("health_payload")
        return {"probe": 1}

    checked = False

    @hookimpl
    async def dynamo_worker_check_engine(self, ctx):
        if not self.checked:  # periodic: record the first call only
            self.checked = True
            record("check_engine")
        return True

    @hookimpl
    async def dynamo_worker_shutdown(self, ctx):
        record("shutdown(withdrawn=%s, inflight=%d)" % (not ctx.runtime.discovery._records, ctx.runtime.inflight()))
'''


def test_hooks_run_in_the_documented_order_from_start_to_shutdown(
    tmp_path: Path, nats_server: NatsServer, namespace: str
) -> None:
    site = tmp_path / "site"
    write_distribution(
        site,
        "recording-role",
        "0.1.0",
        {"recording": "recording_role:RecordingRole"},
        {"recording_role": RECORDING_ROLE},
    )
    record = tmp_path / "record.txt"
    dump = tmp_path / "config.json"
    port = free_port()
    worker = WorkerProcess(
        [
            "--role",
            "recording",
            "--nats-url",
            nats_server.url,
            "--namespace",
            namespace,
            "--system-port",
            str(port),
            "--dump-config-to",
            str(dump),
            "--engine-check-interval",
            "0.1",
        ],
        env=worker_env(site, RECORD_FILE=str(record)),
    )
    try:
        worker.wait_for_log("serving")
        wait_until(lambda: "check_engine" in record.read_text(), 10, what="the engine monitor's first check")
        health = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/health"))
        assert health["status"] == "healthy" and health["endpoints"] == ["generate"]
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 0
    finally:
        worker.stop()
    assert record.read_text().splitlines() == [
        "add_arguments",
        "configure",
        "create_engine(runtime_connected=True)",
        "register_metrics(engine=engine)",
        "register_endpoints",
        "health_payload",
        "check_engine",
        "shutdown(withdrawn=True, inflight=0)",
    ]
    config = json.loads(dump.read_text())
    assert config["role"]["name"] == "recording" and config["options"]["namespace"] == namespace


STUCK_ROLE = '''
import time
from dynamo_worker.core.hookspecs import hookimpl

class StuckRole:
    """Serves; its shutdown hook blocks the event loop (an engine that will not stop)."""
    name = "stuck"

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar, ctx):
        async def generate(request, context):
            yield {"ok": True}
        registrar.endpoint("generate", generate)

    @hookimpl
    async def dynamo_worker_shutdown(self, ctx):
        stop_the_engine_forever()

def stop_the_engine_forever():
    time.sleep(600)
'''


def test_a_shutdown_step_that_hangs_ends_in_exit_1_with_the_stuck_stack(
    tmp_path: Path, nats_server: NatsServer, namespace: str
) -> None:
    site = tmp_path / "site"
    write_distribution(site, "stuck-role", "0.1.0", {"stuck": "stuck_role:StuckRole"}, {"stuck_role": STUCK_ROLE})
    worker = WorkerProcess(
        ["--role", "stuck", "--nats-url", nats_server.url, "--namespace", namespace, "--shutdown-cleanup-timeout", "1"],
        env=worker_env(site),
    )
    try:
        worker.wait_for_log("serving")
        worker.signal(signal.SIGTERM)
        assert worker.wait(30) == 1  # not the 600 s the hook would block
    finally:
        worker.stop()
    log = worker.log()
    assert "shutdown did not finish within 1s of the drain; exiting 1" in log
    assert "shutdown: background tasks stopped; running the role's shutdown hooks" in log
    assert "stop_the_engine_forever" in log  # the stack shows where it hung


def test_the_shutdown_cleanup_timeout_must_be_positive() -> None:
    result = run_cli("--role", "echo", "--shutdown-cleanup-timeout", "0")
    assert result.returncode != 0
    assert "--shutdown-cleanup-timeout" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("role", ["frontend", "echo"])
def test_a_role_stopped_while_its_nats_server_is_down_exits_0_without_a_traceback(
    tmp_path: Path, role: str, namespace: str
) -> None:
    # A server of its own: this test kills it.
    server = NatsServer()
    server.start()
    extra = ["--http-port", str(free_port())] if role == "frontend" else []
    worker = WorkerProcess(
        ["--role", role, "--nats-url", server.url, "--namespace", namespace, *extra], log_dir=tmp_path
    )
    try:
        worker.wait_for_log("serving")
        server.stop(signal.SIGKILL)
        worker.wait_for_log("lost the NATS connection")  # its client is reconnecting now
        worker.signal(signal.SIGTERM)
        status = worker.wait(60)
    finally:
        worker.stop()
        server.cleanup()
    log = worker.log()
    assert status == 0, log
    assert "Traceback" not in log, log
    assert "NATS is unreachable; closing the connection without draining it" in log
    assert "stopped (exit 0)" in log
