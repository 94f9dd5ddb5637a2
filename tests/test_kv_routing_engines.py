"""``--router-mode kv`` with real vLLM workers: requests go to the worker that holds their prefix,
as each worker's own prefix-cache counters show.

One deployment for the module (engine start-up is the slow part): a frontend in kv mode started
before two decode workers with 32-token blocks, then the tests in file order.
"""

from __future__ import annotations

import json
import random
import signal
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import NatsServer, WorkerProcess, free_port, wait_until

BLOCK = 32
WORKER_FLAGS = [
    "--enforce-eager",
    "--max-model-len",
    "512",
    "--max-num-seqs",
    "8",
    "--served-model-name",
    "tiny",
    "--block-size",
    str(BLOCK),
    "--health-check-idle",
    "3600",
]


def metric(url: str, name: str, **labels: str) -> float:
    body = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


class Cluster:
    def __init__(self, nats: NatsServer, model: str) -> None:
        self.nats, self.model = nats, model
        self.namespace = f"kvr{uuid.uuid4().hex[:8]}"
        self.frontends: list[tuple[WorkerProcess, str]] = []
        self.workers: dict[str, tuple[WorkerProcess, str]] = {}

    def start_frontend(self) -> str:
        port = free_port()
        proc = WorkerProcess(
            [
                "--role",
                "frontend",
                "--nats-url",
                self.nats.url,
                "--namespace",
                self.namespace,
                "--http-port",
                str(port),
                "--router-mode",
                "kv",
            ]
        )
        proc.wait_for_log("frontend listening")
        base = f"http://127.0.0.1:{port}"
        self.frontends.append((proc, base))
        return base

    def start_worker(self, name: str) -> None:
        port = free_port()
        proc = WorkerProcess(
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
        self.workers[name] = (proc, f"http://127.0.0.1:{port}")

    def hits(self) -> dict[str, float]:
        """Prompt tokens each worker's vLLM found in its prefix cache so far."""
        return {name: metric(url, "vllm:prefix_cache_hits_total") for name, (_, url) in self.workers.items()}

    def complete(self, base: str, prompt: list[int]) -> dict[str, Any]:
        body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()
        req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)

    def start_stream(self, base: str, prompt: list[int], max_tokens: int) -> Any:
        """A streamed completion, open once its first chunk came: it is running on its worker."""
        body = json.dumps(
            {
                "model": "tiny",
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            }
        ).encode()
        req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
        resp = urllib.request.urlopen(req, timeout=60)
        assert resp.readline().startswith(b"data: ")
        return resp

    def stop(self) -> None:
        for proc, _ in [*self.workers.values(), *self.frontends]:
            proc.stop()


def prompt_of(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [0] + [rng.randrange(3, 512) for _ in range(length - 1)]


@pytest.fixture(scope="module")
def cluster(nats_server: NatsServer, demo_model: str) -> Iterator[Cluster]:
    c = Cluster(nats_server, demo_model)
    try:
        base = c.start_frontend()  # before the workers: it sees their first event batches
        for name in ("a", "b"):
            c.start_worker(name)
        for proc, _ in c.workers.values():
            proc.wait_for_log("serving", timeout=300)

        def instances() -> int:
            with urllib.request.urlopen(f"{base}/health") as resp:
                return int(json.load(resp)["instances"])

        wait_until(lambda: instances() == 2, 30, what="both workers in the frontend's view")
        yield c
    finally:
        c.stop()


def test_requests_sharing_a_prefix_go_to_the_worker_that_caches_it(cluster: Cluster) -> None:
    _, base = cluster.frontends[0]
    prefixes = {seed: prompt_of(seed, 4 * BLOCK) for seed in (1, 2)}  # two tenants' system prompts
    # The first request of a tenant computes its prefix. The second tenant's comes while the
    # first's is still running, so it goes to the other worker (the least loaded, nobody holding
    # any of it): each worker then holds one prefix, whatever the tie-breaks.
    with cluster.start_stream(base, prefixes[1] + [7], max_tokens=300) as running:
        cluster.complete(base, prefixes[2] + [7])
        running.read()
    wait_until(lambda: metric(base, "dynamo_frontend_kv_index_blocks") >= 8, 15, what="the index holding both prefixes")
    before = cluster.hits()
    holders = {}
    for seed, prefix in prefixes.items():
        for turn in range(4):
            usage = cluster.complete(base, prefix + [8 + turn, 9])["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == 4 * BLOCK  # every turn hit its prefix
        after = cluster.hits()
        gained = {name: after[name] - before[name] for name in after}
        before = after
        # All four turns went to one worker, and vLLM's own counter on it says they hit the cache.
        [holder] = [name for name, tokens in gained.items() if tokens > 0]
        assert gained[holder] == 4 * 4 * BLOCK, gained
        holders[seed] = holder
    assert sorted(holders.values()) == ["a", "b"]
    # Predictions matched what the engines reported for every request routed here.
    assert metric(base, "dynamo_frontend_kv_prediction_misses_total") == 0
    assert metric(base, "dynamo_frontend_kv_event_gaps_total") == 0


def test_a_frontend_started_later_rebuilds_its_index_from_the_workers_and_routes_alike(cluster: Cluster) -> None:
    _, first = cluster.frontends[0]
    late = cluster.start_frontend()
    prefix = prompt_of(1, 4 * BLOCK)
    # A new block on the prefix's holder: its next event batch is the late frontend's first from
    # it, not seq 0, so the late frontend fetches the holder's block set (kv_blocks).
    cluster.complete(first, prefix + prompt_of(52, BLOCK)[1:] + [3])
    wait_until(
        lambda: metric(late, "dynamo_frontend_kv_resyncs_total", outcome="ok") >= 1,
        20,
        what="the late frontend fetching a worker's block set",
    )
    wait_until(lambda: metric(late, "dynamo_frontend_kv_index_blocks") >= 5, 20, what="the late frontend's index")
    before = cluster.hits()
    usage = cluster.complete(late, prefix + [20, 21])["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 4 * BLOCK
    gained = {name: tokens - before[name] for name, tokens in cluster.hits().items()}
    assert sorted(gained.values()) == [0, 4 * BLOCK]


def test_a_killed_worker_is_purged_from_the_index(cluster: Cluster) -> None:
    _, base = cluster.frontends[0]
    assert metric(base, "dynamo_frontend_kv_index_workers") == 2
    proc, _ = cluster.workers.pop("b")
    proc.signal(signal.SIGKILL)
    proc.wait(30)
    wait_until(
        lambda: metric(base, "dynamo_frontend_kv_index_workers") == 1,
        15,
        what="the killed worker out of the index (its lease expired)",
    )
    usage = cluster.complete(base, prompt_of(2, 4 * BLOCK) + [30])["usage"]
    assert usage["completion_tokens"] == 2
