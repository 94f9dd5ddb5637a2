"""The KV-event relay's own view of the engine's cache (``dynamo_worker.engine.kv_events``): no engine.

Block bookkeeping is fed synthetic vLLM-shaped events from :class:`ToyEngine`, a prefix cache
with LRU eviction and resets that reports what vLLM's block pool reports, so the view can be
compared with the cache itself after every batch. The relay's gap handling runs against vLLM's
own ``ZmqEventPublisher`` (its replay buffer and socket), in this process.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import types
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from dynamo_worker.core import wire
from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.engine import kv_events
from dynamo_worker.engine.kv_events import (
    ENVELOPE_BYTES,
    KvBlockView,
    KvEventRelay,
    KvEventsPlan,
    block_event,
    parent_first,
    snapshot_messages,
)
from tests.helpers import free_kv_event_port

BS = 4  # block size: small prompts span several blocks


def engine_hash(parent: int | None, block: Sequence[int], lora: str | None) -> int:
    data = repr((parent, tuple(block), lora)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class ToyEngine:
    """A prefix cache of ``capacity`` blocks, LRU-evicted, reporting events as vLLM's block pool
    does: the removals of the blocks a request's allocation evicts, then one ``BlockStored`` of its
    new full blocks chained onto its cached prefix; ``AllBlocksCleared`` after a reset."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.cached: OrderedDict[int, tuple[int, ...]] = OrderedDict()  # hash -> the tokens up to its end

    def run(self, prompt: Sequence[int], lora: str | None = None) -> list[dict[str, Any]]:
        full = len(prompt) // BS
        hashes: list[int] = []
        parent = None
        for i in range(full):
            parent = engine_hash(parent, prompt[i * BS : (i + 1) * BS], lora)
            hashes.append(parent)
        hit = 0
        while hit < full and hashes[hit] in self.cached:
            self.cached.move_to_end(hashes[hit])
            hit += 1
        events: list[dict[str, Any]] = []
        new = hashes[hit:]
        for i, h in enumerate(new, start=hit):
            if h in self.cached:  # cached past the first miss (its parent was evicted): reported again
                self.cached.move_to_end(h)
                continue
            if len(self.cached) >= self.capacity:
                victim = next(v for v in self.cached if v not in hashes)  # not this request's own
                del self.cached[victim]
                events.append({"type": "BlockRemoved", "block_hashes": [victim], "medium": "GPU", "group_idx": 0})
            self.cached[h] = tuple(prompt[: (i + 1) * BS])
        if new:
            events.append(
                {
                    "type": "BlockStored",
                    "block_hashes": new,
                    "parent_block_hash": hashes[hit - 1] if hit else None,
                    "token_ids": list(prompt[hit * BS : full * BS]),
                    "block_size": BS,
                    "lora_id": 1 if lora else None,
                    "medium": "GPU",
                    "lora_name": lora,
                    "extra_keys": [[lora]] * len(new) if lora else None,
                    "group_idx": 0,
                    "kv_cache_spec_kind": "full_attention",
                    "session_id": "user-7",
                }
            )
        return events

    def reset(self) -> list[dict[str, Any]]:
        self.cached.clear()
        return [{"type": "AllBlocksCleared"}]


def chained_tokens(blocks: dict[Any, dict[str, Any]], block_hash: Any) -> tuple[int, ...] | None:
    """A block's whole prefix, through its parents in the snapshot; None if one is missing."""
    out: list[int] = []
    while block_hash is not None:
        block = blocks.get(block_hash)
        if block is None:
            return None
        out[:0] = block["token_ids"]
        block_hash = block["parent_block_hash"]
    return tuple(out)


def all_blocks(view: KvBlockView, limit: int = 1 << 20) -> list[dict[str, Any]]:
    snapshot = view.snapshot()
    messages = list(snapshot_messages(snapshot, parent_first(snapshot.blocks), BS, limit))
    return [block for m in messages for block in m["blocks"]]


