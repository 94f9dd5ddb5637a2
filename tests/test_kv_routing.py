"""``--router-mode kv`` in the frontend: following the workers' events, load and discovery.

Workers here are runtimes in the test process on a real nats-server: each serves
``backend.generate`` and ``backend.kv_blocks`` (``prefill.*`` for a prefill worker) and publishes
``kv_events`` shaped as the workers relay them from vLLM (tests/test_decode_operations.py checks
that relay on a real engine).
So each behaviour can be driven exactly: which blocks a worker holds, a lost batch, a departure.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dynamo_worker.core.runtime import Runtime
from dynamo_worker.frontend.kv_routing import KV_EVENTS_TOPIC, KvRouting, predicted_cached_tokens
from tests.helpers import NatsServer

BLOCK = 4
ENGINE_BASE = {"a": 1_000, "b": 2_000}  # engine hashes differ per worker: the router must not rely on them


class FakeWorker:
    """A decode worker as the router sees it: discovery record, events, a block-set endpoint."""

    def __init__(self, rt: Runtime, name: str, component: str = "backend") -> None:
        self.rt = rt
        self.name = name
        self.component = component  # "prefill": a prefill worker of disaggregated serving
        self.served: list[dict[str, Any]] = []  # the generate requests it got
        self.seq = 0
        self.stored: list[dict[str, Any]] = []  # what kv_blocks answers
        self.snapshots_served = 0
        self.gate: asyncio.Event | None = None  # set: its first message waits for it (a long prefill)

    @property
    def instance_id(self) -> str:
        return self.rt.instance_id

    async def start(self, data: dict[str, Any] | None = None) -> None:
        async def generate(request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
            self.served.append(request)
            if self.gate is not None:
                await self.gate.wait()
            answer = {
                "token_ids": [1],
                "finish_reason": "length",
                "completion_usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            }
            if self.component == "prefill":  # what a prefill worker hands the decode worker
                answer["disaggregated_params"] = {"kv_transfer_params": {"prefilled_by": self.name}}
            yield answer

        async def kv_blocks(request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
            self.snapshots_served += 1
            yield {"dp_rank": 0, "seq": self.seq - 1, "block_size": BLOCK, "stale": False, "blocks": self.stored}

        role = "prefill" if self.component == "prefill" else "decode"
        await self.rt.serve_endpoint(self.component, "generate", generate)
        await self.rt.serve_endpoint(self.component, "kv_blocks", kv_blocks)
        await self.rt.publish(self.component, "kv_blocks", role, {})
        await self.rt.publish(
            self.component,
            "generate",
            role,
            {
                "model": "m",
                "model_path": "/m",
                "kv_block_size": BLOCK,
                "kv_capacity_blocks": 1000,
                "kv_events": True,
                **(data or {}),
            },
        )

    def store_event(self, tokens: list[int]) -> dict[str, Any]:
        """A BlockStored of ``tokens`` (whole blocks) chained onto the last block stored (the first
        one from the start of a prompt), as vLLM sends it."""
        blocks = len(tokens) // BLOCK
        held = sum(len(e["block_hashes"]) for e in self.stored)
        hashes = [ENGINE_BASE[self.name] + held + i for i in range(blocks)]
        parent = self.stored[-1]["block_hashes"][-1] if self.stored else None
        event = {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": tokens[: blocks * BLOCK],
            "block_size": BLOCK,
            "lora_name": None,
            "medium": "GPU",
        }
        self.stored.append(event)
        return event

    async def publish(self, events: list[dict[str, Any]], *, lose: bool = False) -> None:
        """Relay one batch (``lose``: it is numbered but never arrives, as a lost NATS message)."""
        message = {"instance_id": self.instance_id, "dp_rank": 0, "seq": self.seq, "ts": 0.0, "events": events}
        self.seq += 1
        if not lose:
            await self.rt.publish_event(KV_EVENTS_TOPIC, message)


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def cluster(nats_server: NatsServer, namespace: str) -> AsyncIterator[tuple[KvRouting, dict[str, FakeWorker]]]:
    workers = {name: FakeWorker(await Runtime.connect(nats_server.url, namespace), name) for name in ENGINE_BASE}
    for w in workers.values():
        await w.start()
    frontend = await Runtime.connect(nats_server.url, namespace)
    client = frontend.client("backend", "generate")
    kv = KvRouting(client)
    await kv.start()
    await client.wait_for_instances(5, count=2)
    try:
        yield kv, workers
    finally:
        await kv.stop()
        await frontend.close()
        for w in workers.values():
            await w.rt.close()


def pick(kv: KvRouting, tokens: list[int], request_id: str) -> str:
    record, rank = kv.choose(
        kv.client.instances(), {"model": "m", "token_ids": tokens, "stop_conditions": {"max_tokens": 4}}, request_id
    )
    assert rank == 0
    return record.instance_id


PREFIX = list(range(100, 132))  # 8 blocks


async def test_a_request_goes_to_the_worker_holding_its_prefix(cluster: Any) -> None:
    kv, w = cluster
    await w["b"].publish([w["b"].store_event(PREFIX)])
    await eventually(lambda: kv.index.block_count == 8)
    # b has the whole prefix: its cost is far below a's even with a's load lighter.
    assert pick(kv, PREFIX + [1, 2, 3, 4], "r1") == w["b"].instance_id
    kv.finished("r1")
    # A prompt b does not hold (a different first block) has no overlap anywhere: least load wins.
    other = [7, 7, 7, 7] + PREFIX[4:]
    kv.load.start("busy", (w["b"].instance_id, 0), 50)
    assert pick(kv, other, "r2") == w["a"].instance_id
    kv.finished("r2", cached_tokens=0)
    assert kv.metrics.prediction_misses._value.get() == 0


async def test_a_request_behind_one_in_flight_with_its_prefix_is_sent_there_and_predicted_to_hit_it(
    cluster: Any,
) -> None:
    """A tenant's second request, routed while its first is in flight and before that one's
    BlockStored arrived: the engine (in arrival order) will have stored the prefix first, so the
    router sends it there and predicts the hit (before: predicted nothing and, the first worker
    being the busier, sent it to the other one; the benchmark's misses with actual > predicted)."""
    kv, w = cluster
    first = pick(kv, PREFIX + [1, 2, 3, 4], "r1")  # no events yet: nothing indexed anywhere
    assert kv.index.block_count == 0
    assert pick(kv, PREFIX + [5, 6, 7, 8], "r2") == first
    kv.finished("r2", cached_tokens=32)  # the engine hit the 8 blocks r1 stored
    kv.finished("r1", cached_tokens=0)
    assert kv.metrics.predicted_tokens._value.get() == 32
    assert kv.metrics.prediction_misses._value.get() == 0
    # Finished, r1 no longer vouches for its prefix: only the index (no events here) would.
    other = next(x for x in w.values() if x.instance_id != first)
    kv.load.start("busy", (first, 0), 50)
    assert pick(kv, PREFIX + [9, 9, 9, 9], "r3") == other.instance_id


async def test_a_prompt_held_whole_is_predicted_without_its_last_block(cluster: Any) -> None:
    """vLLM never counts a prompt's last token as cached (it computes it to sample): a prompt of
    whole blocks held whole hits one block less, and the prediction says so."""
    kv, w = cluster
    await w["b"].publish([w["b"].store_event(PREFIX)])
    await eventually(lambda: kv.index.block_count == 8)
    assert pick(kv, PREFIX, "whole") == w["b"].instance_id
    kv.finished("whole", cached_tokens=len(PREFIX) - BLOCK)
    assert pick(kv, PREFIX + [1], "longer") == w["b"].instance_id  # one token more: all 8 blocks count
    kv.finished("longer", cached_tokens=len(PREFIX))
    assert kv.metrics.predicted_tokens._value.get() == 2 * len(PREFIX) - BLOCK
    assert kv.metrics.prediction_misses._value.get() == 0


def test_the_predicted_cached_tokens_follow_the_engines_rule() -> None:
    assert predicted_cached_tokens(8, 32, 4) == 28  # held whole: the last block holds the last token
    assert predicted_cached_tokens(8, 33, 4) == 32
    assert predicted_cached_tokens(3, 32, 4) == 12
    assert predicted_cached_tokens(0, 1, 4) == predicted_cached_tokens(1, 0, 4) == 0


async def test_the_prediction_log_has_a_line_per_request_with_the_engines_answer(cluster: Any, tmp_path: Any) -> None:
    kv, w = cluster
    await w["b"].publish([w["b"].store_event(PREFIX)])
    await eventually(lambda: kv.index.block_count == 8)
    kv._prediction_log = str(tmp_path / "predictions.jsonl")  # as DYN_KV_PREDICTION_LOG at start
    pick(kv, PREFIX + [1, 2, 3, 4], "r1")
    # Evicted while the request waits (its last 4 blocks), then stored again when it runs.
    stored = w["b"].stored[0]
    await w["b"].publish([{"type": "BlockRemoved", "block_hashes": stored["block_hashes"][4:], "medium": "GPU"}])
    await eventually(lambda: kv.index.block_count == 4)
    w["b"].stored.clear()
    await w["b"].publish([w["b"].store_event(PREFIX)])
    await eventually(lambda: kv.index.block_count == 8)
    kv.finished("r1", cached_tokens=16)
    (line,) = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert line["worker"] == [w["b"].instance_id, 0] and line["request"] == "r1"
    assert (line["predicted_tokens"], line["cached_tokens"], line["indexed_blocks"]) == (32, 16, 8)
    assert (line["in_flight_blocks"], line["in_flight_requests"], line["indexed_blocks_at_finish"]) == (0, 0, 8)
    assert line["min_indexed_blocks"] == 4 and line["min_indexed_after_s"] >= 0


async def test_removed_and_cleared_blocks_stop_attracting_requests(cluster: Any) -> None:
    kv, w = cluster
    event = w["a"].store_event(PREFIX)
    await w["a"].publish([event])
    await eventually(lambda: kv.index.block_count == 8)
    await w["a"].publish([{"type": "BlockRemoved", "block_hashes": event["block_hashes"][4:], "medium": "GPU"}])
    await eventually(lambda: kv.index.block_count == 4)
    await w["a"].publish([{"type": "AllBlocksCleared"}])
    await eventually(lambda: kv.index.block_count == 0)


async def test_a_lost_batch_makes_the_router_fetch_the_workers_block_set(cluster: Any) -> None:
    kv, w = cluster
    await w["a"].publish([w["a"].store_event(PREFIX[:16])])
    await eventually(lambda: kv.index.block_count == 4)
    await w["a"].publish([w["a"].store_event(PREFIX[16:])], lose=True)  # blocks 5-8: never arrive
    assert w["a"].snapshots_served == 0
    await w["a"].publish([])  # the next batch shows the gap
    await eventually(lambda: w["a"].snapshots_served == 1 and kv.index.block_count == 8)
    assert kv.metrics.event_gaps._value.get() == 1
    assert pick(kv, PREFIX, "r") == w["a"].instance_id
    # And the stream goes on from the snapshot's seq without another fetch.
    await w["a"].publish([])
    await asyncio.sleep(0.2)
    assert w["a"].snapshots_served == 1


async def test_a_restarted_frontend_rebuilds_from_the_workers(
    cluster: Any, nats_server: NatsServer, namespace: str
) -> None:
    kv, w = cluster
    await w["b"].publish([w["b"].store_event(PREFIX)])
    await eventually(lambda: kv.index.block_count == 8)
    late = await Runtime.connect(nats_server.url, namespace)
    try:
        fresh = KvRouting(late.client("backend", "generate"))
        await fresh.start()
        await fresh.client.wait_for_instances(5, count=2)
        await w["b"].publish([])  # its first batch is not seq 0: what came before is unknown
        await eventually(lambda: fresh.index.block_count == 8)
        assert pick(fresh, PREFIX, "r") == w["b"].instance_id  # both frontends route alike
        assert pick(kv, PREFIX, "r") == w["b"].instance_id
        await fresh.stop()
    finally:
        await late.close()


async def test_an_instance_that_leaves_discovery_is_purged_at_once(cluster: Any) -> None:
    kv, w = cluster
    await w["a"].publish([w["a"].store_event(PREFIX)])
    await eventually(lambda: kv.index.block_count == 8)
    await w["a"].rt.withdraw()
    await eventually(lambda: kv.index.block_count == 0)
    # A late batch of the departed instance does not bring it back.
    await w["a"].publish([w["a"].store_event(PREFIX + [9, 9, 9, 9])])
    await asyncio.sleep(0.2)
    assert kv.index.block_count == 0


@pytest.mark.parametrize("other_frontends", [False, True], ids=["alone", "beside-another-frontend"])
async def test_a_prefix_the_request_before_will_evict_is_not_predicted_unless_another_frontend_runs_there(
    nats_server: NatsServer, namespace: str, other_frontends: bool
) -> None:
    """b, 13 blocks (12 usable), holds PREFIX (8 blocks) free after r1 ran there; r2, a cold
    prompt of 10 blocks and its first decode token's block, is routed there next: it takes the 4
    never-used blocks and 7 of PREFIX's, the last first (kv_forecast). So r3, routed before any
    BlockRemoved arrives, is predicted only PREFIX's first block there. Beside another frontend
    (b publishes more blocks in use than this router's requests) the forecast cannot see the
    blocks the other keeps warm: r3 is predicted what the index holds, as before the forecast."""
    b = FakeWorker(await Runtime.connect(nats_server.url, namespace), "b")
    await b.start({"kv_capacity_blocks": 13})
    frontend = await Runtime.connect(nats_server.url, namespace)
    client = frontend.client("backend", "generate")
    kv = KvRouting(client)
    await kv.start()
    try:
        await client.wait_for_instances(5, count=1)
        await b.publish([b.store_event(PREFIX)])
        await eventually(lambda: kv.index.block_count == 8)
        worker = (b.instance_id, 0)
        assert pick(kv, PREFIX + [1, 2, 3, 4], "r1") == b.instance_id
        kv.finished("r1", cached_tokens=len(PREFIX))
        pick(kv, list(range(500, 540)), "r2")
        assert kv.forecast is not None and kv.forecast.doomed(worker) == 7
        foreign = 20 if other_frontends else 0
        kv.load.apply_load_metrics(
            {
                "instance_id": b.instance_id,
                "dp_rank": 0,
                "kv_stats": {"kv_active_blocks": kv.load.tracked_blocks(worker) + foreign, "kv_total_blocks": 13},
            }
        )
        pick(kv, PREFIX + [5, 6, 7, 8], "r3")
        assert kv._predicted["r3"] == (len(PREFIX) if other_frontends else BLOCK)
    finally:
        await kv.stop()
        await frontend.close()
        await b.rt.close()


@pytest.mark.parametrize("eviction", ["lru", "active-inactive"])
async def test_the_forecast_evicts_as_the_worker_says_in_discovery_it_does(
    nats_server: NatsServer, namespace: str, eviction: str
) -> None:
    """b, 21 blocks (20 usable), publishes ``kv_eviction``. r0 (a cold one-off, 8 blocks) and r1
    (PREFIX's 8 blocks hit, and a block more) run there; r1 ends first, then r0. r2, cold, 10
    blocks and its first decode token's, takes the 4 unknown blocks and 7 known ones. vLLM's LRU
    takes PREFIX's (freed before r0's); with the two lists PREFIX, which r1 reused, is active and
    r0's blocks go first. So r3 is predicted PREFIX's first block, or all of PREFIX."""
    b = FakeWorker(await Runtime.connect(nats_server.url, namespace), "b")
    await b.start({"kv_capacity_blocks": 21, "kv_eviction": eviction})
    frontend = await Runtime.connect(nats_server.url, namespace)
    client = frontend.client("backend", "generate")
    kv = KvRouting(client)
    await kv.start()
    one_off = list(range(600, 632))
    try:
        await client.wait_for_instances(5, count=1)
        await b.publish([b.store_event(PREFIX)])
        await eventually(lambda: kv.index.block_count == 8)
        pick(kv, one_off, "r0")
        stored = b.store_event(one_off)
        stored["parent_block_hash"] = None  # a prompt of its own, not PREFIX's continuation
        await b.publish([stored])
        await eventually(lambda: kv.index.block_count == 16)
        pick(kv, PREFIX + [1, 2, 3, 4], "r1")
        kv.finished("r1", cached_tokens=len(PREFIX))
        kv.finished("r0", cached_tokens=0)
        pick(kv, list(range(500, 540)), "r2")
        assert kv.forecast is not None and kv.forecast.doomed((b.instance_id, 0)) == 7
        pick(kv, PREFIX + [5, 6, 7, 8], "r3")
        assert kv._predicted["r3"] == (BLOCK if eviction == "lru" else len(PREFIX))
    finally:
        await kv.stop()
        await frontend.close()
        await b.rt.close()


async def test_a_hot_prefix_spreads_over_the_workers_as_their_load_grows(cluster: Any) -> None:
    kv, w = cluster
    await w["a"].publish([w["a"].store_event(PREFIX)])
    await eventually(lambda: kv.index.block_count == 8)
    chosen = [pick(kv, PREFIX + [i] * 4, f"r{i}") for i in range(20)]  # none finishes
    counts = {name: chosen.count(worker.instance_id) for name, worker in w.items()}
    assert counts["a"] >= 1 and counts["b"] >= 1
    assert max(counts.values()) <= 1.5 * min(counts.values()) + 1, counts


async def test_a_worker_without_events_is_routed_by_load_and_said_once(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="dynamo_worker.frontend.kv_routing")
    worker = FakeWorker(await Runtime.connect(nats_server.url, namespace), "a")
    await worker.start({"kv_events": False})
    frontend = await Runtime.connect(nats_server.url, namespace)
    try:
        kv = KvRouting(frontend.client("backend", "generate"))
        await kv.start()
        await kv.client.wait_for_instances(5)
        for i in range(3):
            assert pick(kv, PREFIX, f"r{i}") == worker.instance_id
        said = [r for r in caplog.records if "publishes no KV events" in r.getMessage()]
        assert len(said) == 1
        await kv.stop()
    finally:
        await frontend.close()
        await worker.rt.close()


async def test_approximate_mode_follows_its_own_decisions(nats_server: NatsServer, namespace: str) -> None:
    workers = [FakeWorker(await Runtime.connect(nats_server.url, namespace), name) for name in ENGINE_BASE]
    for w in workers:
        await w.start({"kv_events": False})
    frontend = await Runtime.connect(nats_server.url, namespace)
    try:
        kv = KvRouting(frontend.client("backend", "generate"), use_events=False)
        await kv.start()
        await kv.client.wait_for_instances(5, count=2)
        first = pick(kv, PREFIX, "r1")
        kv.finished("r1")
        for i in range(5):  # no events at all: the router's own record sends the prefix back
            assert pick(kv, PREFIX + [i] * 4, f"s{i}") == first
            kv.finished(f"s{i}")
        assert kv.index.block_count >= 8
        await kv.stop()
    finally:
        await frontend.close()
        for w in workers:
            await w.rt.close()


async def test_prefill_workers_are_chosen_by_their_cached_prefix_too(nats_server: NatsServer, namespace: str) -> None:
    """Disaggregated serving with ``--router-mode kv``: the frontend prefills each request on the
    prefill worker holding its prefix (their own KV events), not by turns."""
    from dynamo_worker.frontend.app import FrontendServer

    decode = [FakeWorker(await Runtime.connect(nats_server.url, namespace), name) for name in ENGINE_BASE]
    prefill = {
        name: FakeWorker(await Runtime.connect(nats_server.url, namespace), name, "prefill") for name in ENGINE_BASE
    }
    for w in [*decode, *prefill.values()]:
        await w.start()
    frontend = await Runtime.connect(nats_server.url, namespace)
    server = FrontendServer(
        frontend.client("backend", "generate"), router_mode="kv", prefill_client=frontend.client("prefill", "generate")
    )
    try:
        await server.start()
        assert server.prefill_kv is not None
        await server.prefill_kv.client.wait_for_instances(5, count=2)
        await server.kv.client.wait_for_instances(5, count=2)  # type: ignore[union-attr]
        await prefill["b"].publish([prefill["b"].store_event(PREFIX)])
        await eventually(lambda: server.prefill_kv.index.block_count == 8)  # type: ignore[union-attr]
        assert server.kv.index.block_count == 0  # type: ignore[union-attr]  # not a decode worker's blocks

        async def send(tokens: list[int]) -> dict[str, Any]:
            payload = {"model": "m", "token_ids": tokens, "stop_conditions": {"max_tokens": 1}}
            return [item async for item in server.router.generate("m", payload)][-1]

        for turn in range(6):  # each finishes before the next: only the prefix decides
            await send(PREFIX + [turn] * BLOCK)
        assert (len(prefill["b"].served), len(prefill["a"].served)) == (6, 0)
        # The decode workers got the holder's transfer parameters.
        decoded = [r for w in decode for r in w.served]
        assert len(decoded) == 6
        assert {r["prefill_result"]["disaggregated_params"]["kv_transfer_params"]["prefilled_by"] for r in decoded} == {
            "b"
        }
        # A prompt nobody holds goes to the prefill worker with the lighter load.
        server.prefill_kv.load.start("elsewhere", (prefill["b"].instance_id, 0), 50)
        await send([5] * (4 * BLOCK))
        assert len(prefill["a"].served) == 1
        server.prefill_kv.finished("elsewhere")
        assert server.prefill_kv.metrics.routed.labels(prefill["b"].instance_id, "0")._value.get() == 6
    finally:
        await server.stop()
        await frontend.close()
        for w in [*decode, *prefill.values()]:
            await w.rt.close()


async def test_a_requests_prefill_queues_on_its_worker_until_its_first_message(
    nats_server: NatsServer, namespace: str
) -> None:
    """The frontend counts a request's uncached prompt blocks as prefill queued on its worker
    (``--kv-prefill-queue``) from the routing decision to the worker's first message."""
    from dynamo_worker.frontend.app import FrontendServer

    workers = [FakeWorker(await Runtime.connect(nats_server.url, namespace), name) for name in ENGINE_BASE]
    gate = asyncio.Event()
    for w in workers:
        w.gate = gate
        await w.start()
    frontend = await Runtime.connect(nats_server.url, namespace)
    server = FrontendServer(frontend.client("backend", "generate"), router_mode="kv", kv={"prefill_queue": True})
    try:
        await server.start()
        kv = server.kv
        assert kv is not None and kv.selector.prefill_queue
        await kv.client.wait_for_instances(5, count=2)
        payload = {"model": "m", "token_ids": PREFIX + [1, 2], "stop_conditions": {"max_tokens": 1}}
        stream = server.router.generate("m", payload)
        first = asyncio.ensure_future(anext(stream))
        await eventually(lambda: sum(len(w.served) for w in workers) == 1)
        (chosen,) = [w for w in workers if w.served]
        key = (chosen.instance_id, 0)
        assert kv.load.queued_prefill(key) == 8  # nothing cached: its 8 full blocks to compute
        gate.set()
        await first
        assert kv.load.queued_prefill(key) == 0 and kv.load.in_flight(key) == 1  # prefilled, still running
        await stream.aclose()
        assert kv.load.in_flight(key) == 0
    finally:
        await server.stop()
        await frontend.close()
        for w in workers:
            await w.rt.close()
