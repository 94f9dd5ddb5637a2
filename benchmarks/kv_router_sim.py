"""The KV router alone at scale, by simulation: no engine, no NATS.

``python -m benchmarks.kv_router_sim [--workers 128] [--blocks-per-worker 20000] [--decisions 2000]``

Builds synthetic ``kv_events`` streams (the relay's message shape, JSON-encoded as on the event
plane) for ``--workers`` simulated workers until each holds ``--blocks-per-worker`` blocks of
``--block-size`` tokens, and feeds them to one :class:`~dynamo_worker.frontend.kv_index.KvIndex`.
The chains are realistic: a pool of 1,024-token shared prefixes (system prompts and documents,
popularity Zipf-like, so popular ones sit on most workers) continued by multi-turn
conversations whose turns each extend the previous turn's chain (unique suffixes). Engine
hashes are the same on every worker for the same prefix, as with vLLM's default hash seed.

It measures, on this one core:

* **ingestion**: blocks per second through JSON decoding plus :meth:`KvIndex.apply` (and apply
  alone), filling the index; then a churn phase, each batch evicting old blocks and storing new;
* **decision time** for a 4,096-token prompt: the router hashes, the overlaps, the eviction
  forecast's cut on every holder (each worker under pressure: 200 blocks of a prompt doomed,
  :func:`under_pressure`) and the choice among every worker
  (:class:`~dynamo_worker.frontend.kv_cost.KvSelector` given the prompt's hashes, as the
  frontend gives them, so its share rule judges popular prefixes; with an
  :class:`~dynamo_worker.frontend.kv_cost.ActiveLoad` holding requests in flight), p50/p99;
* **memory per cached block**: RSS growth over the fill, and tracemalloc's exact count on a
  smaller index (``--traced-workers``).

Targets (issue 17): ingestion >= 200,000 blocks/s, decision p99 <= 1 ms. A missed target is
printed, with a cProfile of where the time goes. Bounded by ``--max-seconds`` (generation stops
adding workers past it). Exits 0.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import sys
import time
import tracemalloc
from array import array
from collections import deque
from collections.abc import Iterator
from typing import Any

import attrs
import msgspec

from benchmarks.report import percentile
from dynamo_worker.frontend.kv_cost import ActiveLoad, KvSelector, expected_blocks
from dynamo_worker.frontend.kv_forecast import EvictionForecast
from dynamo_worker.frontend.kv_index import KvIndex, WorkerKey, prompt_hashes

INGEST_TARGET = 200_000  # blocks/s
DECISION_P99_TARGET_MS = 1.0
PREFIX_BLOCKS = 64  # 1,024 tokens at block size 16
MASK64 = (1 << 64) - 1


@attrs.define
class SimConfig:
    """The simulation's size."""

    workers: int = 128
    blocks_per_worker: int = 20_000
    block_size: int = 16
    prefixes: int = 256  # shared-prefix pool
    prefixes_per_worker: int = 48
    churn_fraction: float = 0.05  # blocks per worker evicted and replaced after the fill
    decisions: int = 2_000
    prompt_tokens: int = 4_096
    traced_workers: int = 8
    max_seconds: float = 100.0
    seed: int = 0


class EngineHashes:
    """Stand-in for vLLM's 64-bit block hashes: unique per block content, shared across workers."""

    def __init__(self) -> None:
        self._next = 1

    def fresh(self, n: int) -> list[int]:
        start = self._next
        self._next += n
        return [(i * 0x9E3779B97F4A7C15) & MASK64 for i in range(start, start + n)]