def test_the_view_holds_exactly_the_engines_cache_through_evictions_and_resets() -> None:
    rng = random.Random(17)
    engine = ToyEngine(capacity=24)
    view = KvBlockView(0, capacity=24)
    prefixes = [[rng.randrange(1, 500) for _ in range(rng.choice((4, 8, 12)))] for _ in range(5)]
    orphans_seen = 0
    for seq in range(400):
        if rng.random() < 0.02:
            events = engine.reset()
        else:
            prompt = rng.choice(prefixes) + [rng.randrange(1, 500) for _ in range(rng.randrange(0, 14))]
            events = engine.run(prompt, lora=rng.choice((None, None, "sql")))
        view.apply(seq, events)
        assert view.seq == seq and not view.stale
        assert {key[2] for key in view.blocks} == set(engine.cached)
        assert view.gpu_blocks == len(view.blocks) <= engine.capacity
        blocks = all_blocks(view)
        by_hash = {b["block_hashes"][0]: b for b in blocks}
        assert len(by_hash) == len(blocks) == len(engine.cached)
        seen: set[int] = set()
        for block in blocks:  # parents first, whenever the parent is held
            parent = block["parent_block_hash"]
            assert parent is None or parent not in by_hash or parent in seen
            seen.add(block["block_hashes"][0])
            assert "session_id" not in block and block["kv_cache_spec_kind"] == "full_attention"
        for h, prefix in engine.cached.items():
            tokens = chained_tokens(by_hash, h)
            if tokens is None:  # an ancestor was evicted while this block stayed
                orphans_seen += 1
            else:
                assert tokens == prefix
            lora = by_hash[h]["lora_name"]
            assert by_hash[h]["extra_keys"] == ([[lora]] if lora else None)
    assert orphans_seen > 0  # the walk above met blocks whose parent was gone


def test_a_multi_block_store_is_split_and_a_restore_replaces_its_entry() -> None:
    view = KvBlockView(0, capacity=10)
    store = {
        "type": "BlockStored",
        "block_hashes": [11, 12, 13],
        "parent_block_hash": 10,
        "token_ids": list(range(12)),
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None, ["salt"], None],
        "group_idx": 0,
    }
    view.apply(0, [store])
    assert [(k, b.parent, b.tokens.tolist(), b.extra) for k, b in view.blocks.items()] == [
        (("GPU", 0, 11), 10, [0, 1, 2, 3], (None,)),
        (("GPU", 0, 12), 11, [4, 5, 6, 7], (["salt"],)),
        (("GPU", 0, 13), 12, [8, 9, 10, 11], (None,)),
    ]
    assert block_event(("GPU", 0, 12), view.blocks[("GPU", 0, 12)]) == {
        "type": "BlockStored",
        "block_hashes": [12],
        "parent_block_hash": 11,
        "token_ids": [4, 5, 6, 7],
        "block_size": BS,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [["salt"]],
        "group_idx": 0,
    }
    # vLLM's "full" report mode stores cached blocks again: still one entry each.
    view.apply(1, [{**store, "block_hashes": [11], "token_ids": list(range(4)), "extra_keys": [None]}])
    assert len(view) == view.gpu_blocks == 3
    # The same hash in another KV group or an offload tier is another block; removals name theirs.
    view.apply(
        2,
        [
            {**store, "block_hashes": [11], "token_ids": list(range(4)), "extra_keys": None, "group_idx": 1},
            {**store, "block_hashes": [11], "token_ids": list(range(4)), "extra_keys": None, "medium": "CPU"},
        ],
    )
    assert len(view) == 5 and view.gpu_blocks == 4  # the CPU tier is not the engine's capacity
    view.apply(
        3,
        [
            {"type": "BlockRemoved", "block_hashes": [11], "medium": "GPU", "group_idx": 1},
            {"type": "BlockRemoved", "block_hashes": [99], "medium": "GPU", "group_idx": 0},
        ],
    )
    assert ("GPU", 0, 11) in view.blocks and ("GPU", 1, 11) not in view.blocks
    assert view.unknown_removals == 1 and not view.stale  # counted and logged; the view is not wrong for it
    view.apply(4, [{"type": "AllBlocksCleared"}])
    assert len(view) == view.gpu_blocks == 0 and view.seq == 4


