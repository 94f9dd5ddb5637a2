"""The KV-cache index and the routing cost (dynamo_worker.frontend.kv_index, kv_cost): no processes.

Events come from :class:`FakeEngine`, which emits vLLM-shaped ``BlockStored`` / ``BlockRemoved``
events with its own engine hash (seeded per engine, as vLLM's may be), so every match the index
finds is proof that it ignores the engine's hashes.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from dynamo_worker.frontend.kv_cost import ActiveLoad, Decision, KvSelector, expected_blocks
from dynamo_worker.frontend.kv_index import ApproxIndex, KvIndex, MmPlaceholder, WorkerKey, prompt_hashes

BS = 4  # block size of most tests: small prompts, several blocks


class FakeEngine:
    """One worker's prefix cache as vLLM reports it: engine hashes from its own seed."""

    def __init__(self, seed: str, block_size: int = BS) -> None:
        self.seed = seed
        self.block_size = block_size
        self.held: dict[tuple[Any, ...], int] = {}  # (lora, token prefix) -> engine hash

    def _engine_hash(self, parent: int | None, block: Sequence[int], lora: str | None) -> int:
        data = repr((self.seed, parent, tuple(block), lora)).encode()
        return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")

    def key(self, tokens: Sequence[int], blocks: int, lora: str | None = None) -> tuple[Any, ...]:
        return (lora, tuple(tokens[: blocks * self.block_size]))

    def store(self, tokens: Sequence[int], lora_name: str | None = None) -> dict[str, Any] | None:
        """The BlockStored vLLM sends after prefilling ``tokens``: its full blocks not yet cached."""
        bs = self.block_size
        full = len(tokens) // bs
        first = 0
        while first < full and self.key(tokens, first + 1, lora_name) in self.held:
            first += 1
        if first == full:
            return None
        parent = self.held[self.key(tokens, first, lora_name)] if first else None
        hashes = []
        h = parent
        for i in range(first, full):
            h = self._engine_hash(h, tokens[i * bs : (i + 1) * bs], lora_name)
            self.held[self.key(tokens, i + 1, lora_name)] = h
            hashes.append(h)
        return {
            "type": "BlockStored",
            "block_hashes": hashes,
            "parent_block_hash": parent,
            "token_ids": list(tokens[first * bs : full * bs]),
            "block_size": bs,
            "lora_id": None,
            "medium": "GPU",
            "lora_name": lora_name,
            "extra_keys": [[lora_name]] * len(hashes) if lora_name else None,
            "group_idx": 0,
        }

    def remove(self, tokens: Sequence[int], blocks: Sequence[int], lora_name: str | None = None) -> dict[str, Any]:
        """The BlockRemoved for the given block indexes of ``tokens`` (evicted)."""
        hashes = [self.held.pop(self.key(tokens, i + 1, lora_name)) for i in blocks]
        return {"type": "BlockRemoved", "block_hashes": hashes, "medium": "GPU"}

    def snapshot(self) -> list[dict[str, Any]]:
        """Every held block as a one-block BlockStored (what a resync endpoint would send)."""
        bs = self.block_size
        out = []
        for (lora, prefix), h in self.held.items():
            parent = self.held.get((lora, prefix[:-bs])) if len(prefix) > bs else None
            out.append(
                {
                    "type": "BlockStored",
                    "block_hashes": [h],
                    "parent_block_hash": parent,
                    "token_ids": list(prefix[-bs:]),
                    "block_size": bs,
                    "lora_name": lora,
                    "extra_keys": [[lora]] if lora else None,
                    "medium": "GPU",
                }
            )
        return out


