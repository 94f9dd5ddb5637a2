"""``--router-mode kv`` with real vLLM workers: requests go to the worker that holds their prefix,
as each worker's own prefix-cache counters show.

One deployment for the module (engine start-up is the slow part): a frontend in kv mode started
before two decode workers with 32-token blocks (LoRA enabled, one demo adapter in ``--lora-dirs``),
then the tests in file order; tests needing another frontend (one cut off NATS through a relay, one
with ``--no-kv-events``) start it against the same workers. The killed-worker test is last.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_worker.core.runtime import Runtime
from tests.helpers import NatsServer, WorkerProcess, free_port, wait_until
from tests.lora_helpers import write_demo_lora

REPO = Path(__file__).resolve().parent.parent
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


def instances(base: str) -> int:
    with urllib.request.urlopen(f"{base}/health", timeout=10) as resp:
        return int(json.load(resp)["instances"])


class NatsLink:
    """A relay (tests/delay_proxy.py, no delay) between one frontend and nats-server: taking it down
    cuts that frontend off NATS, and the events published meanwhile never reach it (core NATS is
    at most once); brought up again on the same port, the frontend reconnects."""

    def __init__(self, nats_url: str) -> None:
        self.target = nats_url.removeprefix("nats://")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def up(self) -> None:
        forward = f"127.0.0.1:{self.port}={self.target}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.delay_proxy", "--delay-ms", "0", "--forward", forward],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            cwd=REPO,
        )
        wait_until(self._listening, 15, what=f"the NATS relay listening on {self.port}")

    def _listening(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, "the NATS relay exited"
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.proc = None


class Cluster:
    def __init__(self, nats: NatsServer, model: str) -> None:
        self.nats, self.model = nats, model
        self.namespace = f"kvr{uuid.uuid4().hex[:8]}"
        self.frontends: list[tuple[WorkerProcess, str]] = []
        self.workers: dict[str, tuple[WorkerProcess, str]] = {}
        self.links: list[NatsLink] = []
        self.adapters = Path()  # the workers' --lora-dirs

    def start_frontend(self, *flags: str, nats_url: str | None = None) -> str:
        port = free_port()
        proc = WorkerProcess(
            [
                "--role",
                "frontend",
                "--nats-url",
                nats_url or self.nats.url,
                "--namespace",
                self.namespace,
                "--http-port",
                str(port),
                "--router-mode",
                "kv",
                *flags,
            ]
        )
        proc.wait_for_log("frontend listening")
        base = f"http://127.0.0.1:{port}"
        self.frontends.append((proc, base))
        return base

    def start_worker(self, name: str, *flags: str) -> None:
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
                *flags,
            ]
        )
        self.workers[name] = (proc, f"http://127.0.0.1:{port}")

    async def load_adapter(self, name: str, path: Path) -> None:
        """Load a LoRA adapter on every worker (``backend.load_lora``, as Dynamo's clients do)."""
        rt = await Runtime.connect(self.nats.url, self.namespace)
        try:
            client = rt.client("backend", "load_lora")
            records = await client.wait_for_instances(10, count=len(self.workers))
            assert len(records) == len(self.workers), records
            for record in records:
                request = {"lora_name": name, "source": {"uri": str(path)}}
                [reply] = [r async for r in client.direct(request, record.instance_id)]
                assert reply["status"] == "success", reply
        finally:
            await rt.close()

    def nats_link(self) -> NatsLink:
        link = NatsLink(self.nats.url)
        self.links.append(link)
        link.up()
        return link

    def hits(self) -> dict[str, float]:
        """Prompt tokens each worker's vLLM found in its prefix cache so far."""
        return {name: metric(url, "vllm:prefix_cache_hits_total") for name, (_, url) in self.workers.items()}

    def complete(self, base: str, prompt: list[int], model: str = "tiny") -> dict[str, Any]:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0}).encode()
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
        for link in self.links:
            link.down()