def test_more_blocks_than_the_engine_holds_marks_the_view_stale_and_keeps_it_bounded() -> None:
    engine = ToyEngine(capacity=3)
    view = KvBlockView(0, capacity=3)
    view.apply(0, engine.run(list(range(1, 13))))  # 3 blocks: full
    assert len(view) == 3 and not view.stale
    lost = engine.run(list(range(100, 108)))  # evicts 2, stores 2: the removals get lost
    view.apply(1, [e for e in lost if e["type"] == "BlockStored"])
    assert view.stale and "more than the engine's 3 KV blocks" in view.stale_reason
    assert len(view) == 3  # the store was refused: memory stays bounded by the capacity
    assert view.snapshot().stale
    view.apply(2, engine.reset() + engine.run(list(range(200, 208))))  # a prefix-cache reset: exact again
    assert not view.stale and {k[2] for k in view.blocks} == set(engine.cached) and len(view) == 2


def test_a_store_whose_tokens_do_not_split_into_its_blocks_marks_the_view_stale() -> None:
    view = KvBlockView(0, capacity=10)
    # A sliding-window group skips blocks in block_hashes but not in token_ids.
    view.apply(
        0,
        [
            {
                "type": "BlockStored",
                "block_hashes": [1, 2],
                "parent_block_hash": None,
                "token_ids": list(range(12)),
                "block_size": BS,
                "medium": "GPU",
                "group_idx": 1,
            }
        ],
    )
    assert view.stale and len(view) == 0 and "cannot be told apart" in view.stale_reason


def test_parent_first_puts_a_restored_parent_before_its_children_and_keeps_orphans() -> None:
    view = KvBlockView(0)
    stored = {"type": "BlockStored", "block_size": BS, "medium": "GPU", "group_idx": 0}
    view.apply(
        0,
        [
            {**stored, "block_hashes": [1, 2, 3], "parent_block_hash": None, "token_ids": list(range(12))},
            {"type": "BlockRemoved", "block_hashes": [1], "medium": "GPU", "group_idx": 0},
            {**stored, "block_hashes": [7], "parent_block_hash": 6, "token_ids": [9] * 4},
            {**stored, "block_hashes": [1], "parent_block_hash": None, "token_ids": [0, 1, 2, 3]},
        ],
    )
    assert [k[2] for k in view.blocks] == [2, 3, 7, 1]  # the parent came back after its children
    assert [k[2] for k in parent_first(view.blocks)] == [1, 2, 3, 7]  # 7's parent (6) is not held
    cycle = {
        ("GPU", 0, 1): view.blocks[("GPU", 0, 2)]._replace(parent=2),
        ("GPU", 0, 2): view.blocks[("GPU", 0, 2)]._replace(parent=1),
    }
    assert sorted(k[2] for k in parent_first(cycle)) == [1, 2]  # a hash cycle ends, each block once


def chain_view(rank: int, blocks: int, seq: int = 5) -> KvBlockView:
    """A view of ``blocks`` blocks in chains of 3, each block's tokens distinct."""
    view = KvBlockView(rank)
    events = []
    for start in range(0, blocks, 3):
        hashes = [1000 * rank + start + i for i in range(min(3, blocks - start))]
        events.append(
            {
                "type": "BlockStored",
                "block_hashes": hashes,
                "parent_block_hash": None,
                "token_ids": list(range(start * BS, (start + len(hashes)) * BS)),
                "block_size": BS,
                "lora_name": "a-rather-long-adapter-name",
                "medium": "GPU",
                "group_idx": 0,
                "extra_keys": [["a-rather-long-adapter-name"]] * len(hashes),
            }
        )
    view.apply(seq, events)
    return view


