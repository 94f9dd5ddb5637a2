"""Several hosts (network namespaces, tests/netns.py), a 3-server NATS cluster, faults under load.

Hosts h1-h3 each run a nats-server of one cluster with JetStream (the discovery bucket with 3
replicas). h1 runs the frontend (``--migration-limit 3``), h2 and h3 an echo worker each (the demo
model's tokenizer, no engine: the faults are in the network and NATS). Every process lists its own
host's server first. h4 is a stranger's host. The load runs in h1's namespace. The tests run in file
order on one deployment, each leaving it whole, except the first two, which build test beds of their
own with 10 ms of delay on every connection between hosts (tests/delay_proxy.py): the first with
echo workers, the second with real vLLM decode workers (the demo model) on h2 and h3, started once
for its three parts (greedy text alike on both hosts, the delay measured, a host cut off mid-stream).
The printed ``FIGURE`` lines (``-s``) are the numbers docs/reliability.md quotes.
"""

from __future__ import annotations

import asyncio
import datetime
import re
import signal
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from benchmarks.load import run_level
from benchmarks.report import summarize_run
from dynamo_worker.core.discovery import BUCKET as DISCOVERY_BUCKET
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime
from tests.helpers import NatsServer, WorkerProcess, metric_sum, run_cli, wait_until, worker_env
from tests.netns import DelayProxy, NatsCluster, Testbed, cluster_testbed
from tests.test_faults import Load, frontend_instances, wait_for_load

HTTP_PORT = 8000
LEASE = 2
# How long the two remaining servers may take to elect the discovery bucket's leader after its
# leader's server is SIGKILLed: 4-9 s measured (docs/reliability.md), about 16 s once in CI.
ELECTION = 25
TOKEN = "cluster-test-secret"


class Cluster:
    """The deployment: frontend on h1, echo workers on h2 ("a") and h3 ("b")."""

    def __init__(self, bed: Testbed, nats: NatsCluster, model: str, log_dir: Path) -> None:
        self.bed, self.nats, self.model, self.log_dir = bed, nats, model, log_dir
        self.namespace = f"cl{uuid.uuid4().hex[:8]}"
        self.base = f"http://{bed.hosts['h1'].address}:{HTTP_PORT}"
        self.workers: dict[str, WorkerProcess] = {}
        self.started: list[WorkerProcess] = []
        self.dead: set[str] = set()  # instance ids of workers a test killed
        self.frontend = self.start(
            "h1",
            [
                "--role",
                "frontend",
                "--http-host",
                bed.hosts["h1"].address,
                "--http-port",
                str(HTTP_PORT),
                "--request-retries",
                "3",
                "--migration-limit",
                "3",
            ],
        )
        self.frontend.wait_for_log("frontend listening")

    def common(self, host: str) -> list[str]:
        return [
            "--nats-url",
            self.nats.urls(first=host),
            "--namespace",
            self.namespace,
            "--lease-ttl",
            str(LEASE),
            "--discovery-replicas",
            "3",
        ]

    def start(self, host: str, args: list[str], token: str = TOKEN, **env: str) -> WorkerProcess:
        w = WorkerProcess(
            [*args, *self.common(host)],
            env=worker_env(DYN_REQUEST_PLANE_TOKEN=token, **env),
            log_dir=self.log_dir,
            wrapper=self.bed.hosts[host].wrapper,
        )
        self.started.append(w)
        return w

    def start_worker(self, name: str, host: str) -> WorkerProcess:
        # A TCP worker bound to every interface: it publishes its address on the NATS connection.
        w = self.start(
            host,
            [
                "--role",
                "echo",
                "--echo-model",
                self.model,
                "--echo-delay",
                "0.01",
                "--request-plane",
                "tcp",
                "--tcp-rpc-host",
                "0.0.0.0",
                "--health-check-idle",
                "3600",
            ],
        )
        w.wait_for_log("serving")
        self.workers[name] = w
        return w

    def instances(self) -> int:
        return self.bed.call_in("h1", lambda: frontend_instances(self.base))

    def wait_instances(self, count: int, timeout: float = 30) -> float:
        """Seconds until the frontend routes to ``count`` instances."""
        start = time.monotonic()
        wait_until(lambda: self.instances() == count, timeout, 0.05, f"{count} instances in the frontend")
        return time.monotonic() - start

    def stop(self) -> None:
        for w in self.started:
            w.stop()