@attrs.define
class Workload:
    """Shared prefixes, and a generator of each worker's event batches (JSON, as on NATS)."""

    config: SimConfig
    rng: random.Random
    hashes: EngineHashes
    pool_tokens: list[list[int]]
    pool_hashes: list[list[int]]
    pool_weights: list[float]
    samples: list[list[int]] = attrs.field(factory=list)  # conversations kept for decision prompts
    next_seq: dict[str, int] = attrs.field(factory=dict)  # per worker, after its batches so far
    # Per worker, engine hashes of its latest conversation blocks: what the churn evicts.
    recent: dict[str, deque[int]] = attrs.field(factory=dict)

    @classmethod
    def build(cls, config: SimConfig) -> Workload:
        rng = random.Random(config.seed)
        hashes = EngineHashes()
        size = PREFIX_BLOCKS * config.block_size
        tokens = [random_tokens(rng, size) for _ in range(config.prefixes)]
        return cls(
            config,
            rng,
            hashes,
            tokens,
            [hashes.fresh(PREFIX_BLOCKS) for _ in tokens],
            [1.0 / (rank + 1) for rank in range(config.prefixes)],
        )

    def worker_batches(self, instance_id: str, target_blocks: int) -> Iterator[bytes]:
        """The worker's batches until it holds ``target_blocks`` blocks."""
        cfg, rng = self.config, self.rng
        bs = cfg.block_size
        mine = set(rng.choices(range(cfg.prefixes), weights=self.pool_weights, k=cfg.prefixes_per_worker))
        mine_list = sorted(mine)
        held_prefixes: set[int] = set()
        blocks = seq = 0
        sampled = False
        recent = self.recent[instance_id] = deque(maxlen=int(target_blocks * cfg.churn_fraction) + 8)
        while blocks < target_blocks:
            events: list[dict[str, Any]] = []
            prefix = rng.choice(mine_list)
            if prefix not in held_prefixes:
                held_prefixes.add(prefix)
                events.append(stored(self.pool_hashes[prefix], None, self.pool_tokens[prefix], bs))
                blocks += PREFIX_BLOCKS
            parent = self.pool_hashes[prefix][-1]
            conversation = list(self.pool_tokens[prefix])
            for _turn in range(rng.randint(1, 6)):
                n = min(rng.randint(8, 32), max(1, target_blocks - blocks))
                turn_tokens = random_tokens(rng, n * bs)
                turn_hashes = self.hashes.fresh(n)
                events.append(stored(turn_hashes, parent, turn_tokens, bs))
                recent.extend(turn_hashes)
                conversation += turn_tokens
                parent = turn_hashes[-1]
                blocks += n
                if blocks >= target_blocks:
                    break
            if not sampled and len(conversation) > PREFIX_BLOCKS * bs:
                self.samples.append(conversation)  # one per worker: the prompts' holders vary
                sampled = True
            # A few engine steps' worth of events per relayed batch, as vLLM groups them.
            for start in range(0, len(events), 3):
                yield encode(instance_id, seq, events[start : start + 3])
                seq += 1
        self.next_seq[instance_id] = seq

    def churn_batches(self, instance_id: str, blocks: int) -> Iterator[bytes]:
        """Batches that each evict 8 of the worker's conversation blocks (newest first: chain
        tails) and store 8 new ones on a fresh root."""
        bs = self.config.block_size
        seq = self.next_seq[instance_id]
        evictable = self.recent[instance_id]
        done = 0
        while done < blocks and len(evictable) >= 8:
            removed = [evictable.pop() for _ in range(8)]
            new_hashes = self.hashes.fresh(8)
            events = [
                {"type": "BlockRemoved", "block_hashes": removed, "medium": "GPU"},
                stored(new_hashes, None, random_tokens(self.rng, 8 * bs), bs),
            ]
            yield encode(instance_id, seq, events)
            seq += 1
            done += 8
        self.next_seq[instance_id] = seq


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return array("H", rng.randbytes(2 * n)).tolist()  # token ids below 65,536


def stored(hashes: list[int], parent: int | None, tokens: list[int], block_size: int) -> dict[str, Any]:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": tokens,
        "block_size": block_size,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": None,
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }


_encoder = msgspec.json.Encoder()


