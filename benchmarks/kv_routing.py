"""``python -m benchmarks.kv_routing``: KV-aware routing against round-robin on one chat trace.

One invocation, one generated model, one trace; for each arm a fresh stack (``dynamo-worker up``:
nats-server, one frontend, ``--workers`` decode workers) serves it:

* ``round-robin``: ``up --router-mode round-robin``;
* ``kv``: ``up --router-mode kv`` (the index fed by the workers' KV events);
* ``kv-approx``: ``up --router-mode kv --no-kv-events`` (the router's own record, with a TTL).
* ``kv-w4`` (only when named in ``--arms``): ``up --router-mode kv --kv-overlap-score-weight 4``.

**The trace** (:func:`make_trace`, pure): ``--tenants`` tenants, each with a long system prompt
(random token ids), several users each, every user a multi-turn conversation whose prompt is
the system prompt, the history so far (user messages and replies) and a new message, sent as
token ids to ``/v1/completions`` (exact block arithmetic, no chat template in between). Turns
are ordered so that a user's next turn comes about as many requests later as there are users
(the previous answer has long finished, as in a chat). The replies in the history are the trace's, not the
model's output, so the blocks the engine caches of its own output are never reused: only prompt
prefixes can hit. The *hot-tenant* variant gives one tenant half of the requests.

**The load**: a closed loop of ``--concurrency`` requests, by default one per worker, below
saturation, where a hit shows as a shorter TTFT. At 8 over 3 workers on 2 cores the engines were
saturated and a hit's TTFT was mostly the wait for its engine (docs/performance.md).

**The ceiling** (:func:`prefix_ceiling`, pure): the prefix-cache hit rate an infinite cache
would give in trace order, counted as vLLM counts it: per request ``queries += prompt tokens``,
``hits += the longest cached run of full blocks``, at most ``prompt - 1`` tokens (vLLM always
computes the last prompt token). Also given: the part a cache holding every system prompt but no
history would reach, and **the cluster's ceiling** (:func:`capacity_ceiling`): what one cache of
all the workers' blocks together would reach with perfect (Belady's) eviction, an upper bound for
any router on this cluster. The infinite cache's ceiling counts history hits that need a user's
history kept for 31-65 requests, which the issue's sizing (prefixes about 2.5x one worker)
leaves no room for, so the target is judged against both.

**The KV cache** of each worker (``--num-gpu-blocks-override``, :func:`cache_plan`): the
tenants' prefixes fit the cluster but not one worker. The cluster keeps ``--cluster-ratio``
(1.25) times the tenants' system prompts for prefixes, split evenly (with 3 workers one share is
1/2.4 of the prefixes: issue 17's "about 2.5x one worker's capacity"; with 2, 1/1.6), and each
worker has room beyond that for the private blocks (history, message, output) of its share of
the requests in flight. ``--cache-blocks`` sets the size instead. So a router that keeps each
tenant on one worker can keep every prefix, while round-robin, which sends every tenant
everywhere, keeps evicting them. Every arm's workers evict by ``--kv-eviction`` (default
``active-inactive``: blocks requests reused outlive one-off ones, docs/routing.md; ``lru``,
vLLM's own, for the figures before 2026-12-07's second session).

**Measured per arm and variant**, as differences of counters scraped before and after the
trace (warm-up excluded): the cluster prefix-cache hit rate from vLLM's own counters
(``vllm:prefix_cache_hits`` / ``vllm:prefix_cache_queries`` on every worker's ``/metrics``,
parsed with prometheus_client's parser) against the ceiling; TTFT p50/p99 and output tokens/s
from the load client (:mod:`benchmarks.load`); requests per worker (each worker's
``dynamo_component_requests_total`` for ``generate``); for the kv arms the prediction accuracy
(``dynamo_frontend_kv_prediction_misses`` against routed requests), the routing decision
p99 (from the frontend histogram's buckets: an upper bound), the share of requests routed to
a worker predicted to hold nothing and predicted against engine-reported cached tokens, and, from the
frontend's ``DYN_KV_PREDICTION_LOG`` (set here), every request's prediction against the engine's
answer with the cause of each miss (``predictions``, ``prediction_causes``: :func:`classify_prediction`);
vLLM's preemptions. Before the first trace the round-robin arm measures what a
prefix costs: one prompt of the trace's turn-0 length sent cold to every worker, then again
(cached), one at a time.

**Targets** (issue 17, ratios in this run; printed, not asserted): kv hit rate >= 0.85x the
ceiling and >= 2x round-robin's; TTFT p50 >= 2x lower; output tok/s >= 1.3x; busiest worker
<= 1.5x the requests of the quietest; hot-tenant TTFT p99 no worse than round-robin's;
predicted == actual cached tokens for >= 95% of requests.

Every engine run belongs under ``flock /tmp/dw-heavy.lock`` on the shared machine. Everything
listens on 127.0.0.1; every load is bounded in requests and seconds. Writes
``benchmarks/results/kv-routing-<timestamp>.json``. ``--self-check`` runs only the trace and
ceiling checks (no engine; they also run, in milliseconds, before every benchmark).
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import heapq
import itertools
import json
import math
import random
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import machine, report
from benchmarks.config import BENCH_ENV, RESULTS_DIR, SERVED_NAME, measured_source, python, start_run
from benchmarks.load import LevelRun, run_level
from benchmarks.servers import DynamoUp, ServerFailed
from benchmarks.workload import FIRST_ID, LAST_ID, make_prompts
from dynamo_worker.engine.kv_eviction import POLICIES as EVICTION_POLICIES
from dynamo_worker.frontend.kv_routing import PREDICTION_LOG_ENV

#: Each arm's flags to ``dynamo-worker up`` (passed to its frontend).
ARMS: dict[str, tuple[str, ...]] = {
    "round-robin": ("--router-mode", "round-robin"),
    "kv": ("--router-mode", "kv"),
    "kv-approx": ("--router-mode", "kv", "--no-kv-events"),
    # Not run by default: the cost with the prefill term weighed 4x (docs/performance.md).
    "kv-w4": ("--router-mode", "kv", "--kv-overlap-score-weight", "4"),
    # Not run by default, for experiments with the frontend's other kv knobs (set through their
    # environment variables, which `up` passes to the frontend): ARM_ENV.
    "kv-queue": ("--router-mode", "kv"),
    "kv-busy1": ("--router-mode", "kv"),
    "kv-dynamo": ("--router-mode", "kv"),
}
#: Environment of an arm's stack, on top of the benchmark's.
ARM_ENV: dict[str, dict[str, str]] = {
    "kv-queue": {"DYN_KV_PREFILL_QUEUE": "true"},  # --kv-prefill-queue
    "kv-busy1": {"DYN_BUSY_THRESHOLD": "1.0"},  # busy only when full
    "kv-dynamo": {"DYN_KV_BALANCE_REQUESTS": "off", "DYN_KV_PREFILL_QUEUE": "true"},  # Dynamo's cost
}
DEFAULT_ARMS = ("round-robin", "kv", "kv-approx")
BASELINE_ARM = "round-robin"
VARIANTS = ("main", "hot")
#: The generated model's context: a 1,024-token system prompt plus a few turns of history.
MODEL_POSITIONS = 2048

# Targets of issue 17 (ratios within one run).
HIT_OF_CEILING_TARGET = 0.85
HIT_VS_RR_TARGET = 2.0
TTFT_P50_TARGET = 2.0  # round-robin's p50 / kv's
TOKS_TARGET = 1.3
BALANCE_TARGET = 1.5  # busiest worker's requests / quietest's
PREDICTION_TARGET = 0.95


# ---- the trace (pure) ---------------------------------------------------------------------------


@attrs.frozen
class TraceShape:
    """The multi-tenant chat trace's size; defaults are the full run's."""

    tenants: int = 8
    users_per_tenant: int = 8
    turns: int = 4
    system_tokens: int = 1024
    user_tokens: int = 64
    reply_tokens: int = 64
    output_tokens: int = 32
    seed: int = 0

    def max_prompt_tokens(self) -> int:
        return self.system_tokens + (self.turns - 1) * (self.user_tokens + self.reply_tokens) + self.user_tokens


QUICK_SHAPE = TraceShape(
    users_per_tenant=2, turns=3, system_tokens=256, user_tokens=16, reply_tokens=16, output_tokens=8
)


@attrs.frozen
class TraceRequest:
    tenant: int
    user: int  # global user number
    turn: int
    prompt: tuple[int, ...]


def users_per_tenant(shape: TraceShape, hot: bool) -> list[int]:
    """Users of each tenant. Hot: tenant 0 has as many as all others together (half the requests)."""
    if not hot:
        return [shape.users_per_tenant] * shape.tenants
    others = max(1, shape.users_per_tenant // 2)  # keeps the hot trace about as long as the main one
    return [others * (shape.tenants - 1)] + [others] * (shape.tenants - 1)


def make_trace(shape: TraceShape, hot: bool = False) -> list[TraceRequest]:
    """The trace, in sending order; the same for the same shape (a string seed: stable across runs).

    The hot variant draws other token ids than the main one (another seed), so a session that
    serves both finds nothing of the first in its caches that the second could reuse.
    """
    rng = random.Random(f"kv-routing-trace/{shape.seed}/{'hot' if hot else 'main'}")

    def ids(n: int) -> tuple[int, ...]:
        return tuple(rng.randint(FIRST_ID, LAST_ID) for _ in range(n))

    systems = [ids(shape.system_tokens) for _ in range(shape.tenants)]
    conversations: list[tuple[int, list[tuple[int, ...]]]] = []  # (tenant, prompt of each turn)
    for tenant, count in enumerate(users_per_tenant(shape, hot)):
        for _ in range(count):
            prompts, history = [], systems[tenant]
            for _turn in range(shape.turns):
                message = ids(shape.user_tokens)
                prompts.append(history + message)
                history = history + message + ids(shape.reply_tokens)
            conversations.append((tenant, prompts))
    # Each user starts at a random point of the first "turn window" and comes back one window
    # (as many slots as there are users) later, jittered: turns of different users interleave,
    # and a user's next turn is about len(users) requests after its previous one.
    n = len(conversations)
    slots = []
    for user, (tenant, prompts) in enumerate(conversations):
        start = rng.uniform(0, n)
        for turn, prompt in enumerate(prompts):
            slots.append((start + turn * n + rng.uniform(-0.25, 0.25) * n, user, tenant, turn, prompt))
    slots.sort(key=lambda s: s[0])
    return [TraceRequest(tenant, user, turn, prompt) for _, user, tenant, turn, prompt in slots]


def turn_gaps(trace: Sequence[TraceRequest]) -> list[int]:
    """For every user's turn after the first: how many requests after its previous turn it comes."""
    last: dict[int, int] = {}
    gaps = []
    for position, request in enumerate(trace):
        if request.user in last:
            gaps.append(position - last[request.user])
        last[request.user] = position
    return gaps