def test_kv_blocks_messages_fit_the_limit_and_carry_every_block_once_parents_first() -> None:
    view = chain_view(0, 50)
    snapshot = view.snapshot()
    order = parent_first(snapshot.blocks)
    expected = [block_event(key, snapshot.blocks[key]) for key in order]
    one_block = len(wire.encode(expected[-1]))
    for limit, max_blocks in ((ENVELOPE_BYTES + 4 * one_block, 1000), (1 << 20, 7), (1 << 20, 1000)):
        messages = list(snapshot_messages(snapshot, order, BS, limit, max_blocks))
        assert [b for m in messages for b in m["blocks"]] == expected
        assert [m["last"] for m in messages] == [False] * (len(messages) - 1) + [True]
        for m in messages:
            assert len(wire.encode(m)) <= limit - ENVELOPE_BYTES and 1 <= len(m["blocks"]) <= max_blocks
            assert (m["dp_rank"], m["seq"], m["block_size"], m["stale"]) == (0, 5, BS, False)
        # Filled up to the limit: a message and the next one's first block would not fit together.
        for m, nxt in zip(messages, messages[1:], strict=False):
            grown = {**m, "blocks": m["blocks"] + nxt["blocks"][:1]}
            assert len(m["blocks"]) == max_blocks or len(wire.encode(grown)) > limit - ENVELOPE_BYTES
        if max_blocks == 7:
            assert len(messages) == 8
        elif limit < 1 << 20:
            assert len(messages) >= 12
        else:
            assert len(messages) == 1
    # A block larger than the budget goes alone (the request plane then answers too_large for it).
    messages = list(snapshot_messages(snapshot, order, BS, ENVELOPE_BYTES + 10))
    assert [len(m["blocks"]) for m in messages] == [1] * 50
    # An empty view is one message with no blocks.
    assert list(snapshot_messages(KvBlockView(3).snapshot(), [], BS, 1 << 20)) == [
        {"dp_rank": 3, "seq": -1, "block_size": BS, "stale": False, "last": True, "blocks": []}
    ]


def relay_with(ranks: int) -> KvEventRelay:
    return KvEventRelay(KvEventsPlan(free_kv_event_port(ranks), ranks, bind=True, explicit=True, may_move=False))


async def ask(relay: KvEventRelay, request: Any) -> list[dict[str, Any]]:
    return [m async for m in relay.kv_blocks(request, RequestContext("r1", "kv_blocks", "i1"))]


async def test_the_kv_blocks_endpoint_answers_each_rank_in_chunks_within_the_plane_limit() -> None:
    relay = relay_with(2)
    try:
        relay.set_engine(BS, 1000)
        relay.views[0], relay.views[1] = chain_view(0, 40, seq=3), chain_view(1, 4, seq=9)
        limit = ENVELOPE_BYTES + 2500
        relay.max_message_bytes = lambda: limit
        messages = await ask(relay, {})
        assert [m["dp_rank"] for m in messages] == sorted(m["dp_rank"] for m in messages)
        for rank, seq, count in ((0, 3, 40), (1, 9, 4)):
            mine = [m for m in messages if m["dp_rank"] == rank]
            assert {m["seq"] for m in mine} == {seq} and mine[-1]["last"] and not any(m["last"] for m in mine[:-1])
            assert sum(len(m["blocks"]) for m in mine) == count
        assert len([m for m in messages if m["dp_rank"] == 0]) > 1
        assert all(len(wire.encode(m)) <= limit - ENVELOPE_BYTES for m in messages)
        assert {m["dp_rank"] for m in await ask(relay, {"dp_rank": 1})} == {1}
        for bad in ({"dp_rank": 2}, {"dp_rank": "0"}, {"dp_rank": True}, [], "x"):
            with pytest.raises(RequestError) as err:
                await ask(relay, bad)
            assert err.value.code == "bad_request"
    finally:
        relay.close()


# ---- the relay: gaps, replay, ordering against snapshots (vLLM's own publisher and batches) ----------


def frames(seq: int, events: list[Any], rank: int | None = None) -> list[bytes]:
    """What vLLM's ZmqEventPublisher sends for one batch."""
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    return [b"", seq.to_bytes(8, "big"), msgspec.msgpack.Encoder().encode(KVEventBatch(1.0, events, rank))]


def stored(first_hash: int, tokens: list[int], parent: int | None = None) -> Any:
    from vllm.distributed.kv_events import BlockStored

    count = len(tokens) // BS
    return BlockStored(
        block_hashes=list(range(first_hash, first_hash + count)),
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=BS,
        lora_id=None,
        medium="GPU",
        lora_name=None,
        group_idx=0,
    )


