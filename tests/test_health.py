"""Health canaries: the role's health payload sent through its endpoint when it has been idle."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

from tests.helpers import NatsServer, WorkerProcess, free_port, run_cli, wait_until, worker_env


def health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_an_idle_worker_sends_its_canary_and_stays_healthy(nats_server: NatsServer, namespace: str) -> None:
    port = free_port()
    worker = WorkerProcess(["--role", "echo", "--nats-url", nats_server.url, "--namespace", namespace,
                            "--system-port", str(port), "--health-check-idle", "0.2"])
    try:
        worker.wait_for_log("serving")
        wait_until(lambda: health(port)[1]["canary"]["ok"] is True, 10, what="a passing canary")
        assert health(port)[0] == 200
    finally:
        worker.stop()


def test_a_failing_canary_makes_health_503_with_the_reason(nats_server: NatsServer, namespace: str) -> None:
    port = free_port()
    # Override the payload with one the echo role refuses: the canary fails, the worker stays up.
    env = worker_env(DYN_HEALTH_CHECK_PAYLOAD=json.dumps({"token_ids": "not a list"}))
    worker = WorkerProcess(["--role", "echo", "--nats-url", nats_server.url, "--namespace", namespace,
                            "--system-port", str(port), "--health-check-idle", "0.2"], env=env)
    try:
        worker.wait_for_log("serving")
        wait_until(lambda: health(port)[0] == 503, 10, what="/health to turn 503")
        status, body = health(port)
        assert body["canary"]["ok"] is False and "token_ids must be a list of integers" in body["canary"]["error"]
        assert any("health canary failed" in r for r in body["reasons"])
        assert worker.proc.poll() is None
    finally:
        worker.stop()


def test_the_payload_override_can_come_from_a_file(nats_server: NatsServer, namespace: str, tmp_path) -> None:
    port = free_port()
    payload = tmp_path / "canary.json"
    payload.write_text(json.dumps({"token_ids": [5, 6]}))
    worker = WorkerProcess(["--role", "echo", "--nats-url", nats_server.url, "--namespace", namespace,
                            "--system-port", str(port), "--health-check-idle", "0.2"],
                           env=worker_env(DYN_HEALTH_CHECK_PAYLOAD=f"@{payload}"))
    try:
        worker.wait_for_log("serving")
        wait_until(lambda: health(port)[1]["canary"]["ok"] is True, 10, what="a passing canary")
    finally:
        worker.stop()


def test_bad_payload_json_is_a_one_line_error_before_any_work() -> None:
    out = run_cli("--role", "echo", "--nats-url", "nats://127.0.0.1:1",
                  env=worker_env(DYN_HEALTH_CHECK_PAYLOAD="{oops"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "DYN_HEALTH_CHECK_PAYLOAD is not valid JSON" in out.stderr
    out = run_cli("--role", "echo", "--nats-url", "nats://127.0.0.1:1",
                  env=worker_env(DYN_HEALTH_CHECK_PAYLOAD="[1, 2]"))
    assert out.returncode == 2 and "must be a JSON object" in out.stderr
