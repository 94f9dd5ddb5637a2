"""What an operator sees of a decode worker: /metrics, load and KV events (and the block set they
describe, ``kv_blocks``), sleep and wake, the status server's admin token, the config dump.

One real vLLM engine (CPU, the tiny demo model) for the module, behind a real token-protected
nats-server, configured as in production: secrets in the environment (and vLLM's --hf-token), the
status server bound to 0.0.0.0 with an admin token (the tests only connect to 127.0.0.1).
The engine runs with 32-token KV blocks, so prompts of 70 tokens fill two blocks.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import stat
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime
from tests.engine_helpers import ENGINE_FLAGS
from tests.helpers import NatsServer, WorkerProcess, free_kv_event_port, free_port, run_cli, worker_env
from tests.test_security import ConfiguredNats

BLOCK = 32
# The deployment's secrets: none may show in its config dump.
NATS_TOKEN = "nats-SECRET-0b1c2d3e"
ADMIN_TOKEN = "admin-SECRET-4f5a6b7c"
REQUEST_PLANE_TOKEN = "rp-SECRET-8d9e0f1a"
HF_TOKEN = "hf_SECRETq8w7e6r5t4y3u2i1"
SECRETS = (NATS_TOKEN, ADMIN_TOKEN, REQUEST_PLANE_TOKEN, HF_TOKEN)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


class Deployment:
    def __init__(self, worker: WorkerProcess, nats_url: str, namespace: str, port: int, tmp: Path, dump: Path) -> None:
        self.worker, self.nats_url, self.namespace, self.port, self.tmp = worker, nats_url, namespace, port, tmp
        self.dump = dump

    async def runtime(self) -> Runtime:
        return await Runtime.connect(self.nats_url, self.namespace, token=NATS_TOKEN)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def metrics_text(self) -> str:
        return urllib.request.urlopen(self.url("/metrics"), timeout=10).read().decode()

    def post(self, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
        """POST as an operator's tool would: JSON, with the admin token unless ``headers`` replace it."""
        headers = {"Content-Type": "application/json", **ADMIN} if headers is None else headers
        req = urllib.request.Request(self.url(path), data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(self.url(path), timeout=10) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())


def metrics_dirs(tmp: Path) -> list[Path]:
    return list(tmp.glob("dynamo_worker_prometheus_*"))


@pytest.fixture(scope="module")
def deployment(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    namespace = f"ops{uuid.uuid4().hex[:8]}"
    port = free_port()
    tmp = tmp_path_factory.mktemp("worker-tmp")  # the worker's own TMPDIR: its files are visible here
    dump = tmp_path_factory.mktemp("dump") / "config.json"
    nats = ConfiguredNats("--auth", NATS_TOKEN)
    env = worker_env(
        DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port()),
        TMPDIR=str(tmp),
        NATS_AUTH_TOKEN=NATS_TOKEN,
        DYN_SYSTEM_ADMIN_TOKEN=ADMIN_TOKEN,
        DYN_REQUEST_PLANE_TOKEN=REQUEST_PLANE_TOKEN,
    )
    # --tokenizer and --max-num-batched-tokens (vLLM's CPU default) are given so the dump has
    # values there that a careless redaction would hide.
    worker = WorkerProcess(
        [
            "--role",
            "decode",
            "--model",
            demo_model,
            "--served-model-name",
            "tiny",
            "--nats-url",
            nats.url,
            "--namespace",
            namespace,
            "--system-port",
            str(port),
            "--system-host",
            "0.0.0.0",
            "--dump-config-to",
            str(dump),
            "--hf-token",
            HF_TOKEN,
            "--tokenizer",
            demo_model,
            "--max-num-batched-tokens",
            "2048",
            "--block-size",
            str(BLOCK),
            *ENGINE_FLAGS,
        ],
        env=env,
    )
    try:
        worker.wait_for_log("serving", timeout=240)
        yield Deployment(worker, nats.url, namespace, port, tmp, dump)
    finally:
        worker.stop()
        nats.stop()
    # The engine processes' metrics directory lives as long as the worker, and no longer; so does
    # the directory of the KV-event replay socket.
    assert worker.proc.returncode == 0, worker.log()[-3000:]
    assert metrics_dirs(tmp) == []
    assert list(tmp.glob("dw-kv-*")) == []