def encode(instance_id: str, seq: int, events: list[dict[str, Any]]) -> bytes:
    return _encoder.encode({"instance_id": instance_id, "dp_rank": 0, "seq": seq, "ts": 0.0, "events": events})


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@attrs.define
class IngestStats:
    blocks: int = 0
    decode_s: float = 0.0
    apply_s: float = 0.0
    gaps: int = 0

    def add(self, index: KvIndex, payloads: list[bytes]) -> None:
        decode = msgspec.json.decode
        t0 = time.perf_counter()
        messages = [decode(p) for p in payloads]
        t1 = time.perf_counter()
        for m in messages:
            result = index.apply(m["instance_id"], m["dp_rank"], m["seq"], m["events"])
            self.blocks += result.stored + result.removed
            self.gaps += result.gap
        t2 = time.perf_counter()
        self.decode_s += t1 - t0
        self.apply_s += t2 - t1

    def rate(self, with_decode: bool = True) -> float:
        spent = self.apply_s + (self.decode_s if with_decode else 0.0)
        return self.blocks / spent if spent > 0 else 0.0


def instance_name(i: int) -> str:
    return f"{i:016x}"


def fill(index: KvIndex, workload: Workload, workers: int, deadline: float) -> tuple[IngestStats, int]:
    """Every worker's stream into ``index`` (worker by worker); stats and workers filled."""
    stats = IngestStats()
    filled = 0
    for i in range(workers):
        if time.monotonic() > deadline:
            break
        payloads = list(workload.worker_batches(instance_name(i), workload.config.blocks_per_worker))
        stats.add(index, payloads)
        filled += 1
    return stats, filled


def churn(index: KvIndex, workload: Workload, workers: int) -> IngestStats:
    stats = IngestStats()
    blocks = int(workload.config.blocks_per_worker * workload.config.churn_fraction)
    for i in range(workers):
        stats.add(index, list(workload.churn_batches(instance_name(i), blocks)))
    return stats


def decision_prompts(workload: Workload, count: int) -> list[list[int]]:
    cfg, rng = workload.config, workload.rng
    prompts = []
    for _ in range(count):
        base = rng.choice(workload.samples) if workload.samples else []
        tail = random_tokens(rng, max(0, cfg.prompt_tokens - len(base)))
        prompts.append((base + tail)[: cfg.prompt_tokens])
    return prompts


@attrs.define
class DecisionStats:
    total_ms: list[float] = attrs.field(factory=list)
    hash_ms: list[float] = attrs.field(factory=list)
    overlap_ms: list[float] = attrs.field(factory=list)
    forecast_ms: list[float] = attrs.field(factory=list)  # the eviction forecast's cut, every holder
    choose_ms: list[float] = attrs.field(factory=list)
    chosen_overlap: list[int] = attrs.field(factory=list)  # on the worker chosen
    best_overlap: list[int] = attrs.field(factory=list)  # on the worker holding the most


