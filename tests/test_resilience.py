"""Two real decode workers behind a frontend, under load, while workers are stopped and killed.

The tests run in file order on one deployment (engine start-up is the slow part):
drain (SIGTERM worker A; A is replaced), migration (SIGKILL worker B), engine death (kill A's
engine-core process).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import (
    FrontendRecoveries,
    NatsServer,
    WorkerProcess,
    child_pids,
    endpoint_inflight,
    free_port,
    process_name,
    wait_until,
)

MAX_TOKENS = 450
CONCURRENCY = 8
# No idle health canary: a canary in flight on an otherwise idle worker would look, in the worker's
# in-flight gauge, like the load's streams (CI once killed worker b for its canary before the load
# reached it, and nothing was migrated). The default lease (3 s): nothing here waits for a lease to
# run out (a killed worker's connection closes at once, a stopped one withdraws), and with 2 s a
# keep-alive held up on two busy cores could let a live worker's record lapse for a moment, and
# the frontend route a whole load past it: the likeliest cause of the CI run where worker a got
# none of the load (round-robin over two instances cannot do that otherwise).
WORKER_FLAGS = [
    "--enforce-eager",
    "--max-model-len",
    "512",
    "--max-num-seqs",
    "16",
    "--served-model-name",
    "tiny",
    "--graceful-shutdown-timeout",
    "60",
    "--health-check-idle",
    "3600",
]


class Deployment:
    def __init__(self, nats: NatsServer, namespace: str, model: str, tmp: Path) -> None:
        self.nats, self.namespace, self.model, self.tmp = nats, namespace, model, tmp
        self.http_port = free_port()
        self.workers: dict[str, WorkerProcess] = {}
        self.started: list[WorkerProcess] = []  # every worker, replaced ones too, for stop()
        self.system_ports: dict[str, int] = {}
        self.frontend = WorkerProcess(
            [
                "--role",
                "frontend",
                "--nats-url",
                nats.url,
                "--namespace",
                namespace,
                "--http-port",
                str(self.http_port),
                "--migration-limit",
                "3",
                "--request-retries",
                "3",
            ]
        )
        self.base = f"http://127.0.0.1:{self.http_port}"

    def start_worker(self, name: str) -> WorkerProcess:
        port = free_port()
        worker = WorkerProcess(
            [
                "--role",
                "decode",
                "--model",
                self.model,
                "--nats-url",
                self.nats.url,
                "--namespace",
                self.namespace,
                "--system-port",
                str(port),
                *WORKER_FLAGS,
            ]
        )
        self.workers[name] = worker
        self.started.append(worker)
        self.system_ports[name] = port
        return worker

    def worker_inflight(self, name: str) -> float:
        return endpoint_inflight(self.system_ports[name])

    def instances(self) -> int:
        """Instances in the frontend's view (its /health is 503, same body, when there are none)."""
        try:
            with urllib.request.urlopen(f"{self.base}/health") as resp:
                return json.load(resp)["instances"]
        except urllib.error.HTTPError as err:
            return json.load(err)["instances"]

    def frontend_metric(self, name: str) -> float:
        body = urllib.request.urlopen(f"{self.base}/metrics").read().decode()
        return sum(s.value for fam in text_string_to_metric_families(body) for s in fam.samples if s.name == name)

    async def generating(self, name: str, load: asyncio.Task[Any]) -> float:
        """Wait until worker ``name`` is generating for ``load``; its in-flight count, 0 if the
        load ended first.

        Watched on the worker, not the client: on two busy cores the frontend can relay a stream
        well after the worker finished generating it. (The workers run no idle health canary,
        so what the worker serves is the load's.)
        """
        for _ in range(1000):
            if (inflight := await asyncio.to_thread(self.worker_inflight, name)) > 0:
                # At once: on the tiny model a stream can end within 0.1 s, and a CI run that waited
                # that long before the kill saw 4 in flight and then nothing to migrate or retry.
                return inflight
            if load.done():
                return 0
            await asyncio.sleep(0.01)
        return 0

    def stop(self) -> None:
        for worker in self.started:
            worker.stop()
        self.frontend.stop()