def collecting(relay: KvEventRelay) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def publish(topic: str, message: Any) -> None:
        assert topic == "kv_events"
        sent.append(message)

    relay.publish = publish
    return sent


def opened(relay: KvEventRelay) -> types.SimpleNamespace:
    config = types.SimpleNamespace(endpoint=f"tcp://127.0.0.1:{relay.plan.base}", replay_endpoint=None)
    args = types.SimpleNamespace(kv_events_config=config)
    relay.open(args)
    return config


async def test_a_lost_batch_is_replayed_from_vllms_buffer_and_relayed_in_order() -> None:
    from vllm.distributed.kv_events import KVEventBatch, ZmqEventPublisher

    relay = relay_with(1)
    config = opened(relay)
    replay_dir = Path(config.replay_endpoint.removeprefix("ipc://")).parent
    assert replay_dir.is_dir() and (replay_dir.stat().st_mode & 0o777) == 0o700  # only this user
    publisher = ZmqEventPublisher(0, endpoint=config.endpoint, replay_endpoint=config.replay_endpoint)
    try:
        sent = collecting(relay)
        batches = [
            [stored(10, list(range(8)))],
            [stored(20, list(range(8, 12)), parent=11)],
            [stored(30, list(range(50, 54)))],
        ]
        for events in batches:
            publisher.publish(KVEventBatch(1.0, events))
        # vLLM's publisher thread buffers each batch after sending it; wait until it has all three.
        await asyncio.to_thread(publisher._event_queue.join)
        await relay.handle(frames(0, batches[0]))
        await relay.handle(frames(2, batches[2]))  # batch 1 was lost between engine and relay
        assert [m["seq"] for m in sent] == [0, 1, 2] and relay.recovered == 1
        assert [e["block_hashes"] for m in sent for e in m["events"]] == [[10, 11], [20], [30]]
        view = relay.views[0]
        assert not view.stale and view.seq == 2 and sorted(k[2] for k in view.blocks) == [10, 11, 20, 30]
    finally:
        publisher.shutdown()
        relay.close()
    assert not replay_dir.exists()


async def test_a_gap_vllm_cannot_replay_marks_the_rank_stale_until_the_cache_is_reset() -> None:
    from vllm.distributed.kv_events import AllBlocksCleared, KVEventBatch, ZmqEventPublisher

    relay = relay_with(1)
    config = opened(relay)
    # A buffer of one batch: by the time the gap is seen, vLLM no longer holds the lost one.
    publisher = ZmqEventPublisher(0, endpoint=config.endpoint, replay_endpoint=config.replay_endpoint, buffer_steps=1)
    try:
        sent = collecting(relay)
        batches = [[stored(10, list(range(8)))], [stored(20, list(range(8)))], [stored(30, list(range(4)))]]
        for events in batches:
            publisher.publish(KVEventBatch(1.0, events))
        await asyncio.to_thread(publisher._event_queue.join)
        await relay.handle(frames(0, batches[0]))
        await relay.handle(frames(2, batches[2]))
        view = relay.views[0]
        assert view.stale and "1 batch(es) lost (seq 2, expected 1)" in view.stale_reason
        assert [m["seq"] for m in sent] == [0, 2] and relay.recovered == 0  # the gap is left for routers to see
        [message] = await ask(relay, {})
        assert message["stale"] and message["seq"] == 2
        await relay.handle(frames(3, [AllBlocksCleared(), stored(40, list(range(4)))]))
        [message] = await ask(relay, {})
        assert not message["stale"] and message["seq"] == 3
        assert [b["block_hashes"] for b in message["blocks"]] == [[40]]
    finally:
        publisher.shutdown()
        relay.close()