def greedy(prompt: list[int], max_tokens: int = 8, **extra: Any) -> dict[str, Any]:
    return {
        "token_ids": prompt,
        "sampling_options": {"temperature": 0.0},
        "stop_conditions": {"max_tokens": max_tokens, "ignore_eos": True},
        **extra,
    }


async def generate(rt: Runtime, request: dict[str, Any]) -> list[dict[str, Any]]:
    client = rt.client("backend", "generate")
    await client.wait_for_instances(10)
    return [chunk async for chunk in client.generate(request)]


def tokens(chunks: list[dict[str, Any]]) -> list[int]:
    return [t for c in chunks for t in c["token_ids"]]


def unique_prompt(length: int, seed: int) -> list[int]:
    """A prompt no other test sends (so the prefix cache starts cold for it)."""
    rng = random.Random(seed)
    return [0] + [rng.randrange(3, 512) for _ in range(length - 1)]


class Events:
    """Everything published on one event-plane topic while the test runs."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    async def subscribe(self, rt: Runtime, topic: str) -> Events:
        async def on_event(payload: Any) -> None:
            self.items.append(payload)

        await rt.subscribe_events(topic, on_event)
        await rt.nc.flush()
        return self

    async def wait_for(self, predicate: Any, timeout: float = 10, diagnose: Any = None) -> Any:
        for _ in range(int(timeout / 0.05)):
            found = [e for e in self.items if predicate(e)]
            if found:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"no matching event in {len(self.items)} received: {self.items[-5:]}"
            + (f"; the worker says {diagnose()}" if diagnose else "")
        )


# ---- metrics ---------------------------------------------------------------------------------------


async def test_metrics_carry_vllm_metrics_and_the_workers_latency_histograms(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        for seed in range(3):
            assert len(tokens(await generate(rt, greedy(unique_prompt(12, seed), max_tokens=8)))) == 8
    finally:
        await rt.close()
    text = deployment.metrics_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {(s.name, s.labels.get("model", "")): s.value for f in families.values() for s in f.samples}

    def total(family: str, suffix: str) -> float:
        return sum(s.value for s in families[family].samples if s.name.endswith(suffix))

    vllm = [name for name in families if name.startswith("vllm:")]
    assert len(vllm) >= 30, vllm
    assert total("vllm:request_success", "_total") >= 3
    assert total("vllm:generation_tokens", "_total") >= 24
    assert total("vllm:time_to_first_token_seconds", "_count") >= 3
    # The worker's own histograms: one TTFT per request, one inter-token gap per later token.
    assert samples[("dynamo_component_time_to_first_token_seconds_count", "tiny")] >= 3
    assert samples[("dynamo_component_inter_token_latency_seconds_count", "tiny")] >= 3 * 7
    assert samples[("dynamo_component_kvstats_total_blocks", "")] > 0
    # Each family once: the engine processes' metrics directory adds nothing twice.
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    assert len(metrics_dirs(deployment.tmp)) == 1


def test_the_workers_timer_observes_one_gap_per_token_after_the_first_however_tokens_are_grouped() -> None:
    """vLLM merges a request's queued deltas when the worker reads them late, so the first chunk
    can carry two tokens: the second still counts one gap (0: it came with the first), as the
    frontend's histograms count it. The test above once saw 20 gaps for 3 x 8 tokens without it."""
    from prometheus_client import CollectorRegistry, Histogram

    from dynamo_worker.engine.metrics import RequestTimer

    registry = CollectorRegistry()
    ttft, itl = Histogram("ttft", "", registry=registry), Histogram("itl", "", registry=registry)
    timer = RequestTimer(ttft, itl)
    for count, now in ((2, 10.0), (1, 10.5), (3, 11.1), (2, 11.3)):  # 8 tokens in 4 chunks
        timer.tokens(count, started=9.0, now=now)
    assert registry.get_sample_value("ttft_count") == 1 and registry.get_sample_value("ttft_sum") == 1.0
    assert registry.get_sample_value("itl_count") == 7
    assert registry.get_sample_value("itl_sum") == pytest.approx(0.0 + 0.5 + 0.6 + 0.2)  # the gaps, shared