@pytest.fixture(scope="module")
def deployment(
    nats_server: NatsServer, demo_model: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    d = Deployment(nats_server, f"res{uuid.uuid4().hex[:8]}", demo_model, tmp_path_factory.mktemp("res"))
    try:
        for name in ("a", "b"):
            d.start_worker(name)
        d.frontend.wait_for_log("serving")
        for worker in d.workers.values():
            worker.wait_for_log("serving", timeout=300)
        wait_until(lambda: d.instances() == 2, 30, what="both workers in the frontend's view")
        yield d
    finally:
        d.stop()


async def run_load(d: Deployment, n: int = CONCURRENCY, prompt: str = "once upon a time") -> list[dict[str, Any]]:
    """``n`` concurrent greedy streams of MAX_TOKENS tokens; each result has text, usage, finish."""
    client = openai.AsyncOpenAI(base_url=f"{d.base}/v1", api_key="unused", max_retries=0)

    async def one() -> dict[str, Any]:
        stream = await client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, usage, finish = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage:
                usage = chunk.usage
        return {"text": text, "completion_tokens": usage.completion_tokens if usage else None, "finish": finish}

    try:
        return await asyncio.gather(*(one() for _ in range(n)))
    finally:
        await client.close()


async def reference_text(d: Deployment) -> str:
    [ref] = await run_load(d, 1)
    assert ref["completion_tokens"] == MAX_TOKENS
    return ref["text"]


async def test_sigterm_to_one_worker_under_load_drains_it_and_loses_nothing(deployment: Deployment) -> None:
    d = deployment
    expected = await reference_text(d)
    # The frontend retries and migrates (--request-retries 3, --migration-limit 3): streams worker a
    # cut would still reach their clients whole (greedy continuation gives the same text), so the
    # frontend must have recovered nothing: a drained every stream it had itself.
    recoveries = FrontendRecoveries(d.frontend, d.base)
    load = asyncio.create_task(run_load(d))
    at_signal = await d.generating("a", load)
    assert at_signal, "worker a never had requests in flight"
    d.workers["a"].signal(signal.SIGTERM)
    results = await load
    assert [r["completion_tokens"] for r in results] == [MAX_TOKENS] * CONCURRENCY
    assert all(r["text"] == expected and r["finish"] == "length" for r in results)
    assert await asyncio.to_thread(d.workers["a"].wait, 60) == 0
    recovered = recoveries.assert_none_cut()
    print(
        f"\nFIGURE sigterm decode: {CONCURRENCY} streams of {MAX_TOKENS} tokens, {at_signal:.0f} in flight on "
        f"worker a at the signal, {len(results)} complete with the undisturbed text; frontend {recovered}"
    )
    log = d.workers["a"].log()
    assert "draining" in log and "did not finish in time" not in log
    wait_until(lambda: d.instances() == 1, 10, what="worker a to leave routing")
    # New work goes to the remaining worker.
    assert [r["completion_tokens"] for r in await run_load(d, 2)] == [MAX_TOKENS] * 2


async def test_sigkill_of_a_worker_mid_stream_migrates_every_request(deployment: Deployment) -> None:
    d = deployment
    replacement = d.start_worker("a")
    await asyncio.to_thread(replacement.wait_for_log, "serving", 300)
    wait_until(lambda: d.instances() == 2, 30, what="the replacement worker in routing")
    expected = await reference_text(d)

    def recovered() -> float:
        # A stream b had started is migrated; one whose first token had not reached the frontend
        # when b died is retried. Either way the client must not notice.
        return d.frontend_metric("dynamo_frontend_migrations_total") + d.frontend_metric(
            "dynamo_frontend_retries_total"
        )

    before = recovered()
    engine_processes = child_pids(d.workers["b"].pid)
    engine_cores = [p for p in engine_processes if "EngineCor" in process_name(p)]
    assert engine_cores, "worker b has an engine-core child process"
    # Kill b while it generates (a request b never started is a retry, not a migration). The tiny
    # model is fast: a stream seen in flight can end before the kill lands (CI once killed b for
    # the 1 stream it had left, and nothing was interrupted). So b's engine is frozen first: what
    # b still has in flight half a second later cannot finish, and the kill interrupts it. If b
    # was already done, the engine thaws and the load runs again; a few tries at most.
    for _ in range(4):
        load = asyncio.create_task(run_load(d))
        if await d.generating("b", load):
            _signal_all(engine_cores, signal.SIGSTOP)
            await asyncio.sleep(0.5)  # the worker relays what the engine had already produced
            if at_kill := await asyncio.to_thread(d.worker_inflight, "b"):
                d.workers["b"].signal(signal.SIGKILL)
                _signal_all(engine_cores, signal.SIGCONT)  # thawed, it sees its parent gone and exits
                break
            _signal_all(engine_cores, signal.SIGCONT)
        assert all(r["text"] == expected for r in await load)
    else:
        raise AssertionError("worker b was never caught mid-stream")
    results = await load
    # Every request completes with every token, and greedy continuation on the other worker
    # gives exactly the text an uninterrupted run gives.
    assert [r["completion_tokens"] for r in results] == [MAX_TOKENS] * CONCURRENCY
    assert all(r["text"] == expected for r in results)
    assert recovered() > before, f"the kill interrupted no request (worker b had {at_kill:.0f} in flight just before)"
    print(
        f"\nFIGURE sigkill decode: {CONCURRENCY} streams of {MAX_TOKENS} tokens, {recovered() - before:.0f} "
        f"migrated or retried, {sum(r['completion_tokens'] == MAX_TOKENS for r in results)} complete, 0 lost"
    )
    wait_until(lambda: d.instances() == 1, 10, what="the killed worker to leave routing")
    # Its vLLM engine processes (gigabytes) do not outlive it.
    assert engine_processes
    wait_until(
        lambda: not any(_alive(p) for p in engine_processes), 10, what="the killed worker's engine processes to exit"
    )


async def test_a_dead_engine_takes_its_worker_down_with_exit_1_and_out_of_routing(deployment: Deployment) -> None:
    d = deployment
    worker = d.workers["a"]
    engine_cores = [p for p in child_pids(worker.pid) if "EngineCor" in process_name(p)]
    assert engine_cores, "the worker has an engine-core child process"
    for pid in engine_cores:
        os.kill(pid, signal.SIGKILL)
    assert await asyncio.to_thread(worker.wait, 60) == 1
    assert "vLLM engine died" in worker.log()
    wait_until(lambda: d.instances() == 0, 10, what="the dead worker to leave routing")
    client = openai.OpenAI(base_url=f"{d.base}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.APIStatusError) as err:
        client.completions.create(model="tiny", prompt="hello", max_tokens=2)
    assert err.value.status_code == 503


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
