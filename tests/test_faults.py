"""Faults under a bounded load, with figures: a NATS restart, SIGTERM of each role, a dead engine.

The NATS and SIGTERM-of-frontend/echo tests run a real frontend in front of echo workers serving
the demo model's tokenizer (no engine: the fault is in NATS or the process, not the engine). The
prefill and engine-death tests run the real vLLM engine. The printed ``FIGURE`` lines (``-s``) are
the numbers docs/reliability.md quotes. SIGKILL of a decode worker with migration, and SIGTERM of a
decode worker under load, are in tests/test_resilience.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_worker.core.runtime import Runtime
from tests.engine_helpers import ENGINE_FLAGS
from tests.helpers import (
    FrontendRecoveries,
    NatsServer,
    WorkerProcess,
    child_pids,
    endpoint_inflight,
    free_kv_event_port,
    free_port,
    process_name,
    signal_while_busy,
    wait_until,
    worker_env,
)

MAX_TOKENS = 16
PROMPT = " ".join(["bird"] * 24)  # longer than MAX_TOKENS: every answer has exactly MAX_TOKENS tokens


def frontend_instances(base: str) -> int:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as resp:
            return json.load(resp)["instances"]
    except urllib.error.HTTPError as err:
        return json.load(err)["instances"]
    except OSError:
        return -1


def frontend_metric(base: str, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


class Load:
    """``concurrency`` clients sending completions (half streamed) until stopped; every outcome kept."""

    def __init__(self, base: str, model: str, concurrency: int = 8, max_requests: int = 2000) -> None:
        self.base, self.model, self.concurrency, self.max_requests = base, model, concurrency, max_requests
        self.outcomes: list[tuple[float, float, str]] = []  # (start, end, "ok" or the failure)
        self.messages: Counter[str] = Counter()  # the error messages of failed requests
        self.stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        self.stopping.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 180)

    async def _run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.concurrency)))

    async def _client(self, session: aiohttp.ClientSession, i: int) -> None:
        n = 0
        while not self.stopping.is_set() and len(self.outcomes) < self.max_requests:
            stream = (i + n) % 2 == 0
            n += 1
            start = time.monotonic()
            outcome = await self.one(session, stream)
            self.outcomes.append((start, time.monotonic(), outcome))
            if outcome != "ok":
                await asyncio.sleep(0.1)  # a failing client backs off a little, as a real one would

    async def one(self, session: aiohttp.ClientSession, stream: bool) -> str:
        body = {"model": self.model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        try:
            async with session.post(f"{self.base}/v1/completions", json=body) as resp:
                try:
                    return await self._outcome(resp, stream)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    # Its status line had come: the request was accepted, then its answer was cut.
                    return f"cut {type(exc).__name__}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # no answer began
            return f"connection {type(exc).__name__}"

    async def _outcome(self, resp: aiohttp.ClientResponse, stream: bool) -> str:
        if resp.status != 200:
            error = (await resp.json())["error"]
            self.messages[error["message"]] += 1
            return f"{resp.status} {error['type']}"
        if not stream:
            got = (await resp.json())["usage"]["completion_tokens"]
            return "ok" if got == MAX_TOKENS else f"short {got}"
        text = (await resp.read()).decode()
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        if any("error" in e for e in events) or not text.endswith("data: [DONE]\n\n"):
            return f"stream error {text[-200:]!r}"
        usage = [e["usage"] for e in events if e.get("usage")]
        return "ok" if usage and usage[-1]["completion_tokens"] == MAX_TOKENS else "short stream"

    def summary(self) -> Counter[str]:
        return Counter(o for _, _, o in self.outcomes)


async def wait_for_load(load: Load, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(1 for *_, o in load.outcomes if o == "ok") < count:
        assert time.monotonic() < deadline, f"the load never reached {count} successes: {load.summary()}"
        await asyncio.sleep(0.05)


# ---- an echo stack, on a NATS server of its own (one test restarts it) -------------------------


class EchoStack:
    def __init__(self, model: str) -> None:
        self.model = model
        self.nats = NatsServer()
        self.nats.start()
        self.namespace = f"flt{uuid.uuid4().hex[:8]}"
        self.workers: list[WorkerProcess] = []
        self.frontend: WorkerProcess | None = None
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"

    def common(self) -> list[str]:
        return ["--nats-url", self.nats.url, "--namespace", self.namespace, "--lease-ttl", "2"]

    def start_worker(self) -> WorkerProcess:
        w = WorkerProcess(
            [
                "--role",
                "echo",
                *self.common(),
                "--echo-model",
                self.model,
                "--echo-delay",
                "0.01",
                "--graceful-shutdown-timeout",
                "30",
            ]
        )
        self.workers.append(w)
        w.wait_for_log("serving")
        return w

    def start_frontend(self) -> WorkerProcess:
        self.frontend = WorkerProcess(
            [
                "--role",
                "frontend",
                *self.common(),
                "--http-port",
                str(self.http_port),
                "--request-retries",
                "3",
                "--migration-limit",
                "3",
                "--graceful-shutdown-timeout",
                "30",
            ]
        )
        self.frontend.wait_for_log("frontend listening")
        return self.frontend

    def stop(self) -> None:
        for w in [*self.workers, *([self.frontend] if self.frontend else [])]:
            w.stop()
        self.nats.cleanup()


@pytest.fixture(scope="module")
def echo_stack(demo_model: str) -> Iterator[EchoStack]:
    s = EchoStack(demo_model)
    try:
        s.start_worker()
        s.start_worker()
        s.start_frontend()
        wait_until(lambda: frontend_instances(s.base) == 2, 30, what="both echo workers in the frontend")
        yield s
    finally:
        s.stop()


async def test_a_nats_restart_under_load_loses_no_accepted_request(echo_stack: EchoStack) -> None:
    s = echo_stack
    load = Load(s.base, "echo")
    load.start()
    await wait_for_load(load, 50)
    accepted_before = len(load.outcomes)
    down = time.monotonic()
    await asyncio.to_thread(s.nats.stop, signal.SIGKILL)  # the worst case: no goodbye to any client
    await asyncio.sleep(1.0)
    await asyncio.to_thread(s.nats.start)  # same port, JetStream state lost (discovery is in memory)
    up = time.monotonic()
    # The first request *started* after the restart that succeeds: the time to recover.
    deadline = up + 30
    while not any(start >= up and o == "ok" for start, _, o in load.outcomes):
        assert time.monotonic() < deadline, f"no request succeeded within 30 s of the restart: {load.summary()}"
        await asyncio.sleep(0.05)
    first_ok = min(end for start, end, o in load.outcomes if start >= up and o == "ok")
    await asyncio.to_thread(
        wait_until, lambda: frontend_instances(s.base) == 2, 30, 0.1, "both workers back in the frontend's view"
    )
    rediscovered = time.monotonic()
    await wait_for_load(load, sum(1 for *_, o in load.outcomes if o == "ok") + 50)
    await load.stop()
    summary = load.summary()
    failures = {o: n for o, n in summary.items() if o != "ok"}
    at_kill = sum(1 for start, end, _ in load.outcomes if start < down < end)
    in_outage = sum(1 for start, _, _ in load.outcomes if down <= start < up)
    print(
        f"\nFIGURE nats restart: {len(load.outcomes)} requests at concurrency 8 "
        f"({accepted_before} before the kill, {at_kill} in flight at the kill, {in_outage} sent during the "
        f"outage); outage {up - down:.2f} s; first new success {first_ok - up:.2f} s after restart; both "
        f"workers rediscovered {rediscovered - up:.2f} s after; outcomes {dict(summary)}; "
        f"errors {dict(load.messages)}"
    )
    # docs/reliability.md: 0 failed. Every request completed with all its tokens, the ones the
    # outage caught in flight included (the load is at least 50 successes before the kill and 50
    # after both workers are back: at least 100 requests).
    assert failures == {}, (failures, dict(load.messages))
    assert len(load.outcomes) >= 100 and at_kill >= 1, (len(load.outcomes), at_kill)
    assert first_ok - up < 15


async def test_sigterm_to_an_echo_worker_under_load_loses_nothing_and_exits_0(echo_stack: EchoStack) -> None:
    s = echo_stack
    assert s.frontend is not None
    # The frontend retries and migrates (--request-retries 3, --migration-limit 3): a worker that cut
    # its streams would still leave every client whole, so the frontend must have recovered nothing.
    recoveries = FrontendRecoveries(s.frontend, s.base)
    load = Load(s.base, "echo")
    load.start()
    await wait_for_load(load, 30)
    victim = s.workers[0]
    victim.signal(signal.SIGTERM)
    assert await asyncio.to_thread(victim.wait, 60) == 0
    await wait_for_load(load, sum(1 for *_, o in load.outcomes if o == "ok") + 30)
    await load.stop()
    recovered = await asyncio.to_thread(recoveries.assert_none_cut)
    print(f"\nFIGURE sigterm echo: {len(load.outcomes)} requests, {dict(load.summary())}; frontend {recovered}")
    assert set(load.summary()) == {"ok"}
    log = victim.log()
    assert "draining" in log and "did not finish in time" not in log
    s.workers.remove(victim)
    s.start_worker()
    await asyncio.to_thread(wait_until, lambda: frontend_instances(s.base) == 2, 30, 0.1, "the replacement")


async def test_sigterm_to_the_frontend_under_load_finishes_what_it_accepted_and_exits_0(echo_stack: EchoStack) -> None:
    s = echo_stack
    assert s.frontend is not None
    recoveries = FrontendRecoveries(s.frontend, None)  # it will not be there to ask at the end: its log
    load = Load(s.base, "echo", concurrency=6, max_requests=400)
    load.start()
    await wait_for_load(load, 30)
    long_tokens = 300  # 300 tokens at 10 ms each: these streams are still running at the signal
    body = {
        "model": "echo",
        "prompt": " ".join(["bird"] * 320),
        "max_tokens": long_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with aiohttp.ClientSession() as session:
        responses = [await session.post(f"{s.base}/v1/completions", json=body) for _ in range(4)]
        for resp in responses:
            assert resp.status == 200
            await resp.content.readline()  # the first event: accepted and streaming
        inflight = await asyncio.to_thread(frontend_metric, s.base, "dynamo_frontend_inflight_requests")
        s.frontend.signal(signal.SIGTERM)
        texts = [(await resp.read()).decode() for resp in responses]
    assert await asyncio.to_thread(s.frontend.wait, 60) == 0
    await load.stop()
    summary = load.summary()
    print(
        f"\nFIGURE sigterm frontend: {inflight:.0f} in flight at the signal (4 of them {long_tokens}-token "
        f"streams); load outcomes {dict(summary)}"
    )
    # Every stream that had started finished whole.
    for text in texts:
        usage = [
            json.loads(line[6:])["usage"]
            for line in text.splitlines()
            if line.startswith("data: {") and '"usage"' in line
        ]
        assert text.endswith("data: [DONE]\n\n") and usage[-1]["completion_tokens"] == long_tokens
    # The load's requests completed, or found the listener closed or their idle kept-alive
    # connection closed by the server (never sent, so never accepted): none whose answer had begun
    # was cut ("cut ...").
    assert all(o == "ok" or o.startswith("connection ") for o in summary), summary
    # Its workers were not stopped: it had nothing to retry or migrate (so nothing was cut and hidden).
    recoveries.assert_none_cut()
    assert "draining" in s.frontend.log()
    s.start_frontend()
    await asyncio.to_thread(wait_until, lambda: frontend_instances(s.base) == 2, 30, 0.1, "the new frontend")


# ---- the real engine: prefill drain, engine-core death -----------------------------------------


class EngineStack:
    """A prefill and a decode worker (real vLLM), an echo worker serving "tiny" too, a frontend."""

    def __init__(self, nats: NatsServer, model: str, storage: Path) -> None:
        self.nats = nats
        self.namespace = f"eng{uuid.uuid4().hex[:8]}"
        common = ["--nats-url", nats.url, "--namespace", self.namespace, "--lease-ttl", "2"]
        engine = [
            "--model",
            model,
            "--served-model-name",
            "tiny",
            *common,
            *ENGINE_FLAGS,
            "--connector",
            "example",
            "--kv-shared-storage",
            str(storage),
            "--graceful-shutdown-timeout",
            "60",
        ]
        self.http_port = free_port()
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.prefill_port = free_port()
        self.prefill = WorkerProcess(
            ["--role", "prefill", *engine, "--system-port", str(self.prefill_port)],
            env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port())),
        )
        self.decode = WorkerProcess(
            ["--role", "decode", *engine], env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port()))
        )
        self.echo = WorkerProcess(
            ["--role", "echo", *common, "--echo-model", model, "--echo-served-model-name", "tiny"]
        )
        self.frontend = WorkerProcess(
            [
                "--role",
                "frontend",
                *common,
                "--http-port",
                str(self.http_port),
                "--request-retries",
                "3",
                "--migration-limit",
                "3",
            ]
        )

    def stop(self) -> None:
        for w in (self.prefill, self.decode, self.echo, self.frontend):
            w.stop()


@pytest.fixture(scope="module")
def engine_stack(
    nats_server: NatsServer, demo_model: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[EngineStack]:
    s = EngineStack(nats_server, demo_model, tmp_path_factory.mktemp("kv-shared"))
    try:
        for w in (s.echo, s.frontend):
            w.wait_for_log("serving")
        s.prefill.wait_for_log("serving", timeout=300)
        s.decode.wait_for_log("serving", timeout=300)
        wait_until(lambda: frontend_instances(s.base) == 2, 30, what="decode and echo in the frontend")
        yield s
    finally:
        s.stop()


async def test_sigterm_to_a_prefill_worker_drains_its_requests_and_exits_0(engine_stack: EngineStack) -> None:
    s = engine_stack
    caller = await Runtime.connect(s.nats.url, s.namespace)
    try:
        # Called on the instance itself (no frontend): nothing retries or migrates, so a request the
        # worker cut would be an error in ``results``.
        client = caller.client("prefill", "generate")
        [record] = await client.wait_for_instances(30)

        async def prefill(i: int) -> list[Any]:
            payload = {
                "token_ids": [1, *(10 + (i + k) % 490 for k in range(230))],
                "stop_conditions": {"max_tokens": 1},
            }
            return [x async for x in client.direct(payload, record.instance_id)]

        def start(wave: int) -> list[asyncio.Task[Any]]:  # each wave's prompts are new (no prefix-cache hits)
            return [asyncio.create_task(prefill(i)) for i in range(wave * 48, wave * 48 + 48)]

        # Signal while the worker has requests in flight (watched on the worker, not the client).
        at_signal, results = await signal_while_busy(
            s.prefill, signal.SIGTERM, start, lambda: endpoint_inflight(s.prefill_port)
        )
        assert await asyncio.to_thread(s.prefill.wait, 120) == 0
        errors = [r for r in results if isinstance(r, BaseException)]
        print(
            f"\nFIGURE sigterm prefill: 48 prefill requests, {at_signal:.0f} in flight on the worker at the "
            f"signal, {len(errors)} failed"
        )
        assert errors == [], errors
        assert all(r and "kv_transfer_params" in json.dumps(r) for r in results)
        log = s.prefill.log()
        assert "draining" in log and "did not finish in time" not in log
    finally:
        await caller.close()


async def test_killing_the_engine_core_exits_the_worker_1_and_traffic_moves_on(engine_stack: EngineStack) -> None:
    s = engine_stack
    load = Load(s.base, "tiny", concurrency=4, max_requests=5000)
    load.start()
    await wait_for_load(load, 10, timeout=120)
    cores = [p for p in child_pids(s.decode.pid) if "EngineCor" in process_name(p)]
    assert cores, "the decode worker has an engine-core child process"
    killed = time.monotonic()
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    assert await asyncio.to_thread(s.decode.wait, 60) == 1
    exited = time.monotonic()
    await asyncio.to_thread(
        wait_until, lambda: frontend_instances(s.base) == 1, 30, 0.1, "the dead worker out of the frontend's view"
    )
    await wait_for_load(load, sum(1 for *_, o in load.outcomes if o == "ok") + 20, timeout=60)
    await load.stop()
    summary = load.summary()
    print(f"\nFIGURE engine-core kill: worker exited 1 after {exited - killed:.2f} s; outcomes {dict(summary)}")
    assert "vLLM engine died" in s.decode.log()
    # In-flight requests went to the echo worker (retried or migrated); none failed.
    assert set(summary) == {"ok"}, summary
