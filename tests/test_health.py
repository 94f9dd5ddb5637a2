"""Health canaries: the role's health payload sent through its endpoint when it has been idle."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import NatsServer, WorkerProcess, free_port, run_cli, wait_until, worker_env, write_distribution


def health(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_an_idle_worker_sends_its_canary_and_stays_healthy(nats_server: NatsServer, namespace: str) -> None:
    port = free_port()
    worker = WorkerProcess(
        [
            "--role",
            "echo",
            "--nats-url",
            nats_server.url,
            "--namespace",
            namespace,
            "--system-port",
            str(port),
            "--health-check-idle",
            "0.2",
        ]
    )
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
    worker = WorkerProcess(
        [
            "--role",
            "echo",
            "--nats-url",
            nats_server.url,
            "--namespace",
            namespace,
            "--system-port",
            str(port),
            "--health-check-idle",
            "0.2",
        ],
        env=env,
    )
    try:
        worker.wait_for_log("serving")
        wait_until(lambda: health(port)[0] == 503, 10, what="/health to turn 503")
        status, body = health(port)
        assert (
            body["canary"]["ok"] is False
            and "Expected `array`, got `str` - at `$.token_ids`" in body["canary"]["error"]
        )
        assert any("health canary failed" in r for r in body["reasons"])
        assert worker.proc.poll() is None
    finally:
        worker.stop()


def test_the_payload_override_can_come_from_a_file(nats_server: NatsServer, namespace: str, tmp_path) -> None:
    port = free_port()
    payload = tmp_path / "canary.json"
    payload.write_text(json.dumps({"token_ids": [5, 6]}))
    worker = WorkerProcess(
        [
            "--role",
            "echo",
            "--nats-url",
            nats_server.url,
            "--namespace",
            namespace,
            "--system-port",
            str(port),
            "--health-check-idle",
            "0.2",
        ],
        env=worker_env(DYN_HEALTH_CHECK_PAYLOAD=f"@{payload}"),
    )
    try:
        worker.wait_for_log("serving")
        wait_until(lambda: health(port)[1]["canary"]["ok"] is True, 10, what="a passing canary")
    finally:
        worker.stop()


def test_bad_payload_json_is_a_one_line_error_before_any_work() -> None:
    out = run_cli(
        "--role", "echo", "--nats-url", "nats://127.0.0.1:1", env=worker_env(DYN_HEALTH_CHECK_PAYLOAD="{oops")
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "DYN_HEALTH_CHECK_PAYLOAD is not valid JSON" in out.stderr
    out = run_cli(
        "--role", "echo", "--nats-url", "nats://127.0.0.1:1", env=worker_env(DYN_HEALTH_CHECK_PAYLOAD="[1, 2]")
    )
    assert out.returncode == 2 and "must be a JSON object" in out.stderr


# ---- a canary for any role: the endpoint it names, a warning when there is none ------------------

PROBE_ROLE = '''
import logging

from dynamo_worker.plugin import HealthCheck, hookimpl


class ProbeRole:
    """Serves only ping; its canary goes wherever --probe-canary says."""
    name = "probe"

    @hookimpl
    def dynamo_worker_add_arguments(self, parser):
        parser.add_argument_group("probe role").add_argument(
            "--probe-canary", choices=("ping", "none", "generate"), default="ping")

    @hookimpl
    def dynamo_worker_configure(self, ctx):
        self.canary = ctx.options.probe_canary

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar):
        registrar.endpoint("ping", self.ping)

    @hookimpl
    def dynamo_worker_health_payload(self):
        if self.canary == "none":
            return None
        if self.canary == "generate":
            return {"n": 1}  # a bare dict goes to generate, which this role does not serve
        return HealthCheck({"n": 1}, endpoint="ping")

    async def ping(self, request, context):
        if context.is_health_check:
            logging.getLogger("probe").warning("canary request %s seen", context.request_id)
        yield {"pong": request.get("n"), "canary": context.is_health_check}
'''


@pytest.fixture
def probe_site(tmp_path) -> dict[str, str]:
    write_distribution(tmp_path, "probe-role", "0.1.0", {"probe": "probe_role:ProbeRole"}, {"probe_role": PROBE_ROLE})
    return {"PYTHONPATH": str(tmp_path)}


async def test_a_role_without_generate_gets_its_canary_on_the_endpoint_it_names(run_role, probe_site) -> None:
    role = run_role("probe", "--health-check-idle", "0.2", env=probe_site)
    wait_until(lambda: health(role.system_port)[1]["canary"]["ok"] is True, 10, what="a passing canary on ping")
    assert "canary request" in role.log() and "no health canary" not in role.log()
    # A user's request is not a canary, whatever it carries: only the worker's own ids are.
    async with role.client("ping") as client:
        assert [m async for m in client.generate({"n": 7})] == [{"pong": 7, "canary": False}]


@pytest.mark.parametrize(
    "canary,reason",
    [
        ("none", "the role returns no health payload (dynamo_worker_health_payload)"),
        ("generate", "its health payload goes to endpoint 'generate', which it does not serve (it serves ping)"),
    ],
)
def test_a_role_whose_endpoints_get_no_canary_is_told_once_at_start_up(
    run_role, probe_site, canary: str, reason: str
) -> None:
    role = run_role("probe", "--probe-canary", canary, "--health-check-idle", "0.2", env=probe_site)
    wait_until(lambda: "no health canary" in role.log(), 5, what="the warning")
    time.sleep(0.5)  # more than two idle periods: no canary, and no second warning
    log = role.log()
    assert log.count("no health canary") == 1
    assert f"no health canary for role probe: {reason}; /health reports only liveness" in log
    assert "canary request" not in log
    status, body = health(role.system_port)
    assert status == 200 and body["canary"]["ok"] is None


# ---- admin routes on the status server ------------------------------------------------------------
# StatusServer itself on a real port (no role has a POST route without an engine); the real decode
# worker's /engine/sleep under a token: tests/test_decode_operations.py.


class AdminServer:
    """A real StatusServer with decode's route shapes: POST /engine/sleep (counts its calls) and
    GET /engine/is_sleeping; requests go to 127.0.0.1 whatever it binds."""

    def __init__(self, host: str, token: str | None) -> None:
        from prometheus_client import CollectorRegistry

        from dynamo_worker.core.registrar import Route
        from dynamo_worker.core.status_server import HealthState, StatusServer

        self.calls = 0
        self.server = StatusServer(HealthState(phase="serving"), CollectorRegistry(), admin_token=token)
        self.server.add_routes(
            [Route("POST", "/engine/sleep", self._sleep), Route("GET", "/engine/is_sleeping", self._is_sleeping)]
        )
        self.host = host

    async def _sleep(self, request):  # type: ignore[no-untyped-def]
        from aiohttp import web

        self.calls += 1
        return web.json_response({"status": "ok"})

    async def _is_sleeping(self, request):  # type: ignore[no-untyped-def]
        from aiohttp import web

        return web.json_response({"is_sleeping": False})

    async def __aenter__(self) -> AdminServer:
        import aiohttp

        await self.server.start(self.host, 0)
        self.base = f"http://127.0.0.1:{self.server.port}"
        self.session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        await self.server.stop()

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        """A POST carries a JSON body, as application/json unless ``headers`` say otherwise."""
        headers = dict(headers or {})
        data = b'{"level": 1}' if method == "POST" else None
        if data is not None:
            headers.setdefault("Content-Type", "application/json")
        async with self.session.request(method, self.base + path, data=data, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def sleep(self, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        return await self.request("POST", "/engine/sleep", headers)


async def test_beyond_loopback_without_a_token_admin_routes_answer_403_and_probes_stay_open(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level("WARNING", logger="dynamo_worker.core.status_server"):
        async with AdminServer("0.0.0.0", token=None) as srv:
            for headers in ({}, {"Authorization": "Bearer anything"}):
                status, body = await srv.sleep(headers)
                assert status == 403 and body["status"] == "error"
                assert "DYN_SYSTEM_ADMIN_TOKEN" in body["message"] and "0.0.0.0" in body["message"]
            assert srv.calls == 0
            for path in ("/live", "/health", "/engine/is_sleeping"):
                assert (await srv.request("GET", path))[0] == 200, path
            async with srv.session.get(srv.base + "/metrics") as resp:
                assert resp.status == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "DYN_SYSTEM_ADMIN_TOKEN" in warnings[0], warnings


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
async def test_with_a_token_admin_routes_need_the_bearer_token_on_any_bind(host: str) -> None:
    async with AdminServer(host, token="adm-7f3a9c") as srv:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer adm-7f3a9c-and-more"},
            {"Authorization": "Basic adm-7f3a9c"},
            {"Authorization": "adm-7f3a9c"},
            {"Authorization": "Bearer \u00e9t\u00e9"},
        ):
            status, body = await srv.sleep(headers)
            assert status == 401 and "Authorization: Bearer" in body["message"], headers
        assert srv.calls == 0
        async with srv.session.post(srv.base + "/engine/sleep") as resp:
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert await srv.sleep({"Authorization": "Bearer adm-7f3a9c"}) == (200, {"status": "ok"})
        assert await srv.sleep({"Authorization": "bearer adm-7f3a9c"}) == (200, {"status": "ok"})
        assert srv.calls == 2
        for path in ("/live", "/health", "/engine/is_sleeping"):  # still open
            assert (await srv.request("GET", path))[0] == 200, path


async def test_admin_routes_refuse_cross_site_browser_requests() -> None:
    """On loopback with no token (the default), a page in a browser on the same host is the
    threat: cross-site fetches carry Origin/Sec-Fetch-Site, HTML forms can only send form or text
    bodies, and a DNS-rebinding page reaches the server under its own host name."""
    async with AdminServer("127.0.0.1", token=None) as srv:
        own = f"http://127.0.0.1:{srv.server.port}"
        refused = [
            ({"Origin": "http://evil.example"}, 403),
            ({"Origin": "null"}, 403),
            ({"Origin": f"http://127.0.0.1:{srv.server.port + 1}"}, 403),
            ({"Origin": f"https://127.0.0.1:{srv.server.port}"}, 403),
            ({"Origin": "garbage"}, 403),
            ({"Sec-Fetch-Site": "cross-site"}, 403),
            ({"Sec-Fetch-Site": "same-site"}, 403),
            # DNS rebinding: same-origin to the browser, but not a loopback Host.
            (
                {
                    "Host": f"evil.example:{srv.server.port}",
                    "Origin": f"http://evil.example:{srv.server.port}",
                    "Sec-Fetch-Site": "same-origin",
                },
                403,
            ),
            ({"Content-Type": "application/x-www-form-urlencoded"}, 415),
            ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
            ({"Content-Type": "text/plain;charset=UTF-8"}, 415),
        ]
        for headers, expected in refused:
            status, body = await srv.sleep(headers)
            assert status == expected and body["status"] == "error", (headers, status, body)
        assert srv.calls == 0
        allowed = [
            {},
            {"Origin": own},
            {"Origin": f"http://localhost:{srv.server.port}", "Host": f"localhost:{srv.server.port}"},
            {"Sec-Fetch-Site": "same-origin", "Origin": own},
            {"Sec-Fetch-Site": "none"},
        ]
        for headers in allowed:
            status, _ = await srv.sleep(headers)
            assert status == 200, headers
        assert srv.calls == len(allowed)
    # With a token, a cross-site page cannot send it anyway; the Origin check still applies.
    async with AdminServer("127.0.0.1", token="adm-7f3a9c") as srv:
        status, body = await srv.sleep({"Authorization": "Bearer adm-7f3a9c", "Origin": "http://evil.example"})
        assert status == 403 and "Origin" in body["message"] and srv.calls == 0
        # The bearer token is proof enough of a non-browser client: any content type, any Host.
        status, _ = await srv.sleep(
            {"Authorization": "Bearer adm-7f3a9c", "Content-Type": "text/plain", "Host": "myhost.internal"}
        )
        assert status == 200 and srv.calls == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (" ", "--system-admin-token is blank"),
        ("abc\n", "--system-admin-token / DYN_SYSTEM_ADMIN_TOKEN must be printable ASCII without spaces"),
        ("t\u00f6ken", "--system-admin-token / DYN_SYSTEM_ADMIN_TOKEN must be printable ASCII without spaces"),
    ],
)
def test_an_unusable_admin_token_is_a_one_line_error(value: str, message: str) -> None:
    out = run_cli("--role", "echo", "--nats-url", "nats://127.0.0.1:1", env=worker_env(DYN_SYSTEM_ADMIN_TOKEN=value))
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert message in out.stderr