@pytest.fixture(scope="module")
def cluster(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with cluster_testbed(hosts=4, nats_hosts=3) as (bed, nats):
        c = Cluster(bed, nats, demo_model, tmp_path_factory.mktemp("cluster-logs"))
        try:
            c.start_worker("a", "h2")
            c.start_worker("b", "h3")
            c.wait_instances(2)
            yield c
        finally:
            c.stop()


def attached_server(worker: WorkerProcess) -> str:
    """The URL of the nats-server the worker last (re)connected to, from its log."""
    found = re.findall(r"(?:connected|reconnected) to NATS at (\S+)", worker.log())
    assert found, worker.log_tail()
    return found[-1]


def instance_id(worker: WorkerProcess) -> str:
    found = re.search(r"serving backend\.generate as instance (\w+)", worker.log())
    assert found, worker.log_tail()
    return found[1]


def discovered(c: Cluster) -> set[str]:
    """The instance ids of backend.generate a fresh watcher admits now (unreachable ones included,
    unlike the frontend's count; a lapsed copy the bucket still holds is not, see :func:`stored`)."""

    async def view() -> set[str]:
        rt = await Runtime.connect(c.nats.urls(first="h1"), c.namespace)
        try:
            watcher = rt.watcher()
            await asyncio.wait_for(watcher.ready.wait(), 10)
            return {r.instance_id for r in watcher.matching("backend", "generate")}
        finally:
            await rt.close()

    return c.bed.run_in("h1", view)


def stored(c: Cluster) -> dict[str, str]:
    """What the discovery bucket itself holds for backend.generate, record by record (admitted by a
    watcher or not): instance id -> revision and age by the stream's timestamp."""

    async def read() -> dict[str, str]:
        rt = await Runtime.connect(c.nats.urls(first="h1"), c.namespace)
        try:
            kv = await rt.discovery.bucket()
            watch = await kv.watch(f"{c.namespace}.backend.generate.>")
            found = {}
            now = datetime.datetime.now(datetime.timezone.utc)
            while (entry := await watch.updates(timeout=10)) is not None:
                if entry.value:
                    age = (now - entry.created).total_seconds() if entry.created else float("nan")
                    found[entry.key.rpartition(".")[2]] = f"revision {entry.revision}, {age:.1f} s old"
            await watch.stop()
            return found
        finally:
            await rt.close()

    return c.bed.run_in("h1", read)


def failures(load: Load) -> dict[str, int]:
    return {o: n for o, n in load.summary().items() if o != "ok"}


def ok_count(load: Load) -> int:
    return sum(1 for *_, o in load.outcomes if o == "ok")


# ---- latency between hosts: a test bed of its own, run before the shared one starts -------------

DELAY_MS = 10  # each way, on every connection between hosts: a round trip between hosts gains 20 ms
ECHO_DELAY = 0.01  # the echo worker's pause before each token, the first included
WORKER_TCP_PORT = 7400
BIRD = 464  # the demo tokenizer's " bird": each streamed token is a chunk with text


async def latency_arm(base: str, delay: bool, model: str = "echo", tokens: int = 16) -> dict[str, Any]:
    """Five requests one at a time (single-request TTFT), then 96 at concurrency 8, ``tokens`` each."""
    prompts = [[BIRD] * 24]
    singles = await run_level(
        base, model, prompts, concurrency=1, requests=5, max_tokens=tokens, max_seconds=30, request_timeout=30
    )
    load = await run_level(
        base, model, prompts, concurrency=8, requests=96, max_tokens=tokens, max_seconds=60, request_timeout=30
    )
    single_ttfts = sorted(r.ttft * 1000 for r in singles.requests if r.ok and r.ttft is not None)
    return {
        "delay": delay,
        "tokens": tokens,
        "single_ttft_ms": single_ttfts,
        "load": summarize_run(load),
        "load_ttft_min_ms": min((r.ttft * 1000 for r in load.requests if r.ttft is not None), default=None),
        "errors": summarize_run(singles)["errors"] + summarize_run(load)["errors"],
    }


def start_tcp_frontend(c: Cluster) -> tuple[WorkerProcess, str]:
    """A second frontend on h1 (port HTTP_PORT + 1), calling the workers over the TCP request plane."""
    address = c.bed.hosts["h1"].address
    frontend = c.start(
        "h1",
        [
            "--role",
            "frontend",
            "--http-host",
            address,
            "--http-port",
            str(HTTP_PORT + 1),
            "--request-plane",
            "tcp",
            "--request-retries",
            "3",
            "--migration-limit",
            "3",
        ],
    )
    return frontend, f"http://{address}:{HTTP_PORT + 1}"


def delayed_tcp_listener(c: Cluster, host: str, log_dir: Path) -> DelayProxy:
    """A proxy on ``host``'s address in front of a worker's TCP listener on its loopback (both
    WORKER_TCP_PORT): the flags a worker behind it takes are :func:`behind_proxy`."""
    address = c.bed.hosts[host].address
    return DelayProxy(
        c.bed,
        host,
        [(f"{address}:{WORKER_TCP_PORT}", f"127.0.0.1:{WORKER_TCP_PORT}")],
        DELAY_MS,
        log_dir / f"{host}-tcp-proxy.log",
    )


def behind_proxy(c: Cluster, host: str) -> list[str]:
    """A TCP worker's flags: it binds loopback and publishes its host's address, where the proxy listens."""
    return [
        "--request-plane",
        "tcp",
        "--tcp-rpc-host",
        "127.0.0.1",
        "--tcp-rpc-port",
        str(WORKER_TCP_PORT),
        "--tcp-rpc-advertise-host",
        c.bed.hosts[host].address,
    ]


def deploy_behind_proxies(c: Cluster, worker_args: list[str]) -> tuple[WorkerProcess, str, list[DelayProxy]]:
    """The latency tests' deployment: a TCP frontend on h1 beside the NATS one, and workers "a" (h2)
    and "b" (h3) started with ``worker_args``, each behind a delayed proxy in front of its TCP
    listener. Returns that frontend, its URL and every proxy (the NATS routes' first)."""
    tcp_frontend, tcp_base = start_tcp_frontend(c)
    proxies = list(c.nats.proxies.values())
    for name, host in (("a", "h2"), ("b", "h3")):
        proxies.append(delayed_tcp_listener(c, host, c.log_dir))
        address = c.bed.hosts[host].address
        # VLLM_HOST_IP: an engine's own address must be one this host has (an echo worker ignores it).
        c.workers[name] = c.start(host, [*worker_args, *behind_proxy(c, host)], VLLM_HOST_IP=address)
    return tcp_frontend, tcp_base, proxies


def measure_latency(
    c: Cluster, proxies: list[DelayProxy], bases: dict[str, str], model: str, tokens: int
) -> dict[str, dict[bool, dict[str, Any]]]:
    """:func:`latency_arm` through each frontend (``bases``: request plane -> URL), the proxies' delay
    at 0 and then on; a warm-up arm before the first (connections, the frontend's first requests)."""
    for base in bases.values():
        wait_until(
            lambda base=base: c.bed.call_in("h1", lambda: frontend_instances(base)) == 2,
            30,
            0.05,
            f"2 instances in the frontend at {base}",
        )
    arms: dict[str, dict[bool, dict[str, Any]]] = {plane: {} for plane in bases}
    for delay in (False, True):
        for proxy in proxies:
            proxy.set_delay(delay)
        for plane, base in bases.items():
            if not delay:
                c.bed.run_in("h1", lambda base=base: latency_arm(base, False, model, tokens))
            arms[plane][delay] = c.bed.run_in(
                "h1", lambda base=base, delay=delay: latency_arm(base, delay, model, tokens)
            )
    return arms


def report_latency(arms: dict[str, dict[bool, dict[str, Any]]], workers: str) -> None:
    """Asserts 0 failed on every arm; prints the ``FIGURE`` lines docs/reliability.md quotes."""
    for plane, by_delay in arms.items():
        assert by_delay[False]["errors"] == by_delay[True]["errors"] == 0, (plane, by_delay)
        off, on = by_delay[False]["load"], by_delay[True]["load"]
        tok, p50, p99 = (
            f"{on[k]:.{d}f} vs {off[k]:.{d}f}{u} (x{on[k] / off[k]:.2f})"
            for k, d, u in (("tok_per_s", 0, ""), ("ttft_p50_ms", 1, " ms"), ("ttft_p99_ms", 1, " ms"))
        )
        single_on, single_off = (statistics.median(by_delay[d]["single_ttft_ms"]) for d in (True, False))
        print(
            f"\nFIGURE cluster latency {workers} {plane}: {2 * DELAY_MS} ms per round trip between hosts vs none, "
            f"same deployment; concurrency 8, 96 requests x {by_delay[True]['tokens']} tokens: tok/s {tok}, "
            f"TTFT p50 {p50}, p99 {p99}; one request at a time: TTFT {single_on:.1f} vs {single_off:.1f} ms "
            "(median of 5); 0 failed"
        )


def test_20_ms_between_hosts_on_either_request_plane(demo_model: str, tmp_path: Path) -> None:
    """Every connection between hosts through a proxy that delays each direction 10 ms: the NATS
    routes (each server's route port behind one) and the workers' TCP listeners (each worker binds
    loopback and publishes its host's address, where the proxy listens). The frontend (h1) and
    workers (h2, h3) each reach their own host's server directly. The same deployment is measured
    with the proxies' delay at 0 and at 10 ms, through a frontend on each request plane."""
    with cluster_testbed(hosts=3, nats_hosts=3, route_delay_ms=DELAY_MS) as (bed, nats):
        c = Cluster(bed, nats, demo_model, tmp_path)  # its frontend calls workers over NATS
        try:
            echo = ["--role", "echo", "--echo-model", demo_model, "--echo-delay", str(ECHO_DELAY)]
            tcp_frontend, tcp_base, proxies = deploy_behind_proxies(c, [*echo, "--health-check-idle", "3600"])
            for w in c.workers.values():
                w.wait_for_log("serving")
            tcp_frontend.wait_for_log("frontend listening")
            arms = measure_latency(c, proxies, {"nats": c.base, "tcp": tcp_base}, "echo", 16)
        finally:
            c.stop()
    report_latency(arms, "echo")
    for plane, by_delay in arms.items():
        off, on = by_delay[False], by_delay[True]
        # The delay is on the path of every request: none answered its first token sooner than
        # a round trip between hosts plus the echo's own pause (and without the delay, one did).
        floor = ECHO_DELAY * 1000 + 2 * DELAY_MS
        assert min(on["single_ttft_ms"][0], on["load_ttft_min_ms"]) >= floor, (plane, on)
        assert off["single_ttft_ms"][0] < floor, (plane, off)


# ---- real vLLM workers on two hosts: a test bed of its own, before the shared one starts ----------

ENGINE_WORKER_FLAGS = [
    "--enforce-eager",
    "--max-model-len",
    "512",
    "--max-num-seqs",
    "16",
    "--served-model-name",
    "tiny",
    "--health-check-idle",
    "3600",
]
SYSTEM_PORT = 9400  # each worker's /metrics, on its own host's loopback
CUT_TOKENS = 450  # per stream of the cut (with the prompt, within --max-model-len 512)
CUT_ATTEMPTS = 3
CUT_PROMPT = "once upon a time"
LATENCY_TOKENS = 64  # per request of the latency arms: an engine's answer is longer than the echo's


def served(c: Cluster, host: str, what: str = "dynamo_component_requests_total") -> float:
    """Requests the worker on ``host`` received on backend.generate (or its ``what``), from its /metrics."""
    url = f"http://127.0.0.1:{SYSTEM_PORT}/metrics"
    return c.bed.call_in(host, lambda: metric_sum(url, what, dynamo_endpoint="generate"))


def greedy_answers(c: Cluster) -> dict[str, list[tuple[str, str]]]:
    """Four chat and four completion requests, one at a time, through the openai client on h1:
    per kind, (the host whose worker served it, the text) for each, in order."""
    hosts = ("h2", "h3")
    client = openai.OpenAI(base_url=f"{c.base}/v1", api_key="unused", max_retries=0, timeout=60)
    asks: dict[str, Callable[[], str]] = {
        "chat": lambda: (
            client.chat.completions.create(
                model="tiny",
                messages=[{"role": "user", "content": "Tell me about birds."}],
                max_tokens=24,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .message.content
            or ""
        ),
        "completion": lambda: (
            client.completions.create(
                model="tiny", prompt=CUT_PROMPT, max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
        ),
    }
    answers: dict[str, list[tuple[str, str]]] = {kind: [] for kind in asks}
    try:
        for kind, ask in asks.items():
            for _ in range(4):  # round-robin over two workers: two each (kinds alternated would not be)
                before = {h: served(c, h) for h in hosts}
                text = c.bed.call_in("h1", ask)
                by = [h for h in hosts if served(c, h) > before[h]]
                assert len(by) == 1, (kind, by, before)
                answers[kind].append((by[0], text))
    finally:
        client.close()
    return answers


async def cut_mid_stream(c: Cluster) -> dict[str, Any]:
    """An unmigrated stream of CUT_TOKENS first, then eight at once; once each of the eight has
    streamed text and h2's worker is generating, h2's link goes down until they end. Again (at most
    CUT_ATTEMPTS times) if the frontend recovered nothing (h2's streams had ended first), or if every
    stream ended before one on h2 was seen running."""
    client = openai.AsyncOpenAI(base_url=f"{c.base}/v1", api_key="unused", max_retries=0, timeout=120)
    chunks: list[int] = []

    async def one(i: int | None) -> dict[str, Any]:
        stream = await client.completions.create(
            model="tiny",
            prompt=CUT_PROMPT,
            max_tokens=CUT_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                text += chunk.choices[0].text
                if i is not None:
                    chunks[i] += 1
            usage = chunk.usage or usage
        return {"text": text, "tokens": usage.completion_tokens if usage else None}

    def recovered() -> tuple[float, float]:
        url = f"{c.base}/metrics"
        return (
            c.bed.call_in("h1", lambda: metric_sum(url, "dynamo_frontend_migrations_total")),
            c.bed.call_in("h1", lambda: metric_sum(url, "dynamo_frontend_retries_total")),
        )

    try:
        reference = await one(None)
        for attempt in range(1, CUT_ATTEMPTS + 1):
            before = await asyncio.to_thread(recovered)
            served_before = await asyncio.to_thread(served, c, "h3")
            chunks[:] = [0] * 8
            load = asyncio.gather(*(one(i) for i in range(8)))
            deadline = time.monotonic() + 60
            while min(chunks) < 1 or await asyncio.to_thread(served, c, "h2", "dynamo_component_inflight_requests") < 1:
                if load.done():
                    break
                assert time.monotonic() < deadline, f"never mid-stream on h2: chunks {chunks}"
                await asyncio.sleep(0.01)
            if load.done():
                # Every stream ended before one on h2 was seen running (seen once in CI, chunks
                # [256, 142, 255, 137, ...]: the tiny model is fast): whole all the same; again.
                results = await load
                assert all(r["text"] == reference["text"] for r in results), results
                assert attempt < CUT_ATTEMPTS, f"never mid-stream on h2 in {CUT_ATTEMPTS} attempts: chunks {chunks}"
                continue
            at_cut = list(chunks)
            await asyncio.to_thread(c.bed.link_down, "h2")
            cut = time.monotonic()
            try:
                results = await asyncio.wait_for(load, 120)
                ended = time.monotonic() - cut
            finally:
                await asyncio.to_thread(c.bed.link_up, "h2")
            after = await asyncio.to_thread(recovered)
            served_after = await asyncio.to_thread(served, c, "h3")
            if after != before or attempt == CUT_ATTEMPTS:
                break
            # h2's worker had sent its streams' last tokens before its link went down (the tiny
            # model is fast): they must be whole all the same; then again, h2 back in routing.
            assert all(r["text"] == reference["text"] for r in results), results
            await asyncio.to_thread(c.wait_instances, 2, 30)
    finally:
        await client.close()
    return {
        "reference": reference,
        "results": results,
        "attempt": attempt,
        "at_cut": at_cut,
        "ended_s": ended,
        "migrations": after[0] - before[0],
        "retries": after[1] - before[1],
        "h3_received": served_after - served_before,
    }


def test_real_vllm_workers_on_two_hosts_serve_alike_survive_a_cut_and_pay_20_ms(
    demo_model: str, tmp_path: Path
) -> None:
    """Real vLLM decode workers (the demo model) on h2 and h3, the frontend on h1, the latency test's
    proxies between hosts, one deployment for the three parts: (1) chat and completion requests
    through the official openai client are served by both workers with the same greedy text; (2)
    the 20 ms between hosts measured as in the echo test, through a frontend on each request plane;
    (3) h2 cut off mid-stream (the delay at 0): the streams finish on h3 with the unmigrated text."""
    with cluster_testbed(hosts=3, nats_hosts=3, route_delay_ms=DELAY_MS) as (bed, nats):
        c = Cluster(bed, nats, demo_model, tmp_path)  # its frontend calls workers over NATS
        try:
            decode = ["--role", "decode", "--model", demo_model, *ENGINE_WORKER_FLAGS]
            tcp_frontend, tcp_base, proxies = deploy_behind_proxies(c, [*decode, "--system-port", str(SYSTEM_PORT)])
            for w in c.workers.values():
                w.wait_for_log("serving", timeout=300)
            tcp_frontend.wait_for_log("frontend listening")
            c.wait_instances(2)
            for proxy in proxies:
                proxy.set_delay(False)
            answers = greedy_answers(c)
            arms = measure_latency(c, proxies, {"nats": c.base, "tcp": tcp_base}, "tiny", LATENCY_TOKENS)
            for proxy in proxies:
                proxy.set_delay(False)
            cut = c.bed.run_in("h1", lambda: cut_mid_stream(c))
            rejoined = c.wait_instances(2, 30)
            assert c.workers["a"].proc.poll() is None  # it rejoined without a restart
        finally:
            c.stop()
    # (1) Each kind of request was served on both hosts, with one greedy text whichever served it.
    said = {kind: ([h for h, _ in got], len({t for _, t in got})) for kind, got in answers.items()}
    print(f"\nFIGURE cluster vllm greedy: per kind, the hosts that served each request and how many texts: {said}")
    for kind, got in answers.items():
        assert sorted({host for host, _ in got}) == ["h2", "h3"], (kind, got)
        assert len({text for _, text in got}) == 1 and got[0][1], (kind, got)
    # (2) 0 failed; the delay is on the path of every request: with it, no first token came sooner
    # than a round trip between hosts (less a quarter, the engine's own noise) after the fastest
    # one without it (the engine's floor: the single requests run on idle workers).
    report_latency(arms, "vllm")
    for plane, by_delay in arms.items():
        off, on = (min(d["single_ttft_ms"][0], d["load_ttft_min_ms"]) for d in (by_delay[False], by_delay[True]))
        print(f"FIGURE cluster latency vllm {plane}: fastest TTFT {on:.1f} ms with the delay, {off:.1f} ms without")
        assert on >= off + 2 * DELAY_MS * 0.75, (plane, by_delay)
    # (3) Every stream complete, with the unmigrated stream's text; h2's were moved to h3.
    results, reference = cut["results"], cut["reference"]
    same = sum(r["text"] == reference["text"] for r in results)
    print(
        f"\nFIGURE cluster vllm link cut (attempt {cut['attempt']}): 8 streams of {CUT_TOKENS} tokens, text chunks "
        "each had at the cut "
        f"{cut['at_cut']}; frontend: {cut['migrations']:.0f} migrated, {cut['retries']:.0f} retried; h3's worker "
        f"received {cut['h3_received']:.0f} requests meanwhile; all ended {cut['ended_s']:.2f} s after the cut, "
        f"{same} of 8 with the unmigrated stream's text; h2's worker back in routing {rejoined:.2f} s after link-up"
    )
    assert reference["tokens"] == CUT_TOKENS, reference
    assert [r["tokens"] for r in results] == [CUT_TOKENS] * 8, results
    assert all(r["text"] == reference["text"] for r in results), results
    assert cut["migrations"] >= 1, cut


def test_the_workers_publish_addresses_other_hosts_reach(cluster: Cluster) -> None:
    """--tcp-rpc-host 0.0.0.0 publishes the host's address on its NATS connection, and a caller on
    another host with the deployment's secret gets an answer there."""
    c = cluster

    async def call() -> dict[str, str]:
        rt = await Runtime.connect(
            c.nats.urls(first="h1"), c.namespace, request_plane="tcp", request_plane_secret=TOKEN.encode()
        )
        try:
            client = rt.client("backend", "generate")
            records = await client.wait_for_instances(10, count=2)
            for r in records:
                got = [x async for x in client.direct({"token_ids": [1, 2, 3]}, r.instance_id)]
                assert [t for x in got for t in x["token_ids"]] == [1, 2, 3]
            return {r.instance_id: r.address for r in records}
        finally:
            await rt.close()

    addresses = c.bed.run_in("h1", call)
    hosts = sorted(a.rpartition(":")[0] for a in addresses.values())
    assert hosts == sorted([c.bed.hosts["h2"].address, c.bed.hosts["h3"].address]), addresses


def test_sigkill_of_the_nats_server_a_worker_is_attached_to_fails_no_request(cluster: Cluster) -> None:
    c = cluster
    victim = c.workers["a"]
    assert attached_server(victim) == c.nats.url("h2")

    async def body() -> tuple[Load, float, int]:
        load = Load(c.base, "echo", concurrency=8, max_requests=1500)
        load.start()
        await wait_for_load(load, 50)
        await asyncio.to_thread(c.nats.kill, "h2")
        killed = time.monotonic()
        await asyncio.to_thread(
            wait_until, lambda: attached_server(victim) != c.nats.url("h2"), 20, 0.05, "worker a on another server"
        )
        moved = time.monotonic() - killed
        await wait_for_load(load, ok_count(load) + 100)
        await load.stop()
        return load, moved, sum(1 for start, end, _ in load.outcomes if start < killed < end)

    load, moved, at_kill = c.bed.run_in("h1", body)
    print(
        f"\nFIGURE cluster nats kill: {len(load.outcomes)} requests at concurrency 8 ({at_kill} in flight at the "
        f"kill), outcomes {dict(load.summary())}; worker a reconnected to {attached_server(victim)} {moved:.2f} s "
        "after the kill"
    )
    assert failures(load) == {}, (failures(load), dict(load.messages))
    assert at_kill >= 1
    c.nats.start("h2")
    c.nats.wait_for_meta_leader()
    c.wait_instances(2)


@pytest.mark.parametrize("bucket_leader", ["h1", "h2"])
def test_a_worker_host_cut_off_mid_stream_loses_nothing_and_rejoins(cluster: Cluster, bucket_leader: str) -> None:
    """With the discovery bucket led from the cut host (h2), the rest of the cluster elects a new
    leader first (4-9 s in nats-server's Raft), so no lease can expire meanwhile: the frontend's
    connection to the worker, silent for about a lease, fails by itself and takes it out of routing
    (seen in CI before it did: out of routing 7.43 s after the cut)."""
    c = cluster
    c.nats.lead_stream_from(f"KV_{DISCOVERY_BUCKET}", bucket_leader)
    c.wait_instances(2)  # a step-down can hold a keep-alive up past its lease

    async def body() -> dict[str, float]:
        load = Load(c.base, "echo", concurrency=8, max_requests=3000)
        load.start()
        await wait_for_load(load, 50)
        await asyncio.to_thread(c.bed.link_down, "h2")
        cut = time.monotonic()
        left = await asyncio.to_thread(c.wait_instances, 1, 20)
        await asyncio.sleep(max(0.0, 8 - (time.monotonic() - cut)))  # an 8 s cut, as in the issue
        during = [o for s, _, o in load.outcomes if cut <= s]
        await asyncio.to_thread(c.bed.link_up, "h2")
        restored = time.monotonic()
        rejoined = await asyncio.to_thread(c.wait_instances, 2, 30)
        await wait_for_load(load, ok_count(load) + 50)
        await load.stop()
        at_cut = [(s, e) for s, e, _ in load.outcomes if s < cut < e]
        return {
            "left": left,
            "rejoined": rejoined,
            "requests": len(load.outcomes),
            "at_cut": len(at_cut),
            "slowest_at_cut": max((e - cut for _, e in at_cut), default=0.0),
            "sent_during_cut": len(during),
            "cut_s": restored - cut,
            "load": load,
        }  # type: ignore[dict-item]

    r = c.bed.run_in("h1", body)
    load: Load = r.pop("load")  # type: ignore[assignment]
    print(
        f"\nFIGURE cluster link cut (bucket led from {bucket_leader}): {r['requests']:.0f} requests at "
        f"concurrency 8, link of h2 down "
        f"{r['cut_s']:.1f} s; {r['at_cut']:.0f} in flight at the cut (slowest finished {r['slowest_at_cut']:.2f} s "
        f"after it), {r['sent_during_cut']:.0f} sent during the cut; worker a out of routing {r['left']:.2f} s "
        f"after the cut (lease {LEASE} s), back {r['rejoined']:.2f} s after link-up; outcomes "
        f"{dict(load.summary())}; errors {dict(load.messages)}"
    )
    assert failures(load) == {}, (failures(load), dict(load.messages))
    assert r["left"] < LEASE + 3 and r["slowest_at_cut"] < LEASE + 3 and r["rejoined"] < 10
    assert c.workers["a"].proc.poll() is None  # it rejoined without a restart
    c.nats.wait_for_meta_leader()


def test_every_process_of_a_worker_host_sigkilled_loses_nothing(cluster: Cluster) -> None:
    c = cluster
    victim = c.workers.pop("b")

    async def body() -> tuple[Load, float, float]:
        load = Load(c.base, "echo", concurrency=8, max_requests=1500)
        load.start()
        await wait_for_load(load, 50)
        killed = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(c.nats.kill, "h3")
        left = await asyncio.to_thread(c.wait_instances, 1, 20)
        await wait_for_load(load, ok_count(load) + 100)
        await load.stop()
        slowest = max(end - killed for start, end, _ in load.outcomes if start < killed < end)
        return load, left, slowest

    load, left, slowest = c.bed.run_in("h1", body)
    try:
        dead = instance_id(victim)
        c.dead.add(dead)
        start = time.monotonic()

        # Its record leaves the bucket too when its lease runs out (the frontend's count above leaves
        # out instances it found unreachable: the record itself must go, or it would linger forever).
        # JetStream expires it only once the bucket has a leader again: when h3's server led it, the
        # other two elect one first (CI of 91fbde2: no answer for about 16 s), and meanwhile a fresh
        # watcher cannot read the bucket at all.
        def expired() -> bool:
            try:
                return dead not in discovered(c)
            except TimeoutError:  # the bucket unreadable: the election is not over
                return False

        wait_until(expired, LEASE + ELECTION, 0.2, "the dead worker's record to expire")
        expired = time.monotonic() - start
        print(
            f"\nFIGURE cluster host kill: {len(load.outcomes)} requests at concurrency 8, worker and nats-server of "
            f"h3 SIGKILLed; out of routing {left:.2f} s after; its record gone from the bucket within "
            f"{expired:.2f} s of the load's end; the slowest request in flight at the kill finished {slowest:.2f} s "
            f"after it; outcomes {dict(load.summary())}"
        )
        assert failures(load) == {}, (failures(load), dict(load.messages))
        # Its streams move on when its lease runs out (not after the 60 s idle timeout of a stream).
        assert slowest < LEASE + 8, slowest
    finally:  # h3 back whatever the outcome: the module's later tests share this cluster
        victim.wait(10)
        c.nats.start("h3")
        c.nats.wait_for_meta_leader()
        c.start_worker("b", "h3")
        c.wait_instances(2)


def test_two_of_three_nats_servers_down_requests_still_flow_and_discovery_recovers(cluster: Cluster) -> None:
    c = cluster
    log_start = {name: len(w.log()) for name, w in c.workers.items()}
    frontend_start = len(c.frontend.log())

    def frontend_said(text: str) -> int:
        return c.frontend.log()[frontend_start:].count(text)

    async def body() -> tuple[Load, int, float, float | None]:
        load = Load(c.base, "echo", concurrency=8, max_requests=3000)
        load.start()
        await wait_for_load(load, 50)
        for host in ("h2", "h3"):
            await asyncio.to_thread(c.nats.kill, host)
        down = time.monotonic()
        # Longer than a lease (JetStream cannot expire or refresh one), and until the frontend has
        # said its watch stalled (it asks after a lease without news; bounded).
        stall_said = None
        while time.monotonic() - down < 3 * LEASE or (stall_said is None and time.monotonic() - down < 20):
            if stall_said is None and frontend_said("discovery watch st") + frontend_said("discovery watch fa"):
                stall_said = time.monotonic() - down
            await asyncio.sleep(0.1)
        served_without_quorum = sum(1 for s, _, o in load.outcomes if s >= down and o == "ok")
        for host in ("h2", "h3"):
            await asyncio.to_thread(c.nats.start, host)
        await asyncio.to_thread(c.nats.wait_for_meta_leader, 30)
        back = time.monotonic()
        await wait_for_load(load, ok_count(load) + 50)
        await load.stop()
        return load, served_without_quorum, back - down, stall_said

    load, served, outage, stall_said = c.bed.run_in("h1", body)
    recovered = c.wait_instances(2)
    for name, w in c.workers.items():
        wait_until(lambda w=w: "discovery keep-alive works again" in w.log(), 30, what=f"worker {name} recovered")
    wait_until(lambda: frontend_said("discovery watch works again") > 0, 30, what="the frontend's watch recovered")
    warned = [w.log()[log_start[name] :].count("discovery keep-alive failed") for name, w in c.workers.items()]
    frontend_lines = [line for line in c.frontend.log()[frontend_start:].splitlines() if "discovery watch" in line]
    print(
        f"\nFIGURE cluster no quorum: 2 of 3 nats-servers down {outage:.1f} s; {served} requests served without "
        f"quorum; outcomes {dict(load.summary())}; keep-alive failures logged {warned} time(s) per worker; the "
        f"frontend said its watch stalled {stall_said or 0:.1f} s after the servers went down; both workers routed "
        f"{recovered:.2f} s after quorum returned; the frontend's discovery watch lines: {frontend_lines}"
    )
    assert failures(load) == {}, (failures(load), dict(load.messages))
    assert served > 0
    assert all(n == 1 for n in warned), warned  # said once per outage, not every round
    # The frontend says so too: once when its watch stalls (or fails), once when it works again.
    assert stall_said is not None, frontend_lines
    assert frontend_said("JetStream is unreachable or has no quorum") == 1, frontend_lines
    assert frontend_said("discovery watch works again") == 1, frontend_lines
    # After quorum returns a fresh watcher sees exactly the live workers (a restarted server's copy
    # of a record whose lease ran out before it went down can be back in the bucket: not admitted).
    live = {instance_id(w) for w in c.workers.values()}
    wait_until(lambda: discovered(c) == live, LEASE + 10, 0.5, f"the bucket to hold exactly {live}")


def test_a_stranger_without_the_secret_is_refused(cluster: Cluster) -> None:
    """A worker on another host with its own secret: the deployment does not call it, and it
    cannot call the deployment's workers."""
    c = cluster
    stranger = c.start(
        "h4",
        [
            "--role",
            "echo",
            "--echo-model",
            c.model,
            "--request-plane",
            "tcp",
            "--tcp-rpc-host",
            "0.0.0.0",
            "--health-check-idle",
            "3600",
        ],
        token="not-the-secret",
    )
    stranger.wait_for_log("serving")
    a, b, s = instance_id(c.workers["a"]), instance_id(c.workers["b"]), instance_id(stranger)

    async def call(secret: str) -> dict[str, str]:
        """Call each instance a fresh watcher sees: the two workers and the stranger, and nobody else
        (the worker killed with its host's nats-server an earlier test: its lease lapsed, and a copy
        of its record that a restarted replica brings back is not admitted, issue 18)."""
        rt = await Runtime.connect(
            c.nats.urls(first="h1"), c.namespace, request_plane="tcp", request_plane_secret=secret.encode()
        )
        outcomes = {}
        try:
            client = rt.client("backend", "generate")
            await client.watcher.wait_for(lambda: {a, b, s} <= {r.instance_id for r in client.instances()}, 10)
            seen = {r.instance_id for r in client.instances()}
            assert seen == {a, b, s}, (seen, "dead:", c.dead)
            for instance in (a, b, s):
                try:
                    [x async for x in client.direct({"token_ids": [7]}, instance)]
                    outcomes[instance] = "ok"
                except RequestError as exc:
                    outcomes[instance] = exc.code
        finally:
            await rt.close()
        return outcomes

    in_bucket = stored(c)
    try:
        by_deployment = c.bed.run_in("h1", lambda: call(TOKEN))
        by_stranger = c.bed.call_in("h4", lambda: asyncio.run(call("not-the-secret")))
    finally:
        stranger.stop()
    print(
        f"\nFIGURE cluster stranger: the deployment calling the workers: {by_deployment}; the stranger: "
        f"{by_stranger} (a {a}, b {b}, stranger {s}); the bucket holds {in_bucket}, of which dead "
        f"(not admitted): {sorted(set(in_bucket) & c.dead)}"
    )
    assert (by_deployment[a], by_deployment[b], by_deployment[s]) == ("ok", "ok", "unavailable"), by_deployment
    assert (by_stranger[a], by_stranger[b], by_stranger[s]) == ("unavailable", "unavailable", "ok"), by_stranger


# ---- the options a deployment over several hosts sets --------------------------------------------


def test_more_discovery_replicas_than_servers_is_a_one_line_error() -> None:
    nats = NatsServer()  # a fresh single server: no bucket yet from other tests
    nats.start()
    try:
        result = run_cli("--role", "echo", "--nats-url", nats.url, "--discovery-replicas", "3")
    finally:
        nats.cleanup()
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith(
        "dynamo-worker: error: --discovery-replicas 3: the NATS cluster cannot hold 3 replicas"
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_publishing_a_loopback_address_to_a_deployment_over_the_network_is_a_one_line_error() -> None:
    result = run_cli(
        "--role",
        "echo",
        "--nats-url",
        "nats://192.0.2.10:4222",
        "--request-plane",
        "tcp",
        "--tcp-rpc-host",
        "0.0.0.0",
        "--tcp-rpc-advertise-host",
        "127.0.0.1",
        "--request-plane-token",
        "secret",
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(
        "dynamo-worker: error: --tcp-rpc-advertise-host 127.0.0.1: the worker would publish a loopback address"
    ), line