def decide(index: KvIndex, prompts: list[list[int]], workers: int, block_size: int, seed: int) -> DecisionStats:
    """Route every prompt as the frontend would, with requests in flight on every worker."""
    rng = random.Random(seed)
    load = ActiveLoad()
    keys = index.workers()
    for key in keys:
        load.set_capacity(key, 40_000)
        for r in range(8):
            load.start(f"{key[0]}-{r}", key, rng.randrange(100, 140))
    selector = KvSelector(rng=rng)
    forecast = under_pressure(keys, prompts, block_size, rng)
    stats = DecisionStats()
    clock = time.perf_counter
    for n, prompt in enumerate(prompts):
        t0 = clock()
        hashes = prompt_hashes(prompt, block_size)
        t1 = clock()
        overlaps = index.overlaps(hashes)
        t2 = clock()
        for worker, blocks in overlaps.items():
            overlaps[worker] = forecast.surviving(worker, hashes, blocks)
        tf = clock()
        decision = selector.choose(keys, len(prompt) // block_size, overlaps, load, hashes=hashes)
        t3 = clock()
        # The frontend then tracks the request; the previous one ends (the load stays steady).
        load.start(f"p{n}", decision.worker, expected_blocks(len(prompt), 64, block_size), shared=hashes)
        load.finish(f"p{n - 1}")
        stats.total_ms.append((t3 - t0) * 1e3)
        stats.hash_ms.append((t1 - t0) * 1e3)
        stats.overlap_ms.append((t2 - t1) * 1e3)
        stats.forecast_ms.append((tf - t2) * 1e3)
        stats.choose_ms.append((t3 - tf) * 1e3)
        stats.chosen_overlap.append(decision.overlap_blocks)
        stats.best_overlap.append(max(overlaps.values(), default=0))
    return stats


def under_pressure(
    keys: list[WorkerKey], prompts: list[list[int]], block_size: int, rng: random.Random
) -> EvictionForecast:
    """An eviction forecast with every worker under pressure: a request of one of the prompts
    ran and finished there, then a cold one was routed whose allocation dooms 200 of its blocks
    (the decisions' cost only: every block counts as held by the index)."""
    forecast = EvictionForecast(lambda worker, h: True)
    capacity = 400
    for key in keys:
        chain = prompt_hashes(rng.choice(prompts), block_size)
        forecast.route(f"ran-{key}", key, chain, len(chain) * block_size, block_size, 0, capacity)
        forecast.finish(f"ran-{key}")
        unknown = capacity - 1 - len(chain)
        cold = [rng.getrandbits(63) for _ in range(unknown + 200)]
        forecast.route(f"cold-{key}", key, cold, len(cold) * block_size, block_size, 0, capacity, decodes=False)
    return forecast


def traced_bytes_per_block(config: SimConfig) -> tuple[float, float]:
    """tracemalloc's bytes per cached block and per distinct block, on a smaller index."""
    workload = Workload.build(attrs.evolve(config, seed=config.seed + 1))
    batches = [
        list(workload.worker_batches(instance_name(i), config.blocks_per_worker)) for i in range(config.traced_workers)
    ]
    messages = [[msgspec.json.decode(p) for p in worker] for worker in batches]
    del batches
    index = KvIndex()
    # The traced workers take the top worker slots, as in the full index: holder masks there
    # are ints of up to --workers bits, not of 8.
    for pad in range(max(0, config.workers - config.traced_workers)):
        index.apply(f"pad-{pad}", 0, 0, [])
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for worker in messages:
        for m in worker:
            index.apply(m["instance_id"], m["dp_rank"], m["seq"], m["events"])
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / max(1, index.block_count), used / max(1, index.unique_blocks)


def profile_ingestion(config: SimConfig) -> str:
    workload = Workload.build(attrs.evolve(config, seed=config.seed + 2))
    payloads = [list(workload.worker_batches(instance_name(i), config.blocks_per_worker)) for i in range(4)]
    index = KvIndex()
    stats = IngestStats()
    profiler = cProfile.Profile()
    profiler.enable()
    for worker in payloads:
        stats.add(index, worker)
    profiler.disable()
    return _top(profiler)


def profile_decisions(index: KvIndex, prompts: list[list[int]], workers: int, block_size: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    decide(index, prompts, workers, block_size, seed=1)
    profiler.disable()
    return _top(profiler)


def _top(profiler: cProfile.Profile, lines: int = 12) -> str:
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    return out.getvalue()


def parse_args(argv: list[str]) -> SimConfig:
    defaults = SimConfig()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.kv_router_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--workers", type=int, default=defaults.workers, help="simulated workers (default %(default)s)")
    p.add_argument(
        "--blocks-per-worker",
        type=int,
        default=defaults.blocks_per_worker,
        help="cached blocks per worker (default %(default)s)",
    )
    p.add_argument("--block-size", type=int, default=defaults.block_size, help="tokens per block (default %(default)s)")
    p.add_argument(
        "--decisions", type=int, default=defaults.decisions, help="routing decisions timed (default %(default)s)"
    )
    p.add_argument(
        "--prompt-tokens", type=int, default=defaults.prompt_tokens, help="decision prompt length (default %(default)s)"
    )
    p.add_argument(
        "--traced-workers",
        type=int,
        default=defaults.traced_workers,
        help="workers in the tracemalloc memory count (default %(default)s)",
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=defaults.max_seconds,
        help="stop adding workers to the fill after this long (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="workload seed (default %(default)s)")
    a = p.parse_args(argv)
    if min(a.workers, a.blocks_per_worker, a.block_size, a.decisions, a.prompt_tokens, a.traced_workers) < 1:
        p.error("every count must be at least 1")
    return SimConfig(
        workers=a.workers,
        blocks_per_worker=a.blocks_per_worker,
        block_size=a.block_size,
        decisions=a.decisions,
        prompt_tokens=a.prompt_tokens,
        traced_workers=a.traced_workers,
        max_seconds=a.max_seconds,
        seed=a.seed,
    )


def main(argv: list[str] | None = None) -> int:
    config = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    workload = Workload.build(config)
    index = KvIndex()
    gc.collect()
    rss_before = rss_bytes()
    fill_stats, filled = fill(index, workload, config.workers, started + config.max_seconds * 0.6)
    gc.collect()
    rss_growth = rss_bytes() - rss_before
    churn_stats = churn(index, workload, filled)
    prompts = decision_prompts(workload, config.decisions)
    decisions = decide(index, prompts, filled, config.block_size, config.seed)
    per_block_traced, per_unique_traced = traced_bytes_per_block(config)

    ingest = fill_stats.rate()
    p50, p99 = percentile(decisions.total_ms, 50) or 0.0, percentile(decisions.total_ms, 99) or 0.0
    ingest_ok, decision_ok = ingest >= INGEST_TARGET, p99 <= DECISION_P99_TARGET_MS
    print(
        f"KV router simulation: {filled} workers x {config.blocks_per_worker:,} blocks "
        f"(block size {config.block_size}); index {index.block_count:,} cached blocks, "
        f"{index.unique_blocks:,} distinct; Python {sys.version.split()[0]}"
    )
    rows = [
        (
            "ingestion, JSON decode + apply",
            f"{ingest:,.0f} blocks/s",
            f">= {INGEST_TARGET:,}",
            "ok" if ingest_ok else "MISSED",
        ),
        ("ingestion, apply alone", f"{fill_stats.rate(with_decode=False):,.0f} blocks/s", "", ""),
        ("churn (evict 8 + store 8 per batch)", f"{churn_stats.rate():,.0f} blocks/s", "", ""),
        (
            f"decision, {config.prompt_tokens}-token prompt, p50 / p99",
            f"{p50:.3f} / {p99:.3f} ms",
            f"p99 <= {DECISION_P99_TARGET_MS} ms",
            "ok" if decision_ok else "MISSED",
        ),
        (
            "  of which hashes / overlaps / eviction forecast / choice, p50",
            (
                f"{percentile(decisions.hash_ms, 50):.3f} / {percentile(decisions.overlap_ms, 50):.3f} / "
                f"{percentile(decisions.forecast_ms, 50):.3f} / {percentile(decisions.choose_ms, 50):.3f} ms"
            ),
            "",
            "",
        ),
        (
            "  overlap on the chosen / best worker, p50",
            (f"{percentile(decisions.chosen_overlap, 50):.0f} / {percentile(decisions.best_overlap, 50):.0f} blocks"),
            "",
            "",
        ),
        ("memory per cached block, RSS growth", f"{rss_growth / max(1, index.block_count):.0f} B", "", ""),
        (
            f"memory per cached / distinct block, tracemalloc ({config.traced_workers} workers)",
            f"{per_block_traced:.0f} / {per_unique_traced:.0f} B",
            "",
            "",
        ),
        (
            "event gaps reported (the streams have none)",
            f"{fill_stats.gaps + churn_stats.gaps}",
            "0",
            "ok" if not fill_stats.gaps + churn_stats.gaps else "BUG",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>28}  {'target':>16}")
    for name, value, target, verdict in rows:
        print(f"{name:<{width}}  {value:>28}  {target:>16}  {verdict}")
    if filled < config.workers:
        print(f"note: --max-seconds reached; {filled} of {config.workers} workers filled")
    if not ingest_ok:
        print("\ningestion target missed; where the time goes (4 workers, cProfile):")
        print(profile_ingestion(config))
    if not decision_ok:
        print("\ndecision target missed; where the time goes (cProfile):")
        print(profile_decisions(index, prompts[:200], filled, config.block_size))
    print(f"wall time {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