@attrs.frozen
class Ceiling:
    hits: int  # tokens an infinite prefix cache would serve, in trace order
    queries: int  # prompt tokens
    distinct_blocks: int  # full blocks of the whole trace, each counted once
    system_blocks: int  # full blocks of the tenants' system prompts
    system_hits: int = 0  # the hits of a cache that keeps every system prompt but no history
    capacity_blocks: int = 0  # the cluster's KV blocks, all workers together (0: not computed)
    capacity_hits: int = 0  # the hits of one cache of that size with perfect eviction

    @property
    def rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0

    @property
    def system_rate(self) -> float:
        return self.system_hits / self.queries if self.queries else 0.0

    @property
    def capacity_rate(self) -> float | None:
        if not self.capacity_blocks:
            return None
        return self.capacity_hits / self.queries if self.queries else 0.0


def block_chains(prompts: Sequence[Sequence[int]], block_size: int) -> list[list[int]]:
    """Each prompt's full blocks as ids, chained exactly: a block is its parent's id and its
    tokens (no hashing, so no collision can flatter a ceiling)."""
    ids: dict[tuple[int, tuple[int, ...]], int] = {}
    chains = []
    for prompt in prompts:
        parent, chain = 0, []
        for index in range(len(prompt) // block_size):
            key = (parent, tuple(prompt[index * block_size : (index + 1) * block_size]))
            parent = ids.setdefault(key, len(ids) + 1)
            chain.append(parent)
        chains.append(chain)
    return chains


def prefix_ceiling(
    prompts: Sequence[Sequence[int]], block_size: int, system_blocks: int = 0, cap_blocks: int = 0
) -> Ceiling:
    """The best prefix-cache hit rate for ``prompts`` in order, counted as vLLM counts it.

    A request's hit is its longest run of leading full blocks seen in earlier prompts, capped at
    ``len - 1`` tokens. ``system_hits`` counts at most ``cap_blocks`` blocks per request (the
    system prompt's).
    """
    seen: set[int] = set()
    hits = queries = capped = 0
    for prompt, chain in zip(prompts, block_chains(prompts, block_size), strict=True):
        queries += len(prompt)
        usable = (len(prompt) - 1) // block_size
        cached = 0
        while cached < min(usable, len(chain)) and chain[cached] in seen:
            cached += 1
        seen.update(chain)
        hits += cached * block_size
        capped += min(cached, cap_blocks) * block_size
    return Ceiling(hits, queries, len(seen), system_blocks, capped)


def capacity_ceiling(prompts: Sequence[Sequence[int]], block_size: int, capacity_blocks: int) -> int:
    """Tokens a single cache of ``capacity_blocks`` could serve from cache for ``prompts`` in
    order, evicting by Belady's rule (the block needed again furthest in the future goes first;
    the current request's blocks stay). No router over several caches of the same total size can
    hit more: one cache holds each block once, sees every request, and knows the future. It is
    generous besides: it keeps no blocks for requests in flight nor for generated tokens.
    """
    chains = block_chains(prompts, block_size)
    uses: dict[int, list[int]] = {}  # block -> the requests that contain it, descending
    for position in range(len(chains) - 1, -1, -1):
        for block in chains[position]:
            if not uses.get(block) or uses[block][-1] != position:
                uses.setdefault(block, []).append(position)
    cached: dict[int, int] = {}  # block -> its next use (len(chains): never)
    furthest: list[tuple[int, int]] = []  # heap of (-next use, block); stale entries skipped
    hits = 0
    for position, (prompt, chain) in enumerate(zip(prompts, chains, strict=True)):
        usable = min((len(prompt) - 1) // block_size, len(chain))
        run = 0
        while run < usable and chain[run] in cached:
            run += 1
        hits += run * block_size
        for block in chain:
            pending = uses[block]
            while pending and pending[-1] <= position:
                pending.pop()
            cached[block] = pending[-1] if pending else len(chains)
            # On a tie a child goes before its parent (ids grow along a chain): a block is of
            # use only behind its parent.
            heapq.heappush(furthest, (-cached[block], -block))
        mine = set(chain)
        kept: list[tuple[int, int]] = []
        while len(cached) > capacity_blocks and furthest:
            entry = heapq.heappop(furthest)
            next_use, block = -entry[0], -entry[1]
            if cached.get(block) != next_use:
                continue  # stale: evicted already, or its next use moved
            if block in mine:
                kept.append(entry)
                continue
            del cached[block]
        for entry in kept:
            heapq.heappush(furthest, entry)
    return hits


def trace_ceiling(
    trace: Sequence[TraceRequest], shape: TraceShape, block_size: int, capacity_blocks: int = 0
) -> Ceiling:
    per_tenant = shape.system_tokens // block_size
    prompts = [r.prompt for r in trace]
    ceiling = prefix_ceiling(prompts, block_size, shape.tenants * per_tenant, per_tenant)
    if capacity_blocks:
        ceiling = attrs.evolve(
            ceiling,
            capacity_blocks=capacity_blocks,
            capacity_hits=capacity_ceiling(prompts, block_size, capacity_blocks),
        )
    return ceiling


@attrs.frozen
class CachePlan:
    blocks_per_worker: int  # --num-gpu-blocks-override
    prefix_blocks: int  # one worker's share for prefixes: the tenants' system blocks / ratio
    in_flight_blocks: int  # room for its share of the requests in flight, whole
    max_model_len: int


def cache_plan(
    shape: TraceShape,
    block_size: int,
    workers: int,
    concurrency: int,
    cluster_ratio: float,
    override: int | None = None,
) -> CachePlan:
    """Each worker's KV blocks: its share of ``cluster_ratio`` x the tenants' system-prompt
    blocks, plus the private blocks of its share of the requests in flight (a request routed
    with its tenant pins that tenant's system blocks, already counted in the share).

    Tried on 2026-12-04 with 2 workers: a share of 1/2.5 of the prefixes per worker (the issue's
    ratio, which does not fit 2 workers) left no worker room for its half of the tenants, and
    every arm hit about as rarely; a share of 1/2.5 plus room for whole requests in flight let
    one worker keep nearly every prefix, and round-robin hit almost as often as kv.
    """
    system_blocks = shape.tenants * (shape.system_tokens // block_size)
    prefix = math.ceil(cluster_ratio * system_blocks / workers)
    max_len = shape.max_prompt_tokens() + shape.output_tokens
    private = math.ceil((max_len - shape.system_tokens) / block_size) + 1  # +1: a partly shared block
    in_flight = math.ceil(concurrency / workers) * private
    max_model_len = math.ceil(max_len / block_size) * block_size
    # vLLM refuses a cache that cannot hold one request of max_model_len (plus its null block).
    blocks = max(override or prefix + in_flight, max_model_len // block_size + 2)
    return CachePlan(blocks, prefix, in_flight, max_model_len)


def self_check() -> None:
    """Cheap checks of the pure parts (milliseconds); raises AssertionError."""
    # The ceiling on a hand-made trace, block size 4.
    a = list(range(3, 15))  # 12 tokens: 3 full blocks
    c = prefix_ceiling([a, a, a[:8] + [99, 98, 97], a + [5]], 4)
    # a: nothing cached; a again: 2 blocks (the third would hold the last token); a[:8]+3: 2
    # blocks; a+[5]: 3 blocks (13 tokens, 12 usable).
    assert (c.hits, c.queries, c.distinct_blocks) == (0 + 8 + 8 + 12, 12 + 12 + 11 + 13, 3), c
    # A cache of 3 blocks for a, b, b, a (2 usable blocks each): b evicts one block of a, the
    # child, so the second a still hits its first block; 4 blocks keep everything.
    a, b = list(range(3, 12)), list(range(20, 29))
    assert capacity_ceiling([a, b, b, a], 4, 3) == 0 + 0 + 8 + 4
    assert capacity_ceiling([a, b, b, a], 4, 4) == prefix_ceiling([a, b, b, a], 4).hits == 16
    # Belady keeps what comes back: with room for 5, c evicts b (never needed again), not a
    # (the oldest, which LRU would evict).
    c = list(range(40, 49))
    assert capacity_ceiling([a, b, c, a], 4, 5) == 8
    shape = TraceShape(tenants=3, users_per_tenant=2, turns=3, system_tokens=32, user_tokens=5, reply_tokens=7)
    trace = make_trace(shape)
    assert trace == make_trace(shape), "the trace must be deterministic"
    assert len(trace) == 3 * 2 * 3 and max(len(r.prompt) for r in trace) == shape.max_prompt_tokens()
    by_user: dict[int, list[TraceRequest]] = {}
    for r in trace:
        by_user.setdefault(r.user, []).append(r)
    for turns in by_user.values():
        assert [t.turn for t in turns] == [0, 1, 2], "a user's turns go in order"
        for earlier, later in itertools.pairwise(turns):
            assert later.prompt[: len(earlier.prompt)] == earlier.prompt, "a turn extends the previous prompt"
    hot = make_trace(shape, hot=True)
    share = sum(r.tenant == 0 for r in hot) / len(hot)
    assert share == 0.5, share
    assert not {r.prompt[:32] for r in hot} & {r.prompt[:32] for r in trace}, "hot and main share no prefix"
    # With block size 16 every system prompt is 2 full blocks; the ceiling covers at least every
    # request's system prompt but the first of each tenant.
    ceiling = trace_ceiling(trace, shape, 16)
    assert ceiling.hits >= (len(trace) - shape.tenants) * 32 and ceiling.rate < 1, ceiling
    assert ceiling.system_hits == (len(trace) - shape.tenants) * 32, ceiling
    # The causes of prediction misses (block size 32, a 1,088-token prompt: 33 usable blocks).
    line = {"block_size": 32, "prompt_tokens": 1088, "indexed_blocks": 32, "in_flight_blocks": 0}
    line |= {"indexed_blocks_at_finish": 32, "predicted_tokens": 1024, "cached_tokens": 1024}
    assert classify_prediction(line) == ("exact", "exact")
    assert classify_prediction({**line, "cached_tokens": 512, "indexed_blocks_at_finish": 16})[0] == (
        "evicted_after_decision"
    )
    assert classify_prediction({**line, "cached_tokens": 512})[0] == "lower_unexplained"
    evicted = {**line, "cached_tokens": 512, "min_indexed_blocks": 16}
    assert classify_prediction(evicted)[0] == "evicted_after_decision"
    assert classify_prediction({**line, "indexed_blocks": 0, "in_flight_blocks": 32}) == ("exact", "in_flight_prefix")
    assert classify_prediction({**line, "indexed_blocks": 0, "predicted_tokens": 0})[0] == "stored_after_decision"
    whole = {**line, "indexed_blocks": 34, "indexed_blocks_at_finish": 34, "predicted_tokens": 1056}
    assert classify_prediction({**whole, "cached_tokens": 1056}) == ("exact", "last_token")
    assert classify_prediction({**line, "cached_tokens": None}) == ("no_report", "no_report")
    assert prediction_summary([line, {**whole, "cached_tokens": 1056}])["index_only"] == {"exact": 1, "last_token": 1}


# ---- the router's predictions, request by request (pure) -----------------------------------------


def classify_prediction(p: dict[str, Any]) -> tuple[str, str]:
    """Why one request's predicted cached tokens differ from the engine's: (the router's
    prediction, the index alone's), from one line of the frontend's ``DYN_KV_PREDICTION_LOG``.

    ``exact``; ``last_token`` (the whole prompt held, but the engine never counts the prompt's
    last token, so a prompt of whole blocks hits one block less); ``in_flight_prefix`` (more
    cached than the index knew, and a request in flight on that worker had that prefix: it stored
    it first); ``stored_after_decision`` (more cached, and the blocks reached the index after the
    decision from elsewhere: events still on their way); ``evicted_after_decision`` (less cached,
    and the index lost the blocks between the decision and the request's finish,
    ``min_indexed_blocks``: the engine evicted them under cache pressure, after the decision or
    just before it with the event on its way; the request stores them again when it runs, so the
    index at its finish may hold them); ``forecast_kept`` (more cached, and the index held the
    blocks at the decision: the eviction forecast, :mod:`dynamo_worker.frontend.kv_forecast`,
    said evicted what the engine kept); ``lower_unexplained`` / ``higher_unexplained``;
    ``no_report`` (the engine reported no count).
    """
    actual = p.get("cached_tokens")
    if actual is None:
        return "no_report", "no_report"
    bs = p["block_size"]
    usable = max(0, p["prompt_tokens"] - 1) // bs

    def why(predicted: int) -> str:
        if actual == predicted:
            return "exact"
        if actual < predicted:
            if p["indexed_blocks"] > usable and actual == usable * bs:
                return "last_token"
            low = min(p.get("min_indexed_blocks", p["indexed_blocks"]), p["indexed_blocks_at_finish"])
            if min(low, usable) * bs < predicted:
                return "evicted_after_decision"
            return "lower_unexplained"
        if p.get("forecast_evicted_blocks") and min(p["indexed_blocks"], usable) * bs >= actual:
            return "forecast_kept"
        if min(p["in_flight_blocks"], usable) * bs >= actual:
            return "in_flight_prefix"
        if min(p["indexed_blocks_at_finish"], usable) * bs >= actual:
            return "stored_after_decision"
        return "higher_unexplained"

    return why(p["predicted_tokens"]), why(p["indexed_blocks"] * bs)


def prediction_summary(lines: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Counts of :func:`classify_prediction`'s causes over one trace, for the router and for the
    index alone (the router before it counted requests in flight and the last-token rule)."""
    router: dict[str, int] = {}
    index_only: dict[str, int] = {}
    for p in lines:
        mine, theirs = classify_prediction(p)
        router[mine] = router.get(mine, 0) + 1
        index_only[theirs] = index_only.get(theirs, 0) + 1
    return {"requests": len(lines), "router": router, "index_only": index_only}


# ---- scraping Prometheus text ------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, timeout: float = 10.0) -> Samples:
    """Every sample of a ``/metrics`` page, keyed by (sample name, sorted labels)."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    return sum(
        v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == w for k, w in labels.items())
    )


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, ls), v in samples.items():
        if n == name:
            key = dict(ls).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def bucket_deltas(before: Samples, after: Samples, name: str) -> list[tuple[float, float]]:
    """A histogram's cumulative buckets over an interval: [(upper bound, count), ...] ascending."""
    counts: dict[float, float] = {}
    for key, value in after.items():
        if key[0] == f"{name}_bucket":
            bound = float(dict(key[1])["le"])
            counts[bound] = counts.get(bound, 0.0) + value - before.get(key, 0.0)
    return sorted(counts.items())


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The upper bound of the bucket holding quantile ``q`` (buckets give no finer answer)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    return next(bound for bound, count in buckets if count >= rank)


# ---- the stack ---------------------------------------------------------------------------------


class KvStack(DynamoUp):
    """``dynamo-worker up`` with one arm's router flags, ``workers`` decode workers and the
    benchmark's engine flags (the cache size among them)."""

    def __init__(
        self,
        arm: str,
        model: str,
        work_root: Path,
        log: Any,
        *,
        workers: int,
        engine_flags: Sequence[str],
        source: Path | None = None,
    ) -> None:
        self.side = arm  # names the log and temp directories
        self.arm_flags = ARMS[arm]
        self.workers = workers
        self.engine_flags = tuple(engine_flags)
        super().__init__(model, work_root, log, source=source)
        # The frontend appends each routed request's prediction and the engine's answer here.
        self.predictions = self.log_dir / "predictions.jsonl"
        self.extra_env = {**self.extra_env, **ARM_ENV.get(arm, {}), PREDICTION_LOG_ENV: str(self.predictions)}

    def prediction_offset(self) -> int:
        return self.predictions.stat().st_size if self.predictions.exists() else 0

    def predictions_since(self, offset: int) -> list[dict[str, Any]]:
        if not self.predictions.exists():
            return []
        with open(self.predictions, "rb") as f:
            f.seek(offset)
            return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]

    def argv(self) -> list[str]:
        return [
            python(),
            "-m",
            "dynamo_worker",
            "up",
            "--model",
            self.model,
            "--served-model-name",
            SERVED_NAME,
            "--decode-workers",
            str(self.workers),
            "--request-plane",
            "tcp",
            *self.arm_flags,
            "--http-port",
            str(self.port),
            "--log-dir",
            str(self.log_dir / "stack"),
            *self.engine_flags,
        ]

    def worker_urls(self) -> dict[str, str]:
        """``{decode-i: http://127.0.0.1:PORT}``: each decode worker's status server."""
        return {
            name: f"http://127.0.0.1:{info['system_port']}"
            for name, info in sorted(self.stack().items())
            if name.startswith("decode-") and info.get("system_port")
        }

    def wait_workers(self, timeout: float) -> None:
        """Until every decode worker reports healthy: ``up`` is ready when the first one serves."""
        deadline = time.monotonic() + timeout
        while True:
            urls = self.worker_urls()
            healthy = 0
            for url in urls.values():
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                        healthy += json.load(resp).get("status") == "healthy"
                except (OSError, urllib.error.URLError, ValueError):
                    pass
            if healthy == self.workers:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerFailed(f"{self.side}: up exited with {self.proc.returncode}; see {self.log_dir}")
            if time.monotonic() > deadline:
                raise ServerFailed(
                    f"{self.side}: {healthy} of {self.workers} decode workers healthy after "
                    f"{timeout:.0f}s; see {self.log_dir}"
                )
            time.sleep(0.5)

    def snapshot(self) -> dict[str, Any]:
        return {
            "frontend": scrape(f"{self.base_url}/metrics"),
            "workers": {name: scrape(f"{url}/metrics") for name, url in self.worker_urls().items()},
        }


# ---- one arm ------------------------------------------------------------------------------------


@attrs.frozen
class Plan:
    shape: TraceShape
    workers: int
    concurrency: int
    block_size: int
    cluster_ratio: float
    variants: tuple[str, ...]
    arms: tuple[str, ...]
    rounds: int
    max_seconds: float  # per trace: no new request after this long
    request_timeout: float
    startup_timeout: float
    foreign_wait: float
    client_priority: str


def _load(
    server: KvStack,
    prompts: Sequence[Sequence[int]],
    plan: Plan,
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    max_seconds: float,
) -> LevelRun:
    return asyncio.run(
        run_level(
            server.base_url,
            SERVED_NAME,
            [list(p) for p in prompts],
            concurrency=concurrency,
            requests=requests,
            max_tokens=max_tokens,
            max_seconds=max_seconds,
            request_timeout=plan.request_timeout,
        )
    )


def _generate_requests(snap: dict[str, Any]) -> dict[str, float]:
    return {
        name: total(s, "dynamo_component_requests_total", dynamo_endpoint="generate")
        for name, s in snap["workers"].items()
    }


def warm_up(server: KvStack, plan: Plan, log: Any) -> dict[str, Any]:
    """Short random prompts (no prefix shared with the trace) until every worker has served some."""
    before = _generate_requests(server.snapshot())
    prompts = make_prompts(8 * plan.workers, plan.shape.user_tokens * 2, seed=12345)
    run = _load(
        server,
        prompts,
        plan,
        concurrency=2 * plan.workers,
        requests=len(prompts),
        max_tokens=plan.shape.output_tokens,
        max_seconds=120,
    )
    after = _generate_requests(server.snapshot())
    served = {name: after[name] - before.get(name, 0.0) for name in after}
    summary = report.summarize_run(run)
    if summary["completed"] == 0:
        raise RuntimeError(f"{server.side}: every warm-up request failed: {summary['first_errors']}")
    if min(served.values(), default=0) == 0:
        log(f"  warning: a worker served no warm-up request: {served}")
    return {"completed": summary["completed"], "errors": summary["errors"], "per_worker": served}


def prefill_probe(server: KvStack, plan: Plan) -> dict[str, Any]:
    """What a prefix costs: one turn-0-length prompt, one at a time, to every worker cold, then
    again (cached but for its last block). Round-robin only: W consecutive requests reach W workers."""
    prompt = make_prompts(1, plan.shape.system_tokens + plan.shape.user_tokens, seed=54321)
    run = _load(server, prompt, plan, concurrency=1, requests=2 * plan.workers, max_tokens=1, max_seconds=120)
    ttfts = [r.ttft * 1000 for r in sorted(run.requests, key=lambda r: r.index) if r.ok and r.ttft is not None]
    cold, warm = ttfts[: plan.workers], ttfts[plan.workers :]
    return {
        "prompt_tokens": len(prompt[0]),
        "cold_ttft_ms": [round(t, 2) for t in cold],
        "cached_ttft_ms": [round(t, 2) for t in warm],
    }


def measure(server: KvStack, trace: list[TraceRequest], ceiling: Ceiling, plan: Plan, log: Any) -> dict[str, Any]:
    """Send the trace once; its figures from the client and from counter differences."""
    labels = server.labelled_pids()
    before = server.snapshot()
    predictions_from = server.prediction_offset()
    foreign = machine.foreign_engines(labels)
    meter = machine.CpuMeter(labels)
    meter.start()
    with machine.client_priority(plan.client_priority) as priority:
        run = _load(
            server,
            [r.prompt for r in trace],
            plan,
            concurrency=plan.concurrency,
            requests=len(trace),
            max_tokens=plan.shape.output_tokens,
            max_seconds=plan.max_seconds,
        )
    cpu = meter.stop(run.client_cpu)
    after = server.snapshot()
    predictions = server.predictions_since(predictions_from)
    s = report.summarize_run(run)

    def delta(name: str, side: str = "workers", **match: str) -> float:
        if side == "frontend":
            return total(after["frontend"], name, **match) - total(before["frontend"], name, **match)
        return sum(
            total(after["workers"][w], name, **match) - total(before["workers"].get(w, {}), name, **match)
            for w in after["workers"]
        )

    hits, queries = delta("vllm:prefix_cache_hits_total"), delta("vllm:prefix_cache_queries_total")
    per_worker = {
        w: total(after["workers"][w], "dynamo_component_requests_total", dynamo_endpoint="generate")
        - total(before["workers"].get(w, {}), "dynamo_component_requests_total", dynamo_endpoint="generate")
        for w in after["workers"]
    }
    worker_hits = {
        w: (
            total(after["workers"][w], "vllm:prefix_cache_hits_total")
            - total(before["workers"].get(w, {}), "vllm:prefix_cache_hits_total"),
            total(after["workers"][w], "vllm:prefix_cache_queries_total")
            - total(before["workers"].get(w, {}), "vllm:prefix_cache_queries_total"),
        )
        for w in after["workers"]
    }
    hot_ttfts = [r.ttft * 1000 for r in run.requests if r.ok and r.ttft is not None and trace[r.index].tenant == 0]
    figures: dict[str, Any] = {
        "requests": s["requests"],
        "completed": s["completed"],
        "errors": s["errors"],
        "first_errors": s["first_errors"],
        "stopped_by_deadline": s["stopped_by_deadline"],
        "wall_s": s["wall_s"],
        "tok_per_s": s["tok_per_s"],
        "ttft_p50_ms": s["ttft_p50_ms"],
        "ttft_p99_ms": s["ttft_p99_ms"],
        "itl_p50_ms": s["itl_p50_ms"],
        "tenant0_ttft_p99_ms": report.percentile(hot_ttfts, 99),
        "hit_rate": hits / queries if queries else None,
        "hits": hits,
        "queries": queries,
        # A worker whose running requests outgrow its cache preempts (and later recomputes) one.
        "preemptions": delta("vllm:num_preemptions_total"),
        "ceiling": ceiling.rate,
        "capacity_ceiling": ceiling.capacity_rate,
        "per_worker_requests": per_worker,
        "per_worker_hit_rate": {w: (h / q if q else None) for w, (h, q) in worker_hits.items()},
        "cpu": cpu,
        "client_priority": priority,
        "foreign_engines": foreign,
        "client_loop_lag_max_ms": s["client_loop_lag_max_ms"],
    }
    counts = [v for v in per_worker.values()]
    figures["balance"] = max(counts) / min(counts) if counts and min(counts) > 0 else None
    routed = by_label(after["frontend"], "dynamo_frontend_kv_routed_requests_total", "instance")
    if routed:  # the kv arms
        routed_before = by_label(before["frontend"], "dynamo_frontend_kv_routed_requests_total", "instance")
        figures["routed_per_instance"] = {k: v - routed_before.get(k, 0.0) for k, v in routed.items()}
        n_routed = sum(figures["routed_per_instance"].values())
        misses = delta("dynamo_frontend_kv_prediction_misses_total", "frontend")
        figures["routed"] = n_routed
        figures["prediction_misses"] = misses
        figures["prediction_exact"] = 1 - misses / n_routed if n_routed else None
        figures["predicted_cached_tokens"] = delta("dynamo_frontend_kv_predicted_cached_tokens_total", "frontend")
        figures["actual_cached_tokens"] = delta("dynamo_frontend_kv_actual_cached_tokens_total", "frontend")
        decision = bucket_deltas(before["frontend"], after["frontend"], "dynamo_frontend_kv_routing_decision_seconds")
        figures["decision_p99_le_ms"] = None if (q := bucket_quantile(decision, 0.99)) is None else q * 1000
        d_count = delta("dynamo_frontend_kv_routing_decision_seconds_count", "frontend")
        d_sum = delta("dynamo_frontend_kv_routing_decision_seconds_sum", "frontend")
        figures["decision_mean_ms"] = d_sum / d_count * 1000 if d_count else None
        overlap = bucket_deltas(before["frontend"], after["frontend"], "dynamo_frontend_kv_predicted_overlap_blocks")
        if overlap and overlap[-1][1]:
            figures["predicted_overlap_zero_share"] = overlap[0][1] / overlap[-1][1]  # first bucket: le=0
        away_before = by_label(before["frontend"], "dynamo_frontend_kv_away_from_holder_total", "reason")
        away_after = by_label(after["frontend"], "dynamo_frontend_kv_away_from_holder_total", "reason")
        # Requests sent to a worker holding less of their prompt than another, and why.
        figures["away_from_holder"] = {k: v - away_before.get(k, 0.0) for k, v in away_after.items()}
        figures["event_gaps"] = delta("dynamo_frontend_kv_event_gaps_total", "frontend")
        resyncs_before = by_label(before["frontend"], "dynamo_frontend_kv_resyncs_total", "outcome")
        resyncs_after = by_label(after["frontend"], "dynamo_frontend_kv_resyncs_total", "outcome")
        figures["resyncs"] = {k: v - resyncs_before.get(k, 0.0) for k, v in resyncs_after.items()}
        figures["index_blocks"] = total(after["frontend"], "dynamo_frontend_kv_index_blocks")
        figures["prediction_causes"] = prediction_summary(predictions)
        figures["predictions"] = predictions
    figures["raw"] = report.raw_requests(run)
    return figures


def arm_session(
    arm: str,
    round_no: int,
    model: str,
    traces: dict[str, list[TraceRequest]],
    ceilings: dict[str, Ceiling],
    plan: Plan,
    engine_flags: Sequence[str],
    work_root: Path,
    log: Any,
    source: Path | None,
) -> dict[str, Any]:
    server = KvStack(arm, model, work_root, log, workers=plan.workers, engine_flags=engine_flags, source=source)
    session: dict[str, Any] = {"arm": arm, "round": round_no, "log_dir": str(server.log_dir)}
    try:
        session["ready_s"] = round(server.start(plan.startup_timeout), 1)
        server.wait_workers(plan.startup_timeout)
        session["all_workers_s"] = round(time.monotonic() - server.started_at, 1)
        log(
            f"  {arm}: served after {session['ready_s']}s, all {plan.workers} workers healthy after "
            f"{session['all_workers_s']}s"
        )
        session["warmup"] = warm_up(server, plan, log)
        if arm == BASELINE_ARM:
            session["prefill_probe"] = probe = prefill_probe(server, plan)
            log(
                f"  prefill probe ({probe['prompt_tokens']} tokens): cold TTFT {probe['cold_ttft_ms']} ms, "
                f"cached {probe['cached_ttft_ms']} ms"
            )
        for variant in plan.variants:
            started = time.monotonic()
            figures = measure(server, traces[variant], ceilings[variant], plan, log)
            session[variant] = figures
            if figures.get("routed") and figures.get("predicted_cached_tokens") == 0 and figures["hits"]:
                log(
                    "  warning: the router predicted no cached token at all while the engines hit: do the workers "
                    "publish kv_block_size in discovery? (the router assumes 16 otherwise)"
                )
            log(
                f"  {arm} {variant}: {figures['completed']}/{len(traces[variant])} ok in "
                f"{time.monotonic() - started:.0f}s"
                f", hit rate {_pct(figures['hit_rate'])} (ceiling {_pct(figures['ceiling'])}), TTFT p50 "
                f"{_num(figures['ttft_p50_ms'], 1)} ms p99 {_num(figures['ttft_p99_ms'], 1)} ms, "
                f"{_num(figures['tok_per_s'])} tok/s, per worker {_counts(figures['per_worker_requests'])}"
                + f", {figures['preemptions']:.0f} preemptions"
                + (f", prediction exact {_pct(figures.get('prediction_exact'))}" if "routed" in figures else "")
                + f", others {figures['cpu']['other_cores']:.2f} cores"
                + (f", {figures['errors']} errors {figures['first_errors']}" if figures["errors"] else "")
            )
    finally:
        server.stop()
    return session


# ---- the report ---------------------------------------------------------------------------------


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def _counts(per: dict[str, float]) -> str:
    return "/".join(f"{v:.0f}" for _, v in sorted(per.items()))


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def aggregate(sessions: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{variant: {arm: figures}}``; with several rounds, the median of each numeric figure."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for variant in VARIANTS:
        for arm in ARMS:
            runs = [s[variant] for s in sessions if s["arm"] == arm and variant in s]
            if not runs:
                continue
            merged: dict[str, Any] = {"n": len(runs)}
            for key, value in runs[0].items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
                    merged[key] = statistics.median(values) if values else None
                elif key not in ("raw", "predictions"):
                    merged[key] = value if len(runs) == 1 else [r.get(key) for r in runs]
            out.setdefault(variant, {})[arm] = merged
    return out


def table(per_arm: dict[str, dict[str, Any]]) -> str:
    header = (
        "| arm | prefix-cache hit rate (x ceiling, x cluster ceiling) | TTFT p50 ms | TTFT p99 ms "
        "| tenant 0 TTFT p99 ms | output tok/s | requests per worker (max/min) | predicted = actual "
        "| decision p99 | preemptions | errors |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, f in per_arm.items():
        per_worker = f["per_worker_requests"]
        rounds = per_worker if isinstance(per_worker, list) else [per_worker]  # each round's, then the median ratio
        median = " median" if len(rounds) > 1 else ""
        exact = f.get("prediction_exact")
        predicted = "-" if exact is None else f"{_pct(exact)} of {f['routed']:.0f}"
        decision = "-" if f.get("decision_p99_le_ms") is None else f"<= {f['decision_p99_le_ms']:g} ms"
        lines.append(
            f"| {arm} | {_pct(f['hit_rate'])} ({_num(_ratio(f['hit_rate'], f['ceiling']), 2)}x, "
            f"{_num(_ratio(f['hit_rate'], f.get('capacity_ceiling')), 2)}x) "
            f"| {_num(f['ttft_p50_ms'], 1)} | {_num(f['ttft_p99_ms'], 1)} | {_num(f['tenant0_ttft_p99_ms'], 1)} "
            f"| {_num(f['tok_per_s'])} | {', '.join(_counts(r) for r in rounds)} ({_num(f['balance'], 2)}x{median}) "
            f"| {predicted} | {decision} | {_num(f.get('preemptions'))} | {f['errors']} |"
        )
    return "\n".join(lines)


def targets(agg: dict[str, dict[str, dict[str, Any]]], arm: str) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when not measurable, the figures) for one kv arm against round-robin."""
    out: list[tuple[str, bool | None, str]] = []
    main, hot = agg.get("main", {}), agg.get("hot", {})
    k, rr = main.get(arm), main.get(BASELINE_ARM)

    def add(name: str, value: float | None, target: float, higher: bool, detail: str) -> None:
        met = None if value is None else (value >= target if higher else value <= target)
        out.append((name, met, f"{_num(value, 2)}x ({detail})"))

    if k:
        add(
            f"hit rate >= {HIT_OF_CEILING_TARGET}x ceiling",
            _ratio(k["hit_rate"], k["ceiling"]),
            HIT_OF_CEILING_TARGET,
            True,
            f"{_pct(k['hit_rate'])} of {_pct(k['ceiling'])}, an infinite cache's",
        )
        add(
            f"hit rate >= {HIT_OF_CEILING_TARGET}x the cluster's ceiling",
            _ratio(k["hit_rate"], k.get("capacity_ceiling")),
            HIT_OF_CEILING_TARGET,
            True,
            f"{_pct(k['hit_rate'])} of {_pct(k.get('capacity_ceiling'))}, one cache of every worker's blocks, "
            "perfect eviction",
        )
        add(f"busiest worker <= {BALANCE_TARGET}x quietest", k["balance"], BALANCE_TARGET, False, "main trace")
        exact = k.get("prediction_exact")
        out.append(
            (
                f"predicted == actual for >= {PREDICTION_TARGET:.0%} of requests",
                None if exact is None else exact >= PREDICTION_TARGET,
                f"{_pct(exact)} ({k.get('prediction_misses', 0):.0f} misses of {k.get('routed', 0):.0f})",
            )
        )
    if k and rr:
        add(
            f"hit rate >= {HIT_VS_RR_TARGET}x round-robin's",
            _ratio(k["hit_rate"], rr["hit_rate"]),
            HIT_VS_RR_TARGET,
            True,
            f"{_pct(k['hit_rate'])} vs {_pct(rr['hit_rate'])}",
        )
        add(
            f"TTFT p50 >= {TTFT_P50_TARGET}x lower",
            _ratio(rr["ttft_p50_ms"], k["ttft_p50_ms"]),
            TTFT_P50_TARGET,
            True,
            f"{_num(k['ttft_p50_ms'], 1)} vs {_num(rr['ttft_p50_ms'], 1)} ms",
        )
        add(
            f"output tok/s >= {TOKS_TARGET}x",
            _ratio(k["tok_per_s"], rr["tok_per_s"]),
            TOKS_TARGET,
            True,
            f"{_num(k['tok_per_s'])} vs {_num(rr['tok_per_s'])}",
        )
    kh, rrh = hot.get(arm), hot.get(BASELINE_ARM)
    if kh:
        add(
            f"hot variant: busiest worker <= {BALANCE_TARGET}x quietest",
            kh["balance"],
            BALANCE_TARGET,
            False,
            "hot trace",
        )
    if kh and rrh:
        add(
            "hot variant: TTFT p99 no worse than round-robin's",
            _ratio(kh["ttft_p99_ms"], rrh["ttft_p99_ms"]),
            1.0,
            False,
            f"{_num(kh['ttft_p99_ms'], 1)} vs {_num(rrh['ttft_p99_ms'], 1)} ms",
        )
    return out


def render(result: dict[str, Any]) -> str:
    agg = result["summary"]
    lines = []
    for variant, per_arm in agg.items():
        ceiling = result["ceilings"][variant]
        title = (
            f"### {variant} trace: {ceiling['requests']} requests, ceiling {_pct(ceiling['rate'])} "
            f"({_pct(ceiling.get('system_rate'))} from system prompts alone; "
            f"{_pct(ceiling.get('capacity_rate'))} for one cache of the cluster's {ceiling.get('capacity_blocks')} "
            "blocks with perfect eviction)"
        )
        lines += [title, "", table(per_arm), ""]
        rr = per_arm.get(BASELINE_ARM)
        for arm, f in per_arm.items():
            if arm == BASELINE_ARM or not rr:
                continue
            lines.append(
                f"- {arm} / round-robin: hit rate {_num(_ratio(f['hit_rate'], rr['hit_rate']), 2)}x, "
                f"TTFT p50 {_num(_ratio(rr['ttft_p50_ms'], f['ttft_p50_ms']), 2)}x lower, "
                f"TTFT p99 {_num(_ratio(rr['ttft_p99_ms'], f['ttft_p99_ms']), 2)}x lower, "
                f"output tok/s {_num(_ratio(f['tok_per_s'], rr['tok_per_s']), 2)}x"
                + (
                    f"; routed to a worker predicted to hold nothing: "
                    f"{_pct(f.get('predicted_overlap_zero_share'))}; cached tokens predicted "
                    f"{_num(f.get('predicted_cached_tokens'))}, reported by the engines "
                    f"{_num(f.get('actual_cached_tokens'))}; event gaps {_num(f.get('event_gaps'))}; "
                    f"sent away from a worker holding more, by reason: {f.get('away_from_holder') or {}}; "
                    f"prediction misses by cause: {f.get('prediction_causes') or {}}"
                    if f.get("routed")
                    else ""
                )
            )
        lines.append("")
    for arm in [a for a in ARMS if a != BASELINE_ARM]:
        checks = targets(agg, arm)
        if checks:
            lines.append(f"Targets, {arm} against round-robin:")
            for name, met, detail in checks:
                lines.append(f"  [{'MET' if met else 'missed' if met is False else 'n/a'}] {name}: {detail}")
            lines.append("")
    return "\n".join(lines)


# ---- the command --------------------------------------------------------------------------------


def bench_model(layers: int, hidden: int, max_positions: int, log: Any) -> str:
    """The generated model for this benchmark, written once into the user cache beside the demo model."""
    from dynamo_worker.demo_model import default_demo_model_dir, write_demo_model

    path = default_demo_model_dir().parent / f"kv-bench-model-l{layers}-h{hidden}-p{max_positions}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        try:
            marker = json.loads((path / "dynamo_demo_model.json").read_text())
        except (OSError, ValueError):
            marker = {}
        if (marker.get("layers"), marker.get("hidden"), marker.get("max_positions")) != (layers, hidden, max_positions):
            log(f"writing the benchmark model ({layers} layers, hidden {hidden}, {max_positions} positions) to {path}")
            write_demo_model(path, seed=0, layers=layers, hidden=hidden, max_positions=max_positions)
    return str(path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.kv_routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a short smoke run (under 5 minutes): a smaller trace")
    p.add_argument(
        "--workers", type=int, default=2, choices=(2, 3), help="decode workers per arm (default %(default)s)"
    )
    p.add_argument(
        "--arms",
        default=",".join(DEFAULT_ARMS),
        help=f"which arms, in order, from {','.join(ARMS)} (default %(default)s)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help="main, hot or both (default %(default)s)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="sessions per arm, order reversed every other round "
        "(default %(default)s; figures are medians over rounds)",
    )
    d = TraceShape()
    p.add_argument("--tenants", type=int, default=d.tenants, help="(default %(default)s)")
    p.add_argument(
        "--users",
        type=int,
        help=f"users per tenant (default {d.users_per_tenant}, quick {QUICK_SHAPE.users_per_tenant})",
    )
    p.add_argument("--turns", type=int, help=f"turns per user (default {d.turns}, quick {QUICK_SHAPE.turns})")
    p.add_argument(
        "--system-tokens",
        type=int,
        help=f"system prompt length (default {d.system_tokens}, quick {QUICK_SHAPE.system_tokens})",
    )
    p.add_argument(
        "--output-tokens",
        type=int,
        help=f"tokens generated per request (default {d.output_tokens}, quick {QUICK_SHAPE.output_tokens})",
    )
    p.add_argument("--seed", type=int, default=0, help="trace seed (default %(default)s)")
    p.add_argument(
        "--concurrency",
        type=int,
        help="requests in flight (default: one per worker, below saturation; 8 kept 3 workers' engines saturated "
        "on 2 cores, where a hit's TTFT is the wait for the engine, not its prefill)",
    )
    # 32: vLLM's CPU attention takes multiples of 32 only. The router reads it from discovery
    # (kv_block_size); a worker that publishes none is assumed to use 16 and would never match.
    p.add_argument(
        "--block-size",
        type=int,
        default=32,
        help="the engines' KV block size (default %(default)s, the smallest vLLM's CPU attention takes)",
    )
    p.add_argument(
        "--cluster-ratio",
        type=float,
        default=1.25,
        help="the cluster's KV room for prefixes, in multiples of all tenants' system prompts, split "
        "evenly over the workers (default %(default)s: they fit the cluster, not one worker)",
    )
    p.add_argument(
        "--kv-eviction",
        choices=EVICTION_POLICIES,
        default="active-inactive",
        help="every arm's workers' --kv-eviction (default %(default)s: reused prefixes outlive one-off "
        "blocks; lru: vLLM's own, as every run before 2026-12-07's second session)",
    )
    p.add_argument(
        "--cache-blocks",
        type=int,
        help="each worker's KV blocks, instead of the size --cluster-ratio gives (for experiments)",
    )
    p.add_argument("--layers", type=int, default=4, help="generated model's layers (default %(default)s)")
    p.add_argument("--hidden", type=int, default=512, help="generated model's hidden size (default %(default)s)")
    p.add_argument(
        "--max-seconds", type=float, help="per trace, no new request after this long (default 600, quick 120)"
    )
    p.add_argument(
        "--foreign-wait",
        type=float,
        default=120.0,
        help="before each arm, wait at most this long for vLLM engines we did not start (default %(default)s)",
    )
    p.add_argument(
        "--client-priority",
        choices=("realtime", "nice", "normal"),
        default="realtime",
        help="the load client's scheduling during traces (default %(default)s)",
    )
    p.add_argument(
        "--dynamo-ref",
        default="worktree",
        help="git ref of dynamo_worker/ to measure, exported once; 'worktree' (default) uses the live files",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    p.add_argument("--self-check", action="store_true", help="only check the trace and ceiling code, then exit")
    return p.parse_args(argv)


def plan_from(args: argparse.Namespace) -> Plan:
    base = QUICK_SHAPE if args.quick else TraceShape()
    shape = attrs.evolve(
        base,
        tenants=args.tenants,
        seed=args.seed,
        **{
            k: v
            for k, v in (
                ("users_per_tenant", args.users),
                ("turns", args.turns),
                ("system_tokens", args.system_tokens),
                ("output_tokens", args.output_tokens),
            )
            if v is not None
        },
    )
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if set(arms) - set(ARMS) or set(variants) - set(VARIANTS) or not arms or not variants:
        raise SystemExit(f"error: --arms from {','.join(ARMS)}, --variants from {','.join(VARIANTS)}")
    concurrency = args.workers if args.concurrency is None else args.concurrency
    if shape.tenants < 2 or shape.turns < 1 or shape.users_per_tenant < 1 or concurrency < 1:
        raise SystemExit("error: at least 2 tenants, 1 user, 1 turn and concurrency 1")
    return Plan(
        shape=shape,
        workers=args.workers,
        concurrency=concurrency,
        block_size=args.block_size,
        cluster_ratio=args.cluster_ratio,
        variants=variants,
        arms=arms,
        rounds=max(1, args.rounds),
        max_seconds=args.max_seconds or (120.0 if args.quick else 600.0),
        request_timeout=120.0,
        startup_timeout=300.0,
        foreign_wait=args.foreign_wait,
        client_priority=args.client_priority,
    )


def main(argv: list[str] | None = None) -> int:
    run_benchmark(sys.argv[1:] if argv is None else argv)
    return 0


def run_benchmark(argv: list[str]) -> Path | None:
    """Run the benchmark; its results file (None with ``--self-check``)."""
    args = parse_args(argv)
    self_check()
    if args.self_check:
        print("self-check passed")
        return None
    plan = plan_from(args)
    run = start_run(args.out, "kv-routing-")
    stamp, work_root, log = run.stamp, run.work_root, run.log
    t0 = time.monotonic()

    shape = plan.shape
    if shape.max_prompt_tokens() + shape.output_tokens > MODEL_POSITIONS:
        raise SystemExit(f"error: the longest prompt plus output must fit the model's {MODEL_POSITIONS} positions")
    model = bench_model(args.layers, args.hidden, MODEL_POSITIONS, log)
    traces = {v: make_trace(shape, hot=(v == "hot")) for v in plan.variants}
    cache = cache_plan(shape, plan.block_size, plan.workers, plan.concurrency, plan.cluster_ratio, args.cache_blocks)
    # vLLM keeps one block of each worker's pool out of use (its null block).
    cluster_blocks = (cache.blocks_per_worker - 1) * plan.workers
    ceilings = {v: trace_ceiling(t, shape, plan.block_size, cluster_blocks) for v, t in traces.items()}
    engine_flags = [
        "--enforce-eager",
        "--max-model-len",
        str(cache.max_model_len),
        "--block-size",
        str(plan.block_size),
        "--num-gpu-blocks-override",
        str(cache.blocks_per_worker),
        "--kv-eviction",
        args.kv_eviction,
    ]
    for v, t in traces.items():
        gaps = turn_gaps(t)
        median_gap = _num(statistics.median(gaps) if gaps else None)
        log(
            f"{v} trace: {len(t)} requests, {len({r.user for r in t})} users, prompts "
            f"{min(len(r.prompt) for r in t)}-{max(len(r.prompt) for r in t)} tokens, ceiling "
            f"{_pct(ceilings[v].rate)} ({_pct(ceilings[v].system_rate)} from system prompts alone; "
            f"{_pct(ceilings[v].capacity_rate)} with the cluster's {cluster_blocks} blocks), "
            f"{ceilings[v].distinct_blocks} distinct blocks; a user's next turn "
            f"comes {min(gaps, default=0)}+ requests after its previous one (median {median_gap})"
        )
        if gaps and min(gaps) < 2 * plan.concurrency:
            log(
                f"  note: some turns follow their previous turn within 2x the concurrency ({plan.concurrency}): "
                "that turn may be sent before the previous answer is complete"
            )
    log(
        f"KV cache per worker: {cache.blocks_per_worker} blocks of {plan.block_size} tokens "
        + (
            "(--cache-blocks)"
            if args.cache_blocks
            else f"({cache.prefix_blocks} for prefixes: {plan.cluster_ratio} x the "
            f"{ceilings[plan.variants[0]].system_blocks} system-prompt blocks / {plan.workers} workers; "
            f"{cache.in_flight_blocks} for the private blocks of its share of the requests in flight)"
        )
        + f"; evicted by {args.kv_eviction}; model {model}"
    )
    info = machine.machine_info()
    source = measured_source(args.dynamo_ref, work_root, info, log)
    json_path = args.out / f"kv-routing-{stamp}.json"
    result: dict[str, Any] = {
        "command": "python -m benchmarks.kv_routing " + " ".join(argv),
        "timestamp": stamp,
        "machine": info,
        "plan": attrs.asdict(plan),
        "cache": attrs.asdict(cache),
        "engine_flags": engine_flags,
        "env": BENCH_ENV,
        "model": {"path": model, "layers": args.layers, "hidden": args.hidden, "max_positions": MODEL_POSITIONS},
        "ceilings": {
            v: {
                **attrs.asdict(c),
                "rate": c.rate,
                "system_rate": c.system_rate,
                "capacity_rate": c.capacity_rate,
                "requests": len(traces[v]),
            }
            for v, c in ceilings.items()
        },
        "sessions": [],
    }
    for round_no in range(plan.rounds):
        order = list(plan.arms) if round_no % 2 == 0 else list(reversed(plan.arms))
        for arm in order:
            waited = machine.wait_for_quiet(plan.foreign_wait, 15.0, log)
            if not waited["quiet"]:
                log(f"  note: starting {arm} beside other work after waiting {waited['waited_s']}s")
            env = " ".join(f"{k}={v}" for k, v in ARM_ENV.get(arm, {}).items())
            log(f"round {round_no + 1}: {arm} ({' '.join(ARMS[arm])}{' with ' + env if env else ''})")
            session = arm_session(arm, round_no, model, traces, ceilings, plan, engine_flags, work_root, log, source)
            session["foreign_before"] = waited
            result["sessions"].append(session)
            report.write_json(json_path, {**result, "partial": True})  # an interrupted run keeps what it measured
    result["summary"] = aggregate(result["sessions"])
    result["elapsed_s"] = round(time.monotonic() - t0, 1)
    print()
    probe = next((s["prefill_probe"] for s in result["sessions"] if "prefill_probe" in s), None)
    if probe:
        print(
            f"Prefix cost: a {probe['prompt_tokens']}-token prompt, TTFT cold {probe['cold_ttft_ms']} ms, "
            f"cached {probe['cached_ttft_ms']} ms\n"
        )
    print(render(result))
    report.write_json(json_path, result)
    print(f"results: {json_path}  ({result['elapsed_s'] / 60:.1f} min)")
    return json_path


if __name__ == "__main__":
    raise SystemExit(main())