async def test_without_a_replay_answer_the_gap_marks_the_rank_stale_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(kv_events, "REPLAY_TIMEOUT", 0.3)
    relay = relay_with(1)
    opened(relay)  # a replay endpoint no publisher binds
    try:
        sent = collecting(relay)
        await relay.handle(frames(0, [stored(10, list(range(4)))]))
        await relay.handle(frames(3, [stored(20, list(range(4)))]))
        assert relay.views[0].stale and [m["seq"] for m in sent] == [0, 3]
    finally:
        relay.close()


async def test_several_ranks_get_no_replay_endpoint_and_a_gap_there_is_stale_at_once() -> None:
    relay = relay_with(2)
    config = opened(relay)
    try:
        assert config.replay_endpoint is None and relay.plan.replay is None  # vLLM offsets only TCP ports by rank
        collecting(relay)
        await relay.handle(frames(0, [stored(10, list(range(4)))], rank=1))
        await relay.handle(frames(2, [stored(20, list(range(4)))], rank=1))
        assert relay.views[1].stale and not relay.views[0].stale and relay.views[0].seq == -1
        # The engine started empty: a rank's first batch must be seq 0, or blocks went unseen.
        await relay.handle(frames(1, [stored(30, list(range(4)))], rank=0))
        assert relay.views[0].stale and "1 batch(es) lost (seq 1, expected 0)" in relay.views[0].stale_reason
    finally:
        relay.close()


async def test_a_snapshot_holds_every_batch_up_to_its_seq_even_one_still_being_published() -> None:
    """A router subscribes, then asks kv_blocks: whatever the timing, batches after the snapshot's
    seq are relayed after the snapshot was taken, and the snapshot holds every batch up to it."""
    relay = relay_with(1)
    try:
        gate = asyncio.Event()
        sent: list[int] = []

        async def slow_publish(topic: str, message: Any) -> None:
            await gate.wait()
            sent.append(message["seq"])

        relay.publish = slow_publish
        relaying = asyncio.create_task(relay.handle(frames(0, [stored(10, list(range(8)))])))
        for _ in range(500):  # the batch is applied while its publication waits
            if relay.views[0].seq == 0:
                break
            await asyncio.sleep(0.01)
        [message] = await ask(relay, {})
        assert message["seq"] == 0 and sent == []  # not yet on the event plane, already in the snapshot
        assert [b["block_hashes"] for b in message["blocks"]] == [[10], [11]]
        gate.set()
        await relaying
        assert sent == [0]
    finally:
        relay.close()


def test_a_router_rebuilt_from_kv_blocks_matches_a_router_fed_every_event() -> None:
    """The frontend's index (dynamo_worker.frontend.kv_index) takes the snapshot as it is."""
    from dynamo_worker.frontend.kv_index import KvIndex, prompt_hashes

    rng = random.Random(5)
    engine = ToyEngine(capacity=20)
    view = KvBlockView(0, capacity=20)
    fed = KvIndex()
    prefixes = [[rng.randrange(1, 500) for _ in range(8)] for _ in range(4)]
    prompts = []
    for seq in range(60):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 500) for _ in range(rng.randrange(0, 12))]
        prompts.append(prompt)
        events = engine.run(prompt)
        view.apply(seq, events)
        fed.apply("i", 0, seq, events)
    rebuilt = KvIndex()
    snapshot = view.snapshot()
    blocks = all_blocks(view)
    result = rebuilt.replace_worker(("i", 0), blocks, snapshot.seq)
    assert fed.blocks(("i", 0)) == len(blocks) == len(engine.cached)
    # A block whose ancestor was evicted cannot be hashed from a snapshot (its parent's tokens are
    # gone); it can never be matched either (a match walks from the first block).
    by_hash = {b["block_hashes"][0]: b for b in blocks}
    chained = sum(chained_tokens(by_hash, h) is not None for h in by_hash)
    assert rebuilt.blocks(("i", 0)) == result.stored == chained < len(blocks)  # this seed leaves orphans
    for prompt in prompts:
        hashes = prompt_hashes(prompt, BS)
        assert rebuilt.overlaps(hashes) == fed.overlaps(hashes)
    # The next batch continues the rebuilt entry without a gap.
    assert not rebuilt.apply("i", 0, snapshot.seq + 1, engine.run(prefixes[0] + [1, 2, 3, 4])).gap