def prompt_of(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [0] + [rng.randrange(3, 512) for _ in range(length - 1)]


@pytest.fixture(scope="module")
def cluster(nats_server: NatsServer, demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(nats_server, demo_model)
    c.adapters = tmp_path_factory.mktemp("adapters")
    write_demo_lora(c.adapters / "a1", demo_model)
    lora = ["--enable-lora", "--max-lora-rank", "8", "--lora-dirs", str(c.adapters)]
    try:
        base = c.start_frontend()  # before the workers: it sees their first event batches
        for name in ("a", "b"):
            c.start_worker(name, *lora)
        for proc, _ in c.workers.values():
            proc.wait_for_log("serving", timeout=300)
        wait_until(lambda: instances(base) == 2, 30, what="both workers in the frontend's view")
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


def cached(response: dict[str, Any]) -> int:
    return int(response["usage"]["prompt_tokens_details"]["cached_tokens"])


def predictions(base: str) -> tuple[float, float, float]:
    """The frontend's predicted and the engines' actual cached tokens, and the misses, so far."""
    return (
        metric(base, "dynamo_frontend_kv_predicted_cached_tokens_total"),
        metric(base, "dynamo_frontend_kv_actual_cached_tokens_total"),
        metric(base, "dynamo_frontend_kv_prediction_misses_total"),
    )


def routed_alone(cluster: Cluster, base: str, prompt: list[int], model: str = "tiny") -> tuple[int, int, str | None]:
    """One request through ``base``: the tokens the frontend predicted cached, the tokens the engine
    reported cached, and the worker whose vLLM prefix-cache hits grew (None when none did)."""
    before_hits, (predicted, actual, _) = cluster.hits(), predictions(base)
    engine = cached(cluster.complete(base, prompt, model))
    # The frontend counts the request's prediction once its last message came (just after the reply).
    wait_until(lambda: predictions(base)[1] - actual == engine, 10, what="the frontend counting the reply")
    gained = {name: tokens - before_hits[name] for name, tokens in cluster.hits().items() if tokens > before_hits[name]}
    assert len(gained) <= 1 and all(tokens == engine for tokens in gained.values()), gained
    return int(predictions(base)[0] - predicted), engine, next(iter(gained), None)


def test_an_event_batch_the_frontend_missed_is_recovered_from_the_workers_block_set(cluster: Cluster) -> None:
    _, first = cluster.frontends[0]
    link = cluster.nats_link()
    late = cluster.start_frontend(nats_url=link.url)
    proc, _ = cluster.frontends[-1]
    wait_until(lambda: instances(late) == 2, 30, what="both workers in the frontend's view")
    prefix = prompt_of(60, 4 * BLOCK)
    blocks = metric(first, "dynamo_frontend_kv_index_blocks")
    assert cached(cluster.complete(first, prefix + [7])) == 0
    wait_until(lambda: metric(first, "dynamo_frontend_kv_index_blocks") >= blocks + 4, 15, what="the prefix indexed")
    # The new frontend holds the prefix too (from the holder's batch, or its block set when that
    # batch was not the holder's first: a frontend started late fetches it).
    wait_until(lambda: metric(late, "dynamo_frontend_kv_index_blocks") >= 4, 20, what="the new frontend's index")
    gaps = metric(late, "dynamo_frontend_kv_event_gaps_total")
    resyncs = metric(late, "dynamo_frontend_kv_resyncs_total", outcome="ok")
    link.down()
    proc.wait_for_log("lost the NATS connection", 15)
    # Meanwhile the holder caches one more block of the prefix: a batch the cut-off frontend never gets.
    longer = prefix + prompt_of(61, BLOCK + 1)[1:]
    blocks = metric(first, "dynamo_frontend_kv_index_blocks")
    predicted, engine, holder = routed_alone(cluster, first, longer + [7])
    assert (predicted, engine) == (4 * BLOCK, 4 * BLOCK) and holder is not None
    wait_until(
        lambda: metric(first, "dynamo_frontend_kv_index_blocks") > blocks, 15, what="the holder's batch published"
    )
    link.up()
    wait_until(lambda: "reconnected to NATS at" in proc.log(), 30, what="the frontend back on NATS")
    # The holder's next batch follows the lost one: a gap, and the frontend fetches its block set.
    assert routed_alone(cluster, first, longer + prompt_of(62, BLOCK + 1)[1:] + [7])[2] == holder
    wait_until(
        lambda: metric(late, "dynamo_frontend_kv_resyncs_total", outcome="ok") > resyncs,
        20,
        what="the resync after the lost batch",
    )
    assert metric(late, "dynamo_frontend_kv_event_gaps_total") == gaps + 1
    assert metric(late, "dynamo_frontend_kv_resyncs_total", outcome="failed") == 0
    # The block of the lost batch is known again: predicted on the holder, as its engine reports.
    assert routed_alone(cluster, late, longer + [8, 9]) == (5 * BLOCK, 5 * BLOCK, holder)
    assert predictions(late)[2] == 0


def test_approximate_mode_sends_repeated_prefixes_to_the_worker_it_sent_them_to(cluster: Cluster) -> None:
    """``--no-kv-events``: the frontend reads no event and predicts from its own routing."""
    approx = cluster.start_frontend("--no-kv-events")
    wait_until(lambda: instances(approx) == 2, 30, what="both workers in the frontend's view")
    prefixes = {seed: prompt_of(seed, 4 * BLOCK) for seed in (70, 71)}
    # As in the first test: the second prefix goes to the other worker while the first runs.
    with cluster.start_stream(approx, prefixes[70] + [7], max_tokens=300) as running:
        assert cached(cluster.complete(approx, prefixes[71] + [7])) == 0
        running.read()
    holders: dict[int, set[str | None]] = {70: set(), 71: set()}
    for turn in range(3):
        for seed, prefix in prefixes.items():
            predicted, engine, holder = routed_alone(cluster, approx, prefix + [8 + turn, 9])
            assert (predicted, engine) == (4 * BLOCK, 4 * BLOCK), (seed, turn)
            holders[seed].add(holder)
    # Every repeat of a prefix went to one worker, and the two prefixes to the two workers.
    assert sorted(name for names in holders.values() for name in names) == ["a", "b"], holders
    assert metric(approx, "dynamo_frontend_kv_event_gaps_total") == 0
    assert metric(approx, "dynamo_frontend_kv_resyncs_total") == 0


def test_a_prompt_under_a_lora_adapter_and_under_the_base_model_are_cached_apart(cluster: Cluster) -> None:
    _, base = cluster.frontends[0]
    asyncio.run(cluster.load_adapter("a1", cluster.adapters / "a1"))

    def models() -> set[str]:
        with urllib.request.urlopen(f"{base}/v1/models", timeout=10) as resp:
            return {m["id"] for m in json.load(resp)["data"]}

    wait_until(lambda: "a1" in models(), 30, what="the adapter in the frontend's model list")
    prompt = prompt_of(80, 4 * BLOCK)
    blocks = metric(base, "dynamo_frontend_kv_index_blocks")
    assert routed_alone(cluster, base, prompt + [7])[:2] == (0, 0)
    wait_until(lambda: metric(base, "dynamo_frontend_kv_index_blocks") >= blocks + 4, 15, what="the base blocks")
    # The same tokens under the adapter: the base model's blocks are no prefix of them, for the
    # router (no overlap predicted) as for vLLM (nothing cached); they are cached as new blocks.
    blocks = metric(base, "dynamo_frontend_kv_index_blocks")
    assert routed_alone(cluster, base, prompt + [7], model="a1")[:2] == (0, 0)
    wait_until(lambda: metric(base, "dynamo_frontend_kv_index_blocks") >= blocks + 4, 15, what="the adapter's blocks")
    # Each then finds its own blocks, predicted as its engine reports.
    predicted, engine, lora_holder = routed_alone(cluster, base, prompt + [8], model="a1")
    assert (predicted, engine) == (4 * BLOCK, 4 * BLOCK) and lora_holder is not None
    predicted, engine, base_holder = routed_alone(cluster, base, prompt + [9])
    assert (predicted, engine) == (4 * BLOCK, 4 * BLOCK) and base_holder is not None
    assert predictions(base)[2] == 0


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