# ---- load -------------------------------------------------------------------------------------------


async def test_load_metrics_show_requests_running_then_an_idle_engine(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        [record] = await rt.client("backend", "generate").wait_for_instances(10)
        load = await Events().subscribe(rt, "load_metrics")
        results = await asyncio.gather(
            *(generate(rt, greedy(unique_prompt(20, 100 + i), max_tokens=200)) for i in range(4))
        )
        assert all(len(tokens(r)) == 200 for r in results)

        # The worker's own gauges, in a failure message: they tell a stat logger vLLM never called
        # from a publisher that did not publish.
        def gauges() -> list[str]:
            return [
                line
                for line in deployment.metrics_text().splitlines()
                if line.startswith("dynamo_component_engine_") or "kvstats" in line
            ]

        busy = await load.wait_for(lambda e: e["worker_stats"]["request_active_slots"] > 0, diagnose=gauges)
        assert busy[0]["instance_id"] == record.instance_id and busy[0]["dp_rank"] == 0
        assert busy[0]["kv_stats"]["kv_active_blocks"] > 0
        # The last message says the engine is idle again (published within the throttle interval).
        for _ in range(100):
            if load.items[-1]["worker_stats"]["request_active_slots"] == 0:
                break
            await asyncio.sleep(0.05)
        last = load.items[-1]
        assert last["worker_stats"]["request_active_slots"] == 0, load.items[-3:]
        assert last["worker_stats"]["num_requests_waiting"] == 0 and last["kv_stats"]["kv_active_blocks"] == 0
        assert last["kv_stats"]["kv_total_blocks"] > 0 and last["worker_stats"]["request_total_slots"] == 16
        # Published on change only: no two consecutive messages say the same.
        assert all(a != b for a, b in zip(load.items, load.items[1:]))
    finally:
        await rt.close()
    samples = {s.name: s.value for f in text_string_to_metric_families(deployment.metrics_text()) for s in f.samples}
    assert samples["dynamo_component_engine_requests_running"] == 0
    assert samples["dynamo_component_kvstats_total_blocks"] == last["kv_stats"]["kv_total_blocks"]


# ---- KV events --------------------------------------------------------------------------------------


def stored(events: Events, instance_id: str) -> list[dict[str, Any]]:
    return [
        ev for e in events.items if e["instance_id"] == instance_id for ev in e["events"] if ev["type"] == "BlockStored"
    ]


async def test_kv_events_report_stored_blocks_whose_hashes_repeat_for_a_repeated_prefix(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        [record] = await rt.client("backend", "generate").wait_for_instances(10)
        events = await Events().subscribe(rt, "kv_events")
        prompt = unique_prompt(70, 7)  # two full 32-token blocks, and 6 tokens more
        await generate(rt, greedy(prompt, max_tokens=2))
        await events.wait_for(lambda e: any(ev["type"] == "BlockStored" for ev in e["events"]))
        [first] = stored(events, record.instance_id)
        assert len(first["block_hashes"]) == 2 and first["parent_block_hash"] is None
        assert first["token_ids"] == prompt[: 2 * BLOCK] and first["block_size"] == BLOCK
        hash1, hash2 = first["block_hashes"]

        # The same prompt again is served from the cache and stores nothing new.
        again = await generate(rt, greedy(prompt, max_tokens=2))
        assert again[-1]["completion_usage"]["prompt_tokens_details"]["cached_tokens"] == 2 * BLOCK
        # A prompt sharing the first block stores only its own second block, under the same parent.
        sharing = prompt[:BLOCK] + unique_prompt(38, 8)[1:] + [5]
        await generate(rt, greedy(sharing, max_tokens=2))
        await events.wait_for(lambda e: len(stored(events, record.instance_id)) > 1)
        assert len(stored(events, record.instance_id)) == 2  # nothing came from the repeat
        second = stored(events, record.instance_id)[1]
        assert second["parent_block_hash"] == hash1
        assert len(second["block_hashes"]) == 1 and second["block_hashes"][0] not in (hash1, hash2)

        # clear_kv_blocks empties the cache: the next engine step reports it.
        cleared = [x async for x in rt.client("backend", "clear_kv_blocks").generate({})]
        assert cleared == [{"status": "success", "message": "KV cache cleared"}]
        await generate(rt, greedy([0, 5, 6], max_tokens=1))
        await events.wait_for(lambda e: any(ev["type"] == "AllBlocksCleared" for ev in e["events"]))
        # The prompt stores its blocks again, under the same hashes as before.
        await generate(rt, greedy(prompt, max_tokens=2))
        await events.wait_for(lambda e: len(stored(events, record.instance_id)) > 2)
        assert stored(events, record.instance_id)[2]["block_hashes"] == [hash1, hash2]
        seqs = [e["seq"] for e in events.items]
        assert seqs == sorted(seqs)
    finally:
        await rt.close()


class Consumer:
    """A router's view of one worker, written from the event format alone: every relayed batch
    applied in order (independent of the worker's own bookkeeping, which it checks)."""

    def __init__(self) -> None:
        self.blocks: dict[int, tuple[Any, ...]] = {}  # hash -> (parent, token ids, lora_name, extra key)

    def apply(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            if ev["type"] == "BlockStored":
                size, parent, extra = ev["block_size"], ev["parent_block_hash"], ev.get("extra_keys")
                for i, h in enumerate(ev["block_hashes"]):
                    self.blocks[h] = (
                        parent,
                        ev["token_ids"][i * size : (i + 1) * size],
                        ev["lora_name"],
                        None if extra is None else extra[i],
                    )
                    parent = h
            elif ev["type"] == "BlockRemoved":
                for h in ev["block_hashes"]:
                    self.blocks.pop(h, None)
            elif ev["type"] == "AllBlocksCleared":
                self.blocks = {}


def held(messages: list[dict[str, Any]]) -> dict[int, tuple[Any, ...]]:
    """The blocks of a kv_blocks answer, keyed as :class:`Consumer` keys them."""
    out = {}
    for b in (b for m in messages for b in m["blocks"]):
        [h] = b["block_hashes"]
        out[h] = (
            b["parent_block_hash"],
            b["token_ids"],
            b["lora_name"],
            None if b["extra_keys"] is None else b["extra_keys"][0],
        )
    return out


async def kv_blocks(rt: Runtime, request: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    client = rt.client("backend", "kv_blocks")
    await client.wait_for_instances(10)
    return [m async for m in client.generate({} if request is None else request)]


async def clear_and_wait(rt: Runtime, events: Events, instance_id: str) -> int:
    """Reset the prefix cache; the seq of the batch that reports it."""
    before = len(events.items)
    cleared = [x async for x in rt.client("backend", "clear_kv_blocks").generate({})]
    assert cleared == [{"status": "success", "message": "KV cache cleared"}]
    await generate(rt, greedy([0, 5, 6], max_tokens=1))  # an engine step: it reports the reset
    for _ in range(200):
        found = [
            e["seq"]
            for e in events.items[before:]
            if e["instance_id"] == instance_id and any(ev["type"] == "AllBlocksCleared" for ev in e["events"])
        ]
        if found:
            return int(found[-1])
        await asyncio.sleep(0.05)
    raise AssertionError(f"no AllBlocksCleared after clear_kv_blocks: {events.items[before:]}")


async def settled(rt: Runtime, predicate: Any, timeout: float = 10) -> list[dict[str, Any]]:
    """kv_blocks once ``predicate(answer)`` holds (the last batches reach the relay after the
    request that made them has answered)."""
    for _ in range(int(timeout / 0.1)):
        answer = await kv_blocks(rt)
        if predicate(answer):
            return answer
        await asyncio.sleep(0.1)
    raise AssertionError(f"kv_blocks never settled: {answer}")


async def test_the_generate_record_tells_routers_the_kv_block_size_capacity_and_events(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        [record] = await rt.client("backend", "generate").wait_for_instances(10)
    finally:
        await rt.close()
    data = record.data
    assert data["kv_block_size"] == BLOCK and data["kv_events"] is True and data["data_parallel_size"] == 1
    samples = {s.name: s.value for f in text_string_to_metric_families(deployment.metrics_text()) for s in f.samples}
    assert data["kv_capacity_blocks"] == samples["dynamo_component_kvstats_total_blocks"] > 0
    # One data-parallel rank: lost batches can be replayed from vLLM's buffer, through a socket in
    # a directory of the worker's own.
    [replay] = deployment.tmp.glob("dw-kv-*/replay")
    assert replay.is_socket() and stat.S_IMODE(replay.parent.stat().st_mode) == 0o700
    assert "(lost batches replayed from vLLM)" in deployment.worker.log()


async def test_kv_blocks_hold_what_every_relayed_event_says_and_chain_back_to_the_prompts(
    deployment: Deployment,
) -> None:
    rt = await deployment.runtime()
    try:
        [record] = await rt.client("backend", "generate").wait_for_instances(10)
        events = await Events().subscribe(rt, "kv_events")
        # From an empty cache on, a consumer of the events holds exactly what they say.
        start = await clear_and_wait(rt, events, record.instance_id)
        empty = await settled(rt, lambda answer: answer[0]["seq"] >= start)
        assert empty == [{"dp_rank": 0, "seq": start, "block_size": BLOCK, "stale": False, "last": True, "blocks": []}]

        base = unique_prompt(70, 21)  # 2 full blocks
        prompts = [
            base,
            base[:BLOCK] + unique_prompt(40, 22),  # shares block 1, adds 1
            base[: 2 * BLOCK] + unique_prompt(44, 23),  # shares blocks 1-2, adds 1
            unique_prompt(100, 24),
        ]  # 3 of its own
        for prompt in prompts:
            await generate(rt, greedy(prompt, max_tokens=2))
        answer = await settled(rt, lambda answer: sum(len(m["blocks"]) for m in answer) == 7)
        [message] = answer
        assert (message["dp_rank"], message["block_size"], message["stale"], message["last"]) == (0, BLOCK, False, True)
        seq = message["seq"]
        await events.wait_for(lambda e: e["instance_id"] == record.instance_id and e["seq"] >= seq)
        batches = sorted(
            (e for e in events.items if e["instance_id"] == record.instance_id and start <= e["seq"] <= seq),
            key=lambda e: e["seq"],
        )
        assert [e["seq"] for e in batches] == list(range(start, seq + 1))  # every batch reached the test
        consumer = Consumer()
        for batch in batches:
            consumer.apply(batch["events"])
        assert held(answer) == consumer.blocks and len(consumer.blocks) == 7

        blocks = message["blocks"]
        seen: set[int] = set()
        for block in blocks:  # parents first
            assert block["parent_block_hash"] is None or block["parent_block_hash"] in seen
            assert block["type"] == "BlockStored" and block["block_size"] == BLOCK and block["medium"] == "GPU"
            seen.add(block["block_hashes"][0])
        for prompt in prompts:  # each prompt's full blocks, chained from its first
            parent = None
            for i in range(len(prompt) // BLOCK):
                [block] = [
                    b
                    for b in blocks
                    if b["parent_block_hash"] == parent and b["token_ids"] == prompt[i * BLOCK : (i + 1) * BLOCK]
                ]
                parent = block["block_hashes"][0]
        assert await kv_blocks(rt, {"dp_rank": 0}) == answer
        with pytest.raises(RequestError) as err:
            await kv_blocks(rt, {"dp_rank": 1})
        assert err.value.code == "bad_request" and "dp_rank must be one of [0]" in err.value.message

        # A prefix-cache reset empties it.
        cleared = await clear_and_wait(rt, events, record.instance_id)
        assert await settled(rt, lambda answer: answer[0]["seq"] >= cleared) == [
            {"dp_rank": 0, "seq": cleared, "block_size": BLOCK, "stale": False, "last": True, "blocks": []}
        ]
    finally:
        await rt.close()


def test_kv_event_ports_are_reserved_before_the_engine_starts() -> None:
    """The relay binds 127.0.0.1 ports itself (vLLM's publisher connects): a taken default moves on."""
    import types

    from dynamo_worker.core.errors import UsageError
    from dynamo_worker.engine.kv_events import KvEventRelay, KvEventsPlan

    with socket.socket() as taken:
        port = free_kv_event_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        args = types.SimpleNamespace(kv_events_config=types.SimpleNamespace(endpoint=f"tcp://127.0.0.1:{port}"))
        # The default port: the next free block of ports, one per data-parallel rank.
        relay = KvEventRelay(KvEventsPlan(port, 2, bind=True, explicit=False, may_move=True))
        try:
            relay.open(args)
            assert relay.plan.base >= port + 2 and relay.plan.ports == [relay.plan.base, relay.plan.base + 1]
            assert args.kv_events_config.endpoint == f"tcp://127.0.0.1:{relay.plan.base}"
        finally:
            relay.close()
        # A port the user chose is never replaced.
        relay = KvEventRelay(KvEventsPlan(port, 1, bind=True, explicit=True, may_move=False))
        with pytest.raises(UsageError, match=f"DYN_VLLM_KV_EVENT_PORT={port}: port {port} is in use"):
            relay.open(args)
        relay.close()


def test_a_kv_event_port_in_use_is_a_one_line_error_before_the_engine_starts(
    demo_model: str, nats_server: NatsServer
) -> None:
    with socket.socket() as taken:
        port = free_kv_event_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = run_cli(
            "--role",
            "decode",
            "--model",
            demo_model,
            "--nats-url",
            nats_server.url,
            *ENGINE_FLAGS,
            env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(port)),
            timeout=120,
        )
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith(f"dynamo-worker: error: DYN_VLLM_KV_EVENT_PORT={port}")
    assert "is in use" in last and "Traceback" not in out.stderr


def test_a_bad_kv_event_port_is_a_one_line_error(demo_model: str) -> None:
    for value, message in (("abc", "is not a port number"), ("49152", "out of range")):
        out = run_cli(
            "--role",
            "decode",
            "--model",
            demo_model,
            "--nats-url",
            "nats://127.0.0.1:1",
            env=worker_env(DYN_VLLM_KV_EVENT_PORT=value),
        )
        last = out.stderr.strip().splitlines()[-1]
        assert out.returncode == 2 and last.startswith("dynamo-worker: error: DYN_VLLM_KV_EVENT_PORT")
        assert message in last and "1024" in last and "Traceback" not in out.stderr


# ---- sleep and wake ------------------------------------------------------------------------------------


async def test_sleep_withdraws_the_worker_and_wake_up_brings_it_back(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        client = rt.client("backend", "generate")
        [record] = await client.wait_for_instances(10)
        before = tokens(await generate(rt, greedy(unique_prompt(12, 50), max_tokens=6)))

        status, body = deployment.post("/engine/sleep", b'{"level": 1}')
        assert status == 200 and body["status"] == "ok" and body["message"] == "Engine slept (level=1)"
        assert body["memory_freed"] is False and "no memory is freed" in body["note"]  # CPU: scheduling only
        await client.watcher.wait_for(lambda: not client.instances(), 10)
        assert client.instances() == []
        assert deployment.get("/engine/is_sleeping") == (200, {"is_sleeping": True, "level": 1})
        status, health = deployment.get("/health")
        assert status == 503 and health["reasons"] == ["the engine is asleep (level 1); POST /engine/wake_up"]
        assert health["phase"] == "serving"  # the process is fine: it is only withdrawn
        # A request that reaches the sleeping worker anyway is told to go elsewhere.
        with pytest.raises(RequestError) as err:
            [c async for c in client.direct(greedy([0, 5, 6]), record.instance_id)]
        assert err.value.code == "unavailable" and err.value.retryable
        assert deployment.post("/engine/sleep")[1]["message"] == "Engine already asleep (level=1)"

        status, body = deployment.post("/engine/wake_up")
        assert status == 200 and body["message"] == "Engine woke (tags=None)" and body["memory_freed"] is False
        await client.watcher.wait_for(lambda: len(client.instances()) == 1, 10)
        assert client.instances()[0].instance_id == record.instance_id
        assert deployment.get("/engine/is_sleeping") == (200, {"is_sleeping": False, "level": None})
        assert deployment.get("/health")[0] == 200
        assert tokens(await generate(rt, greedy(unique_prompt(12, 50), max_tokens=6))) == before
    finally:
        await rt.close()


def test_sleep_and_wake_reject_bad_bodies(deployment: Deployment) -> None:
    assert deployment.post("/engine/sleep", b'{"level": 7}') == (
        400,
        {"status": "error", "message": "level must be 0, 1 or 2 (got 7)"},
    )
    status, body = deployment.post("/engine/sleep", b"not json")
    assert status == 400 and "not JSON" in body["message"]
    status, body = deployment.post("/engine/wake_up", b'{"tags": "weights"}')
    assert status == 400 and "tags must be a list" in body["message"]
    assert deployment.get("/engine/is_sleeping")[1]["is_sleeping"] is False


def test_on_a_non_loopback_bind_sleep_and_wake_need_the_admin_token(deployment: Deployment) -> None:
    """The worker binds 0.0.0.0 with DYN_SYSTEM_ADMIN_TOKEN: a wrong or missing bearer is 401, a
    browser page of another origin is 403 even with it, and probes and scrapers need nothing.
    (Without a token such a bind answers 403: tests/test_health.py, on the same StatusServer.)"""
    json_only = {"Content-Type": "application/json"}
    for headers in (
        json_only,
        {**json_only, "Authorization": "Bearer admin-wrong"},
        {**json_only, "Authorization": f"Basic {ADMIN_TOKEN}"},
    ):
        for path in ("/engine/sleep", "/engine/wake_up"):
            status, body = deployment.post(path, b'{"level": 1}', headers=headers)
            assert status == 401 and "DYN_SYSTEM_ADMIN_TOKEN" in body["message"], (path, headers, body)
    status, body = deployment.post(
        "/engine/sleep", b'{"level": 1}', headers={**json_only, **ADMIN, "Origin": "http://evil.example"}
    )
    assert status == 403 and "Origin" in body["message"]
    assert deployment.get("/engine/is_sleeping") == (200, {"is_sleeping": False, "level": None})
    assert deployment.get("/live")[0] == 200 and deployment.get("/health")[0] == 200
    assert "dynamo_component_requests_total" in deployment.metrics_text()
    # The right token: an awake engine's wake_up is answered and changes nothing.
    status, body = deployment.post("/engine/wake_up", headers=ADMIN)
    assert status == 200 and body["message"] == "Engine is awake"
    assert deployment.get("/health")[0] == 200


def test_the_config_dump_hides_every_secret_and_only_the_secrets(deployment: Deployment, demo_model: str) -> None:
    text = deployment.dump.read_text()
    for secret in SECRETS:
        assert secret not in text
    assert stat.S_IMODE(os.stat(deployment.dump).st_mode) == 0o600
    assert os.listdir(deployment.dump.parent) == [deployment.dump.name]  # written in place, no temp left
    config = json.loads(text)
    options, engine = config["options"], config["resolved"]["engine_args"]
    assert options["nats_token"] == options["system_admin_token"] == options["request_plane_token"] == "***"
    assert engine["hf_token"] == "***"
    assert engine["tokenizer"] == demo_model and engine["max_num_batched_tokens"] == 2048
    assert engine["skip_tokenizer_init"] is False and engine["kv_cache_dtype"] == "auto"
    assert engine["enable_prefix_caching"] is True and options["system_host"] == "0.0.0.0"
    # Nor in the worker's log (vLLM logs its engine configuration there).
    log = deployment.worker.log()
    assert [s for s in SECRETS if s in log] == []


# ---- LoRA endpoints without --enable-lora ------------------------------------------------------------------


async def test_lora_endpoints_answer_a_clear_error_without_enable_lora(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        load = rt.client("backend", "load_lora")
        await load.wait_for_instances(10)
        [reply] = [x async for x in load.generate({"lora_name": "a", "source": {"uri": "/tmp"}})]
        assert reply["status"] == "error" and "--enable-lora" in reply["message"]
        [reply] = [x async for x in rt.client("backend", "list_loras").generate({})]
        assert reply["status"] == "error" and "--enable-lora" in reply["message"]
        with pytest.raises(RequestError) as err:
            await generate(rt, greedy([0, 5, 6], model="some-adapter"))
        assert err.value.code == "not_found" and "some-adapter" in err.value.message
        assert len(tokens(await generate(rt, greedy([0, 5, 6], max_tokens=2, model="tiny")))) == 2
    finally:
        await rt.close()