def tokens(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def batch(index: KvIndex, worker: WorkerKey, seq: int, *events: dict[str, Any] | None) -> Any:
    return index.apply(worker[0], worker[1], seq, [e for e in events if e is not None])


A, B, C = ("a" * 16, 0), ("b" * 16, 0), ("c" * 16, 0)


# -- the router's hash -----------------------------------------------------------------


def test_equal_prefixes_hash_equal_and_a_difference_changes_every_later_block() -> None:
    base = tokens(40)
    other = base[:20] + [999] + base[21:]  # differs in block 5 only
    h1, h2 = prompt_hashes(base, BS), prompt_hashes(other, BS)
    assert len(h1) == 10 and len(set(h1)) == 10
    assert h1[:5] == h2[:5]
    assert all(a != b for a, b in zip(h1[5:], h2[5:]))  # chained: blocks 6.. differ though their tokens do not
    assert prompt_hashes(base + [1, 2], BS) == h1  # a partial last block is not hashed


def test_lora_names_cache_salts_and_images_keep_blocks_apart() -> None:
    base = tokens(32)
    plain = prompt_hashes(base, BS)
    sql, chat = prompt_hashes(base, BS, lora_name="sql"), prompt_hashes(base, BS, lora_name="chat")
    assert sql == prompt_hashes(base, BS, lora_name="sql")
    assert not set(sql) & set(plain) and not set(sql) & set(chat)
    salted = prompt_hashes(base, BS, cache_salt="tenant-1")
    assert salted == prompt_hashes(base, BS, cache_salt="tenant-1")
    assert not set(salted) & set(plain) and not set(salted) & set(prompt_hashes(base, BS, cache_salt="tenant-2"))
    cat = prompt_hashes(base, BS, mm=[MmPlaceholder("cat", 10, 8)])
    dog = prompt_hashes(base, BS, mm=[MmPlaceholder("dog", 10, 8)])
    assert cat[:2] == dog[:2] == plain[:2]  # the text before the image still matches
    assert all(a != b for a, b in zip(cat[2:], dog[2:]))
    assert prompt_hashes(base, BS, mm=[MmPlaceholder("cat", 9, 8)])[2] != cat[2]  # where it sits matters
    unknown = prompt_hashes(base, BS, mm=[MmPlaceholder(None, 10, 8)])
    assert unknown == plain[:2]  # an unknown image: nothing from its first block on can match


def test_event_blocks_match_prompts_whatever_the_engine_hash_seed() -> None:
    index = KvIndex()
    prompt = tokens(48)
    batch(index, A, 0, FakeEngine("seed-1").store(prompt))
    batch(index, B, 0, FakeEngine("seed-2").store(prompt[:24]))
    assert index.overlaps(prompt_hashes(prompt, BS)) == {A: 12, B: 6}


def test_lora_blocks_match_only_prompts_of_the_same_adapter() -> None:
    index = KvIndex()
    prompt = tokens(32)
    batch(index, A, 0, FakeEngine("x").store(prompt, lora_name="sql"))
    assert index.overlaps(prompt_hashes(prompt, BS, lora_name="sql")) == {A: 8}
    assert index.overlaps(prompt_hashes(prompt, BS)) == {}
    assert index.overlaps(prompt_hashes(prompt, BS, lora_name="chat")) == {}


def test_multimodal_and_salted_event_blocks_match_prompts_built_the_way_vllm_builds_them() -> None:
    index = KvIndex()
    prompt = tokens(16)
    # vLLM's extra keys for an image at tokens 2..9 (block size 4): blocks 0, 1, 2 touch it,
    # each with the item's start relative to the block; the salt only on block 0.
    extra = [[["img-hash", 2], "salt"], [["img-hash", -2]], [["img-hash", -6]], None]
    batch(
        index,
        A,
        0,
        {
            "type": "BlockStored",
            "block_hashes": [11, 12, 13, 14],
            "parent_block_hash": None,
            "token_ids": prompt,
            "block_size": BS,
            "lora_name": None,
            "extra_keys": extra,
            "medium": "GPU",
            "group_idx": 0,
        },
    )
    image = [MmPlaceholder("img-hash", 2, 8)]
    assert index.overlaps(prompt_hashes(prompt, BS, mm=image, cache_salt="salt")) == {A: 4}
    assert index.overlaps(prompt_hashes(prompt, BS, mm=image)) == {}  # no salt: block 0 differs
    assert index.overlaps(prompt_hashes(prompt, BS, mm=[MmPlaceholder("other", 2, 8)], cache_salt="salt")) == {}


# -- events ----------------------------------------------------------------------------


def test_stored_removed_and_cleared_blocks_change_overlaps_exactly() -> None:
    index, engine = KvIndex(), FakeEngine("e")
    prompt = tokens(24)
    hashes = prompt_hashes(prompt, BS)
    result = batch(index, A, 0, engine.store(prompt))
    assert (result.gap, result.stored) == (False, 6)
    assert index.overlaps(hashes) == {A: 6}
    assert index.overlaps(prompt_hashes(prompt[:12] + [7, 7, 7, 7], BS)) == {A: 3}
    assert batch(index, A, 1, engine.remove(prompt, [3])).removed == 1
    assert index.overlaps(hashes) == {A: 3}  # a hole ends the prefix
    batch(index, A, 2, engine.store(prompt))  # re-prefilled: only block 3 is new
    assert index.overlaps(hashes) == {A: 6} and index.blocks(A) == 6
    batch(index, A, 3, engine.remove(prompt, [0]))
    assert index.overlaps(hashes) == {}
    batch(index, B, 0, FakeEngine("f").store(prompt))
    result = batch(index, A, 4, {"type": "AllBlocksCleared"})
    assert result.cleared and index.blocks(A) == 0
    assert index.overlaps(hashes) == {B: 6}


def test_a_block_reported_again_is_held_once() -> None:
    index, engine = KvIndex(), FakeEngine("e")
    event = engine.store(tokens(8))
    batch(index, A, 0, event)
    assert batch(index, A, 1, event).stored == 0  # vLLM re-reports prefix-cache hits
    assert index.blocks(A) == 2 and index.block_count == 2


def test_one_block_under_two_engine_hashes_is_held_until_both_are_removed() -> None:
    # Same adapter name loaded from two paths: vLLM hashes them apart, the events cannot.
    index = KvIndex()
    prompt = tokens(8)
    one, two = FakeEngine("path-1"), FakeEngine("path-2")
    batch(index, A, 0, one.store(prompt, "sql"), two.store(prompt, "sql"))
    assert index.blocks(A) == 2
    batch(index, A, 1, one.remove(prompt, [0, 1], "sql"))
    assert index.overlaps(prompt_hashes(prompt, BS, lora_name="sql")) == {A: 2}
    batch(index, A, 2, two.remove(prompt, [0, 1], "sql"))
    assert index.overlaps(prompt_hashes(prompt, BS, lora_name="sql")) == {} and index.unique_blocks == 0


def test_offloaded_blocks_and_other_kv_groups_are_not_indexed() -> None:
    index = KvIndex()
    event = FakeEngine("e").store(tokens(8))
    assert event is not None
    result = batch(index, A, 0, {**event, "medium": "CPU"}, {**event, "group_idx": 1})
    assert (result.stored, result.skipped, result.gap) == (0, 4, False)
    assert index.block_count == 0


def test_a_block_stored_onto_an_unknown_parent_is_a_gap_and_touches_no_other_worker() -> None:
    index = KvIndex()
    prompt = tokens(16)
    batch(index, B, 0, FakeEngine("b").store(prompt))
    engine = FakeEngine("a")
    engine.store(prompt[:8])  # stored while the router was not listening
    result = batch(index, A, 0, engine.store(prompt))
    assert result.gap and "unknown parent" in result.reason and result.stored == 0
    assert index.blocks(A) == 0
    assert index.overlaps(prompt_hashes(prompt, BS)) == {B: 4}
    assert index.gaps == 1


def test_missed_batches_a_late_first_batch_and_a_restarted_publisher_are_gaps() -> None:
    index, engine = KvIndex(), FakeEngine("a")
    assert not batch(index, A, 0, engine.store(tokens(8))).gap
    assert not batch(index, A, 1).gap
    missed = batch(index, A, 4, engine.store(tokens(8, 100)))
    assert missed.gap and "2 batch(es) missed" in missed.reason and missed.stored == 2  # applied anyway
    assert not batch(index, A, 5).gap
    restarted = batch(index, A, 0, FakeEngine("new").store(tokens(4, 500)))
    assert restarted.gap and restarted.cleared and index.blocks(A) == 1  # the old cache is gone
    late = batch(index, B, 7)  # a frontend that starts after the worker did
    assert late.gap and "first batch seen is seq 7" in late.reason
    assert not batch(index, B, 8).gap  # reported once; the caller resyncs


def test_replace_worker_rebuilds_the_entry_exactly_and_sets_the_next_seq() -> None:
    engine = FakeEngine("a")
    live, rebuilt = KvIndex(), KvIndex()
    prompts = [tokens(40), tokens(20) + tokens(20, 500), tokens(12, 900)]
    for seq, prompt in enumerate(prompts):
        batch(live, A, seq, engine.store(prompt))
    batch(live, A, 3, engine.remove(prompts[1], [9]))
    batch(rebuilt, A, 0, FakeEngine("stale").store(tokens(8, 7000)))  # replaced, not merged
    snapshot = engine.snapshot()
    random.Random(1).shuffle(snapshot)  # children before parents: still chained
    result = rebuilt.replace_worker(A, snapshot, seq=3)
    assert not result.gap and result.stored == live.blocks(A) == rebuilt.blocks(A)
    for prompt in [*prompts, tokens(8, 7000)]:
        hashes = prompt_hashes(prompt, BS)
        assert rebuilt.overlaps(hashes) == live.overlaps(hashes)
    assert not batch(rebuilt, A, 4).gap
    assert batch(rebuilt, A, 6).gap


def test_a_snapshot_missing_a_parent_reports_the_orphans() -> None:
    engine = FakeEngine("a")
    engine.store(tokens(12))
    snapshot = [e for e in engine.snapshot() if e["token_ids"] != tokens(4)]  # block 0 lost
    result = KvIndex().replace_worker(A, snapshot)
    assert result.gap and result.stored == 0 and result.skipped == 2
    other_group = [{**e, "group_idx": 1} for e in engine.snapshot()]  # not indexed, not a gap
    result = KvIndex().replace_worker(A, [*engine.snapshot(), *other_group[1:]])
    assert not result.gap and (result.stored, result.skipped) == (3, 2)


def test_remove_instance_drops_every_rank_of_it_and_only_them() -> None:
    index = KvIndex()
    prompt = tokens(16)
    a0, a1 = ("inst-a", 0), ("inst-a", 1)
    for worker in (a0, a1, B):
        batch(index, worker, 0, FakeEngine(str(worker)).store(prompt))
    index.remove_instance("inst-a")
    assert index.worker_count == 1 and index.block_count == 4
    assert index.overlaps(prompt_hashes(prompt, BS)) == {B: 4}
    batch(index, C, 0, FakeEngine("c").store(prompt[:8]))  # reuses a freed slot: no stale bits
    assert index.overlaps(prompt_hashes(prompt, BS)) == {B: 4, C: 2}


def _reference_overlap(held: dict[WorkerKey, set[tuple[int, ...]]], prompt: list[int]) -> dict[WorkerKey, int]:
    out = {}
    for worker, prefixes in held.items():
        depth = 0
        while (depth + 1) * BS <= len(prompt) and tuple(prompt[: (depth + 1) * BS]) in prefixes:
            depth += 1
        if depth:
            out[worker] = depth
    return out


def test_two_indexes_fed_the_same_events_answer_alike_and_as_a_plain_model_does() -> None:
    rng = random.Random(17)
    workers = [(name, rank) for name in ("w1", "w2", "w3") for rank in (0, 1)]
    engines = {w: FakeEngine(f"seed-{w}") for w in workers}
    prefixes = [[rng.randrange(50) for _ in range(rng.choice((4, 8, 12)))] for _ in range(5)]
    first, second = KvIndex(), KvIndex()
    seqs = Counter[WorkerKey]()
    prompts: list[list[int]] = []
    for _ in range(400):
        worker = rng.choice(workers)
        engine = engines[worker]
        held = [k for k in engine.held if k[1]]
        event: dict[str, Any] | None
        if held and rng.random() < 0.35:
            _, prefix = rng.choice(held)
            event = engine.remove(list(prefix), [len(prefix) // BS - 1])  # evict one block
        else:
            prompt = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(0, 12))]
            prompts.append(prompt)
            event = engine.store(prompt)
        for index in (first, second):
            assert not batch(index, worker, seqs[worker], event).gap
        seqs[worker] += 1
    reference = {w: {prefix for (_, prefix) in e.held} for w, e in engines.items()}
    assert first.block_count == sum(len(e.held) for e in engines.values())
    for prompt in prompts:
        hashes = prompt_hashes(prompt, BS)
        assert first.overlaps(hashes) == second.overlaps(hashes) == _reference_overlap(reference, prompt)


# -- cost and choice -------------------------------------------------------------------


def test_the_cost_is_weighted_new_prefill_blocks_plus_decode_blocks() -> None:
    assert KvSelector().cost(prompt_blocks=10, overlap_blocks=4, decode_blocks=7) == 13
    assert KvSelector(overlap_weight=2.0).cost(10, 4, 7) == 19
    assert KvSelector(overlap_weight=0.0).cost(10, 10, 7) == 7


def test_the_worker_with_the_cached_prefix_wins_until_its_load_outweighs_the_prefill() -> None:
    # Dynamo's choice (no balance slack): the load counts from the first block.
    load, selector = ActiveLoad(), KvSelector(balance_abs=None, rng=random.Random(0))
    overlaps = {A: 60}
    assert selector.choose([A, B, C], 64, overlaps, load).worker == A
    load.start("r1", A, 59)  # 4 + 59 = 63 < 64: still A
    decision = selector.choose([A, B, C], 64, overlaps, load)
    assert (decision.worker, decision.cost, decision.overlap_blocks) == (A, 63, 60)
    load.start("r2", A, 2)  # 4 + 61 = 65 > 64: an idle worker is cheaper
    assert selector.choose([A, B, C], 64, overlaps, load).worker in (B, C)


def test_ties_go_to_the_least_loaded_then_at_random() -> None:
    load, selector = ActiveLoad(), KvSelector(balance_abs=None, rng=random.Random(3))
    load.start("r", B, 8)
    # A: 10 new blocks, no load; B: 2 new blocks, 8 of load: equal cost, A has the lower load.
    assert selector.choose([A, B], 10, {B: 8}, load).worker == A
    picks = Counter(selector.choose([A, B, C], 10, {}, ActiveLoad()).worker for _ in range(300))
    assert set(picks) == {A, B, C} and min(picks.values()) > 60


def test_within_the_balance_slack_a_tenant_stays_on_the_worker_holding_its_prompt() -> None:
    """The benchmark's case (3 workers, 32-block system prompts, 8 requests in flight): the
    holder runs 3 requests of other tenants, the others 2 and 3. Dynamo's cost sends the tenant's
    next request to the worker with 2 (one request more, 40 blocks, outweighs the 32-block hit);
    within the slack of ``balance_abs`` requests the cache decides."""
    load = ActiveLoad()
    for worker, count in ((A, 3), (B, 2), (C, 3)):
        for i in range(count):
            load.start(f"{worker[0]}-{i}", worker, 40)
    overlaps = {A: 32}  # A holds the tenant's system prompt; the request has 36 prompt blocks
    dynamo = KvSelector(balance_abs=None, rng=random.Random(0)).choose([A, B, C], 36, overlaps, load)
    assert (dynamo.worker, dynamo.away_from_holder) == (B, "load")
    slack = KvSelector(balance_abs=3, rng=random.Random(0))
    kept = slack.choose([A, B, C], 36, overlaps, load)
    assert (kept.worker, kept.cost, kept.away_from_holder) == (A, 4, None)
    # Beyond the slack (3 requests of 36 blocks above B) the load counts in full again.
    load.start("big", A, 3 * 36 + 40)
    assert slack.choose([A, B, C], 36, overlaps, load).away_from_holder == "load"


def test_a_worker_running_too_many_requests_more_than_the_least_loaded_is_skipped() -> None:
    """Counted in requests: a hot tenant's requests share its prompt blocks, so in blocks four of
    them on its holder weigh about as much as two requests elsewhere."""
    load, selector = ActiveLoad(), KvSelector(balance_abs=3, balance_rel=1.5, rng=random.Random(0))
    system = list(range(100, 132))
    for i in range(4):
        load.start(f"hot{i}", A, 40, shared=[*system, 1000 + i])  # 32 shared + 8 own blocks each
    load.start("b", B, 40)
    assert load.tracked_blocks(A) == 32 + 4 * 8  # 64 blocks: under the slack of 3 x 36 above B
    decision = selector.choose([A, B], 36, {A: 32}, load)  # A runs 4, B 1: 3 more, within the slack
    assert (decision.worker, decision.balance_skipped, decision.away_from_holder) == (A, 0, None)
    load.start("hot4", A, 40, shared=[*system, 1004])  # 5 against 1: 4 more, and over 1.5x
    decision = selector.choose([A, B], 36, {A: 32}, load)
    assert (decision.worker, decision.balance_skipped, decision.away_from_holder) == (B, 1, "balance")
    # Both thresholds must be passed: 4 more and 3x (6 against 2) is skipped; 4 more but only
    # 1.5x (12 against 8) is not, nor 3 more at any ratio (5 against 2).
    assert selector.is_overloaded(6, 2)
    assert not selector.is_overloaded(12, 8) and not selector.is_overloaded(5, 2)
    assert not KvSelector(balance_abs=None).is_overloaded(100, 0)


def test_a_busy_worker_is_skipped_while_another_has_room() -> None:
    load, selector = ActiveLoad(), KvSelector(busy_threshold=0.9, rng=random.Random(0))
    for worker in (A, B):
        load.set_capacity(worker, 100)
    load.start("r1", A, 90)  # 90% of its capacity
    decision = selector.choose([A, B], 200, {A: 200}, load)  # A would win on cost (90 vs 200)
    assert (decision.worker, decision.busy_skipped) == (B, 1)
    load.start("r2", B, 95)
    assert selector.choose([A, B], 200, {A: 200}, load).worker == A  # all busy: cost decides
    assert KvSelector(busy_threshold=None).choose([A, B], 200, {A: 200}, load).busy_skipped == 0


def test_a_hot_prefix_gets_a_second_holder_below_saturation() -> None:
    """Three requests over three workers never reach the slack of 3: a tenant sending half the
    traffic kept one holder (126/46/52 requests per worker on the benchmark's hot trace at
    concurrency 3). A worker running two requests of the prefix while another idles is skipped."""
    load, selector = ActiveLoad(), KvSelector(rng=random.Random(0))
    system = list(range(100, 132))
    hot = [*system, 2000]
    load.start("hot0", A, 40, shared=[*system, 1000])
    load.start("hot1", A, 40, shared=[*system, 1001])
    depth = {A: load.in_flight_prefix(A, hot), B: 0, C: 0}
    sharing = {w: load.sharing(w, hot, d) for w, d in depth.items()}
    assert (depth[A], sharing) == (32, {A: 2, B: 0, C: 0})
    decision = selector.choose([A, B, C], 33, {A: 32}, load, running_shared=depth, running_sharing=sharing)
    assert decision.worker in (B, C) and (decision.balance_skipped, decision.away_from_holder) == (1, "balance")
    # Without the two requests of the prefix in flight there, A keeps it (the slack decides).
    other = KvSelector(rng=random.Random(0)).choose([A, B, C], 33, {A: 32}, load, running_shared=depth)
    assert (other.worker, other.balance_skipped) == (A, 0)
    # A busier cluster (nine requests over three workers, a mean of 3): the balance slack acts there, not this rule.
    for i in range(3):
        load.start(f"b{i}", B, 40)
    for i in range(2):
        load.start(f"c{i}", C, 40)
    load.start("a2", A, 40)
    decision = selector.choose([A, B, C], 33, {A: 32}, load, running_shared=depth, running_sharing=sharing)
    assert (decision.worker, decision.balance_skipped, decision.away_from_holder) == (A, 0, None)
    for i in range(3, 5):  # A runs 5 (all of the prefix), C 2: the rule would skip A, were the load lighter
        load.start(f"hot{i}", A, 40, shared=[*system, 1000 + i])
    assert selector.crowded([A, B, C], [A, B, C], {A: 5}, load) == set()


def test_a_prefix_with_a_large_share_of_the_traffic_balances_the_workers_at_one_request_each() -> None:
    """On 2 workers at one request per worker no in-flight count separates them, and a tenant
    sending half the traffic kept one holder (2.05x the other's requests). Once its prefix is in at
    least 1/(N+1) of the last requests routed, its request goes to the worker the window served
    least; a tenant of an ordinary share keeps its holder."""
    load, selector = ActiveLoad(), KvSelector(rng=random.Random(0))
    hot_system, cold_system = list(range(100, 132)), list(range(300, 332))
    routed = 0

    def route(worker: WorkerKey, system: list[int]) -> None:
        nonlocal routed
        load.start(f"r{routed}", worker, 40, shared=[*system, 5000 + routed])
        load.finish(f"r{routed}")
        routed += 1

    def choose(system: list[int]) -> Decision:
        hashes = [*system, 9999]
        return selector.choose([A, B], 33, {A: 32}, load, hashes=hashes)

    # Until 32 requests are routed the share is not judged.
    for i in range(31):
        route(A, hot_system if i % 2 else cold_system)
    assert load.window_size() == 31 and choose(hot_system).worker == A
    route(B, cold_system)
    # 32 routed, 15 of them the hot prefix's (>= 32/3), A served 31 and B 1: the hot request goes to
    # B; a prefix of an ordinary share stays on its holder A.
    decision = choose(hot_system)
    assert (decision.worker, decision.balance_skipped, decision.away_from_holder) == (B, 1, "balance")
    rare = list(range(700, 732))
    route(A, rare)
    assert load.window_sharing([*rare, 1], 17) == 1 and choose(rare).worker == A
    # Within SHARE_MARGIN requests of each other the cache decides again (the prefix still hot: 44 of 62).
    for _ in range(29):
        route(B, hot_system)
    assert (load.window_routed(A), load.window_routed(B), load.window_sharing([*hot_system, 1], 17)) == (32, 30, 44)
    assert choose(hot_system).worker == A
    # Of the workers within the margin, one running the fewest requests: the idle B, though A holds more.
    route(B, hot_system)
    load.start("running", A, 40, shared=[*hot_system, 7777])  # A 33, B 31
    decision = choose(hot_system)
    assert (decision.worker, decision.away_from_holder) == (B, "balance")
    load.finish("running")
    # The window keeps the last 64 requests: the oldest (A's first 10) fall out.
    for _ in range(10):
        route(B, rare)
    assert load.window_size() == 64 and load.window_routed(A) == 23
    # The depth is half the prompt: a shared opening (a chat template's) of a quarter of it is not a prefix.
    template = hot_system[:8]
    assert load.window_sharing([*template, *range(900, 924), 1], 17) == 0
    # Dynamo's choice unchanged: no such rule.
    assert KvSelector.share([A, B], [*hot_system, 1], load) is True
    assert KvSelector(balance_abs=None).spread_hot([A, B], True, load) == [A, B]


def test_once_the_share_window_judges_a_prefix_of_an_ordinary_share_keeps_its_holder() -> None:
    """The hot-prefix rule moved 5-6 requests per uniform 3-worker trace off their holder, each a
    system prompt computed again. Once 32 requests are routed, only a prefix hot by its share moves."""
    load, selector = ActiveLoad(), KvSelector(rng=random.Random(0))
    tenants = [list(range(100 * t, 100 * t + 32)) for t in range(1, 9)]
    for i in range(32):  # 8 tenants, 4 requests each: 1/8 of the window, under 1/4
        load.start(f"w{i}", (A, B, C)[i % 3], 40, shared=[*tenants[i % 8], 5000 + i])
        load.finish(f"w{i}")
    system = tenants[0]
    load.start("x0", A, 40, shared=[*system, 1000])
    load.start("x1", A, 40, shared=[*system, 1001])
    hashes = [*system, 2000]
    depth = {A: load.in_flight_prefix(A, hashes), B: 0, C: 0}
    sharing = {w: load.sharing(w, hashes, d) for w, d in depth.items()}
    assert KvSelector.share([A, B, C], hashes, load) is False
    kept = selector.choose([A, B, C], 33, {A: 32}, load, running_shared=depth, running_sharing=sharing, hashes=hashes)
    assert (kept.worker, kept.balance_skipped) == (A, 0)
    # Before the window judges (here: no hashes given), the rule moves it as before.
    moved = selector.choose([A, B, C], 33, {A: 32}, load, running_shared=depth, running_sharing=sharing)
    assert moved.worker in (B, C) and moved.away_from_holder == "balance"


def test_a_prefix_no_worker_holds_goes_to_the_worker_with_the_least_recent_traffic() -> None:
    """Below saturation workers are often all idle: a random tie placed new tenants by chance."""
    now = [0.0]
    load = ActiveLoad(clock=lambda: now[0])
    for i in range(3):
        load.start(f"a{i}", A, 40)
        load.finish(f"a{i}")
    load.start("b0", B, 40)
    load.finish("b0")
    now[0] = 30.0  # decayed by e: A 3/e, B 1/e, C 0
    assert load.recent(A) == pytest.approx(3 / math.e) and load.recent(C) == 0
    for seed in range(20):
        assert KvSelector(rng=random.Random(seed)).choose([A, B, C], 36, {}, load).worker == C
    load.start("c0", C, 40)
    load.finish("c0")
    assert all(KvSelector(rng=random.Random(seed)).choose([A, B, C], 36, {}, load).worker == B for seed in range(20))


def test_a_busy_worker_running_the_requests_prefix_stays_a_candidate_if_the_rest_fits() -> None:
    """Over the threshold, a worker whose running requests hold the request's prefix still takes it
    when its own blocks fit (it adds only those): sent elsewhere it would compute the prefix again
    and evict another (20-24 requests of the 3-worker benchmark left a busy holder)."""
    load, selector = ActiveLoad(), KvSelector(busy_threshold=0.9, rng=random.Random(0))
    for worker in (A, B):
        load.set_capacity(worker, 100)
    system = prompt_hashes(tokens(160), BS)  # 40 blocks
    load.start("r1", A, 92, shared=system)  # 92% of its capacity, the 40 system blocks among them
    prompt = prompt_hashes(tokens(160) + tokens(20, 900), BS)  # the system prompt and 5 blocks of its own
    running = {A: load.in_flight_prefix(A, prompt), B: 0}
    assert running[A] == 40
    decision = selector.choose([A, B], 45, {A: 40}, load, running_shared=running, request_blocks=48)
    assert (decision.worker, decision.busy_skipped) == (A, 0)  # 92 + 8 blocks fit in 100
    assert selector.is_busy(A, load) and not selector.is_busy(A, load, 40, 48)
    assert selector.is_busy(A, load, 40, 49)  # 92 + 9 does not fit: busy as before
    assert selector.is_busy(A, load, 0, 48)  # nothing of it running there: busy as before
    decision = selector.choose([A, B], 45, {A: 40}, load, running_shared=running, request_blocks=49)
    assert (decision.worker, decision.busy_skipped) == (B, 1)


def test_published_load_counts_other_routers_requests_until_it_goes_stale() -> None:
    now = [0.0]
    load = ActiveLoad(stale_after=2.0, clock=lambda: now[0])
    load.start("mine", A, 10)
    load.apply_load_metrics(
        {
            "instance_id": A[0],
            "dp_rank": 0,
            "worker_stats": {"num_requests_waiting": 3},
            "kv_stats": {"kv_active_blocks": 50, "kv_total_blocks": 100, "gpu_cache_usage_perc": 0.95},
        }
    )
    assert load.decode_blocks(A) == 50 and load.capacity(A) == 100 and load.waiting(A) == 3
    selector = KvSelector(busy_threshold=0.9)
    assert selector.is_busy(A, load)  # published usage 95%
    load.start("burst", A, 60)
    assert load.decode_blocks(A) == 70  # our own burst, before the next publication
    now[0] = 3.0
    assert load.published(A) is None and load.decode_blocks(A) == 70 and load.capacity(A) == 100
    assert not KvSelector(busy_threshold=0.95).is_busy(A, load)  # 70 < 95 blocks, usage stale


def _published(worker: WorkerKey, active: int, total: int = 100) -> dict[str, Any]:
    return {
        "instance_id": worker[0],
        "dp_rank": worker[1],
        "worker_stats": {"num_requests_waiting": 0},
        "kv_stats": {"kv_active_blocks": active, "kv_total_blocks": total, "gpu_cache_usage_perc": active / total},
    }


def test_a_publication_stops_counting_this_routers_requests_once_they_finish() -> None:
    """A worker publishes at most every 0.1 s: just after a request ends, its last figure still
    counts it. The holder of a prefix must not look loaded by a request that is gone (the next
    turn went to the worker without the prefix in a real-engine test)."""
    now = [0.0]
    load = ActiveLoad(clock=lambda: now[0])
    selector = KvSelector(busy_threshold=0.9, rng=random.Random(0))
    load.start("turn0", A, 5)
    now[0] = 0.01
    load.apply_load_metrics(_published(A, 92))  # while it ran: 92 of 100 blocks in use (busy)
    assert load.decode_blocks(A) == 92 and selector.is_busy(A, load)
    now[0] = 0.02
    load.finish("turn0")
    assert load.published_blocks(A) == 87 and load.decode_blocks(A) == 87  # others' 87 blocks still count
    assert not selector.is_busy(A, load)
    # A request routed after that publication arrived is not in it: its end takes nothing off.
    load.start("turn1", A, 5)
    now[0] = 0.03
    load.finish("turn1")
    assert load.published_blocks(A) == 87
    # The next publication replaces the figure, discount and all.
    load.apply_load_metrics(_published(A, 0))
    assert load.decode_blocks(A) == 0
    # So a prefix's holder with a stale figure of its own finished request wins its next turn.
    load.start("turn2", A, 5)
    load.apply_load_metrics(_published(A, 5))
    load.finish("turn2")
    decision = selector.choose([A, B], 4, {A: 4}, load)
    assert (decision.worker, decision.away_from_holder) == (A, None)


def test_each_request_sent_away_from_a_holder_says_why() -> None:
    now = [0.0]
    load = ActiveLoad(clock=lambda: now[0])
    selector = KvSelector(busy_threshold=0.9, balance_abs=None, rng=random.Random(0))
    for worker in (A, B):
        load.set_capacity(worker, 100)
    assert selector.choose([A, B], 10, {A: 8}, load).away_from_holder is None
    assert selector.choose([A, B], 10, {}, load).away_from_holder is None  # nobody holds any
    load.start("own", A, 20)  # this router's own requests: 2 + 20 > 10
    assert selector.choose([A, B], 10, {A: 8}, load).away_from_holder == "load"
    load.finish("own")
    load.apply_load_metrics(_published(A, 20))  # another router's requests
    assert selector.choose([A, B], 10, {A: 8}, load).away_from_holder == "published_load"
    load.apply_load_metrics(_published(A, 95))
    assert selector.choose([A, B], 10, {A: 8}, load).away_from_holder == "busy"


def test_active_load_tracks_requests_until_they_finish() -> None:
    load = ActiveLoad()
    load.start("r1", A, 5)
    load.start("r2", A, 7)
    load.start("r3", B, 3)
    assert (load.tracked_blocks(A), load.in_flight(A)) == (12, 2)
    load.start("r1", B, 5)  # retried elsewhere: moved
    assert (load.tracked_blocks(A), load.tracked_blocks(B)) == (7, 8)
    assert load.finish("r2") and not load.finish("r2")
    assert (load.tracked_blocks(A), load.in_flight(A)) == (0, 0)
    load.remove_instance(B[0])
    assert load.tracked_blocks(B) == 0 and not load.finish("r3")


def test_queued_prefill_counts_until_the_first_token_or_the_end() -> None:
    load = ActiveLoad()
    load.start("r1", A, 40, prefill_blocks=30)
    load.start("r2", A, 40, prefill_blocks=4)
    load.start("r3", B, 40)  # all cached: nothing to prefill
    assert (load.queued_prefill(A), load.queued_prefill(B)) == (34, 0)
    load.prefill_done("r1")
    load.prefill_done("r1")  # every message says so: counted off once
    assert load.queued_prefill(A) == 4 and load.tracked_blocks(A) == 80  # still running
    load.start("r2", B, 40, prefill_blocks=6)  # migrated: prefilled again on its new worker
    assert (load.queued_prefill(A), load.queued_prefill(B)) == (0, 6)
    load.finish("r2")
    assert load.queued_prefill(B) == 0


def test_with_the_prefill_queue_a_holder_prefilling_a_long_prompt_is_weighed_by_it() -> None:
    """Dynamo's newer cost: a worker's prefill term is this request's new blocks plus the prefill
    still queued there (requests without a first token): the time before this one's first token."""
    overlaps = {A: 32}  # A holds 32 of the request's 36 blocks
    load = ActiveLoad()
    load.start("cold", A, 40, prefill_blocks=40)  # A is prefilling another tenant's long prompt
    load.start("b", B, 40)  # B is decoding one request
    plain = KvSelector(balance_abs=None, rng=random.Random(0))
    queue = KvSelector(balance_abs=None, prefill_queue=True, rng=random.Random(0))
    assert plain.choose([A, B], 36, overlaps, load).worker == A  # 4 + 40 against 36 + 40
    decision = queue.choose([A, B], 36, overlaps, load)  # 4 + 40 + 40 against 36 + 40
    assert (decision.worker, decision.cost, decision.away_from_holder) == (B, 76, "load")
    assert [c["queued_prefill"] for c in queue.explain([A, B], 36, overlaps, load)] == [40, 0]
    load.prefill_done("cold")  # its first token: A is only decoding it now
    assert queue.choose([A, B], 36, overlaps, load).worker == A


def test_prompt_blocks_shared_by_requests_in_flight_count_once_per_worker() -> None:
    """Four turns of one tenant on one worker hold its 8-block system prompt once in the cache,
    not four times: the load must say so, or the holder looks busier than it is (the benchmark
    saw 35% of requests routed away from their prefix for that)."""
    load = ActiveLoad()
    system = list(range(1000, 1008))
    for turn in range(4):
        load.start(f"t{turn}", A, 12, shared=[*system, 2000 + turn])  # 9 full prompt blocks, 3 of output
    assert load.tracked_blocks(A) == 8 + 4 * (1 + 3)
    load.finish("t0")
    assert load.tracked_blocks(A) == 8 + 3 * (1 + 3)
    for turn in range(1, 4):
        load.finish(f"t{turn}")
    assert load.tracked_blocks(A) == 0 and load.in_flight(A) == 0
    load.start("again", A, 12, shared=[*system, 3000])  # the bookkeeping starts clean
    assert load.tracked_blocks(A) == 12


def test_in_flight_prefix_is_the_leading_blocks_a_request_in_flight_there_shares() -> None:
    load = ActiveLoad()
    system = prompt_hashes(tokens(32), BS)  # 8 blocks
    turn = prompt_hashes(tokens(32) + tokens(8, 500), BS)  # the same 8, then 2 of its own
    assert turn[:8] == system
    assert load.in_flight_prefix(A, turn) == 0
    load.start("r1", A, 12, shared=turn)
    assert load.in_flight_prefix(A, system) == 8 and load.in_flight_prefix(A, turn) == 10
    assert load.in_flight_prefix(B, system) == 0  # another worker's request stores nothing here
    other = prompt_hashes(tokens(16) + tokens(16, 900), BS)  # diverges after 4 blocks
    assert load.in_flight_prefix(A, other) == 4
    assert load.in_flight_prefix(A, prompt_hashes(tokens(32, 1), BS)) == 0  # first block differs
    load.finish("r1")
    assert load.in_flight_prefix(A, turn) == 0


def test_expected_blocks_count_the_prompt_and_the_capped_output() -> None:
    assert expected_blocks(100, 28, 16) == 8
    assert expected_blocks(100, None, 16) == -(-(100 + 256) // 16)
    assert expected_blocks(100, 100_000, 16) == expected_blocks(100, None, 16)


def test_temperature_samples_by_softmax_of_normalised_costs() -> None:
    load = ActiveLoad()
    load.start("r", B, 10)  # costs: A 10, B 20 -> normalised 0 and 1
    for temperature in (0.5, 1.0, 3.0):
        selector = KvSelector(temperature=temperature, balance_abs=None, rng=random.Random(42))
        picks = Counter(selector.choose([A, B], 10, {}, load).worker for _ in range(20_000))
        expected = 1 / (1 + math.exp(-1 / temperature))
        assert abs(picks[A] / 20_000 - expected) < 0.015, (temperature, picks)
    assert Counter(KvSelector().choose([A, B], 10, {}, load).worker for _ in range(50)) == {A: 50}


def _route_hot_prefix(selector: KvSelector, track_load: bool) -> Counter[WorkerKey]:
    """100 requests sharing a 1,000-token system prompt, each with its own 200-token question;
    the workers cache what they prefill; nothing finishes (decode load only rises)."""
    rng = random.Random(5)
    system = [rng.randrange(32_000) for _ in range(1_000)]
    workers = [A, B, C]
    engines = {w: FakeEngine(f"seed-{w}", block_size=16) for w in workers}
    index, load = KvIndex(), ActiveLoad()
    seqs = Counter[WorkerKey]()
    routed = Counter[WorkerKey]()
    for request in range(100):
        prompt = system + [rng.randrange(32_000) for _ in range(200)]
        hashes = prompt_hashes(prompt, 16)
        decision = selector.choose(workers, len(prompt) // 16, index.overlaps(hashes), load)
        worker = decision.worker
        routed[worker] += 1
        if track_load:
            load.start(f"r{request}", worker, expected_blocks(len(prompt), 64, 16))
        batch(index, worker, seqs[worker], engines[worker].store(prompt))
        seqs[worker] += 1
    return routed


def test_a_hot_shared_prefix_spreads_over_the_workers_through_the_decode_load() -> None:
    routed = _route_hot_prefix(KvSelector(rng=random.Random(0)), track_load=True)
    assert sum(routed.values()) == 100 and len(routed) == 3
    assert max(routed.values()) <= 1.5 * min(routed.values()), routed
    # Without the decode term everything goes to the prefix's first holder: the term is the cure.
    piled = _route_hot_prefix(KvSelector(rng=random.Random(0)), track_load=False)
    assert max(piled.values()) == 100


# -- approximate mode ------------------------------------------------------------------


def test_the_approximate_index_remembers_routed_prompts_for_its_ttl() -> None:
    now = [0.0]
    approx = ApproxIndex(ttl=120.0, clock=lambda: now[0])
    prompt = tokens(40)
    hashes = prompt_hashes(prompt, BS)
    approx.record(A, hashes)
    approx.record(B, hashes[:4])
    assert approx.overlaps(hashes) == {A: 10, B: 4}
    assert approx.overlaps(prompt_hashes(prompt[:8] + [0] * 32, BS)) == {A: 2, B: 2}
    now[0] = 100.0
    approx.record(B, hashes[:2])  # refreshed by a later request: its TTL starts again
    now[0] = 120.0
    assert approx.overlaps(hashes) == {B: 2} and approx.block_count == 2
    now[0] = 219.9
    assert approx.overlaps(hashes) == {B: 2}
    now[0] = 220.0
    assert approx.overlaps(hashes) == {} and approx.block_count == 0


def test_a_prefix_routed_again_and_again_stays_remembered_in_bounded_memory() -> None:
    now = [0.0]
    approx = ApproxIndex(ttl=100.0, clock=lambda: now[0])
    hashes, once = prompt_hashes(tokens(40), BS), prompt_hashes(tokens(8, 500), BS)
    approx.record(B, once)  # expires at 100, through the compactions
    for _ in range(1_000):  # 10,000 refreshes of 10 blocks within the TTL: the queue is compacted
        now[0] += 0.05
        approx.record(A, hashes)
    assert approx.block_count == len(hashes) + len(once)  # one entry per (worker, block), however often routed
    assert approx.overlaps(once) == {B: 2}
    now[0] += 99.8
    assert approx.overlaps(hashes) == {A: 10} and approx.overlaps(once) == {}
    now[0] += 0.4
    assert approx.overlaps(hashes) == {}


def test_the_approximate_index_is_bounded_and_forgets_a_departed_instance() -> None:
    now = [0.0]
    approx = ApproxIndex(ttl=60.0, max_entries=10, clock=lambda: now[0])
    first, second = prompt_hashes(tokens(32), BS), prompt_hashes(tokens(32, 100), BS)
    approx.record(A, first)
    now[0] = 1.0
    approx.record(B, second)
    # Over 10: the least recently routed blocks went, the older prompt's tail first.
    assert approx.block_count == 10
    assert approx.overlaps(first) == {A: 2} and approx.overlaps(second) == {B: 8}
    approx.remove_instance(B[0])
    assert approx.overlaps(second) == {} and approx.worker_count == 1
    approx.record(C, second)  # takes B's slot
    assert approx.overlaps(second) == {C: 8}


def test_the_approximate_index_holds_no_more_than_a_workers_kv_capacity() -> None:
    # A worker with room for 12 blocks cannot still hold three 8-block prompts routed to it:
    # the least recently routed blocks go, a prompt's tail before its head (as vLLM evicts).
    now = [0.0]
    approx = ApproxIndex(ttl=120.0, clock=lambda: now[0])
    first, second, third = (prompt_hashes(tokens(32, start), BS) for start in (0, 100, 200))
    approx.record(A, first, capacity=12)
    approx.record(A, second, capacity=12)
    assert approx.blocks(A) == 12
    assert approx.overlaps(first) == {A: 4} and approx.overlaps(second) == {A: 8}
    approx.record(A, first, capacity=12)  # routed again: now the most recent
    approx.record(A, third, capacity=12)
    assert approx.overlaps(first) == {A: 4} and approx.overlaps(second) == {} and approx.overlaps(third) == {A: 8}
    # Another worker's blocks are bounded by its own capacity, not A's.
    approx.record(B, first + second, capacity=100)
    assert approx.overlaps(first + second) == {A: 4, B: 16}
    assert approx.block_count == 12 + 16
    # A prompt longer than the whole cache keeps its leading blocks.
    approx.record(C, third + second, capacity=5)
    assert approx.overlaps(third + second) == {A: 8, C: 5}


def test_approximate_mode_sends_a_repeated_prefix_back_to_the_same_worker() -> None:
    approx, load = ApproxIndex(), ActiveLoad()
    selector = KvSelector(rng=random.Random(1))
    prompt = tokens(64)
    hashes = prompt_hashes(prompt, BS)
    first = selector.choose([A, B, C], 16, approx.overlaps(hashes), load).worker
    approx.record(first, hashes)
    again = selector.choose([A, B, C], 16, approx.overlaps(prompt_hashes(prompt + tokens(8, 900), BS)), load)
    assert again.worker == first and again.overlap_blocks == 16


@pytest.mark.parametrize(
    "bad",
    [
        {"overlap_weight": -1.0},
        {"temperature": -0.1},
        {"busy_threshold": 0.0},
        {"balance_abs": -1},
        {"balance_rel": 0.5},
    ],
)
def test_bad_knobs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        KvSelector(**bad)


# -- against vLLM's own code (no engine) -----------------------------------------------


@pytest.mark.parametrize(
    "case",
    [
        {"lora": None, "salt": None, "mm": []},
        {"lora": "sql", "salt": None, "mm": []},
        {"lora": None, "salt": "tenant", "mm": []},
        {"lora": "sql", "salt": "tenant", "mm": [("imgA", 20, 40), ("imgB", 60, 5), ("imgC", 100, 33)]},
        {"lora": None, "salt": None, "mm": [("imgA", 16, 16), ("imgB", 32, 1)]},
    ],
)
def test_blocks_vllm_reports_match_the_prompts_that_made_them(case: dict[str, Any]) -> None:
    """vLLM's extra keys (``generate_block_hash_extra_keys``, ``to_event_extra_keys``) in its own
    ``BlockStored``, through the relay's msgpack decoding and the event plane's JSON, match
    :func:`prompt_hashes` of the same prompt. A vLLM that changes its extra keys fails here."""
    from types import SimpleNamespace

    import msgspec

    kv_cache_utils = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    from vllm.distributed.kv_events import BlockStored, KVEventBatch

    bs = 16
    prompt = [random.Random(0).randrange(1000) for _ in range(200)]
    blocks = len(prompt) // bs
    # The Request attributes vLLM's extra-key code reads.
    lora = case["lora"]
    request = SimpleNamespace(
        mm_features=[
            SimpleNamespace(identifier=i, mm_position=SimpleNamespace(offset=o, length=n)) for i, o, n in case["mm"]
        ],
        lora_request=SimpleNamespace(lora_name=lora, lora_path="/adapters/x", name=lora) if lora else None,
        cache_salt=case["salt"],
        prompt_embeds=None,
    )
    extra, mm_index = [], 0
    for b in range(blocks):
        keys, mm_index = kv_cache_utils.generate_block_hash_extra_keys(request, b * bs, (b + 1) * bs, mm_index)
        extra.append(keys)
    event = BlockStored(
        block_hashes=list(range(1, blocks + 1)),
        parent_block_hash=None,
        token_ids=prompt[: blocks * bs],
        block_size=bs,
        lora_id=None,
        medium="GPU",
        lora_name=lora,
        extra_keys=kv_cache_utils.to_event_extra_keys(extra),
        group_idx=0,
    )
    payload = msgspec.msgpack.encode(KVEventBatch(ts=0.0, events=[event], data_parallel_rank=0))
    relayed = msgspec.msgpack.Decoder(KVEventBatch).decode(payload)  # as KvEventRelay.run does
    events = msgspec.json.decode(msgspec.json.encode(msgspec.to_builtins(relayed.events)))
    index = KvIndex()
    assert index.apply("w", 0, 0, events).stored == blocks
    mm = [MmPlaceholder(i, o, n) for i, o, n in case["mm"]]
    assert index.overlaps(prompt_hashes(prompt, bs, lora_name=lora, cache_salt=case["salt"], mm=mm)) == {
        ("w", 0): blocks
    }
    # A plain prompt matches only the blocks before the first one with extra keys.
    plain = 0 if lora or case["salt"] else min((o // bs for _, o, _ in case["mm"]), default=blocks)
    assert index.overlaps(prompt_hashes(prompt, bs)) == ({("w", 0): plain} if plain else {})


def test_the_share_windows_count_per_worker_is_the_last_64_routed() -> None:
    """``window_routed`` is kept beside the window (not a scan of it per candidate): after many
    more requests than the window holds, each worker's count is that of the last 64 routed."""
    rng = random.Random(3)
    load = ActiveLoad()
    workers = [(f"w{n}", 0) for n in range(5)]
    routed: list[WorkerKey] = []
    for n in range(300):
        worker = rng.choice(workers[: 1 + n % 5])
        load.start(f"r{n}", worker, 4, shared=[n])
        routed.append(worker)
        if n % 37 == 0:
            last = routed[-64:]
            assert [load.window_routed(w) for w in workers] == [last.count(w) for w in workers]
    last = routed[-64:]
    assert [load.window_routed(w) for w in workers] == [last.count(w) for w in workers]
    assert load.window_size() == 64
