"""``--router-mode kv``: send each request to the worker that already caches most of its prefix,
weighed against that worker's load.

The frontend keeps its own index of every worker's cached blocks (:mod:`.kv_index`), fed by the
``kv_events`` the decode workers relay from vLLM, and its own view of their load (:mod:`.kv_cost`),
fed by the requests it routes and by the workers' ``load_metrics``. Per request: hash the
prompt's blocks (the router's own chained hash), ask the index how many leading blocks each
worker holds, and pick the lowest ``overlap_weight * new_prefill_blocks + decode_blocks``.

What keeps the index honest:

* every worker's batches carry an event id (``seq``); a gap (a lost batch, a batch chained onto
  a block the index never saw, the first batch seen after this frontend started) makes the
  frontend fetch that worker's block set from its ``kv_blocks`` endpoint and rebuild the
  worker's entry (one fetch at a time per instance, at most one per ``RESYNC_INTERVAL``);
* an instance that leaves discovery is dropped from the index and the load view at once; events
  from an instance discovery does not list are ignored (a late batch would bring it back);
* a worker that publishes no events (prefix caching off, or not a vLLM worker) is routed by load
  alone, and the log says so once.
* evictions the engine has yet to make are forecast (:mod:`.kv_forecast`): a prefix the requests
  routed just before this one will evict on their worker is neither predicted nor weighed there.

With ``--no-kv-events`` the index is the router's own record of what it routed where, with a TTL
and at most each worker's KV capacity (:class:`.kv_index.ApproxIndex`): for engines that publish
no events.

One :class:`KvRouting` routes one endpoint: the decode workers' ``backend.generate``, and in
disaggregated serving a second one the prefill workers' ``prefill.generate`` (they relay their
KV events on the same topic; each router keeps only its own endpoint's instances). Both share
one :class:`KvRoutingMetrics`, the gauges labelled by component.

Each decision is logged at debug level with every candidate's terms (overlap, the router's own
count of its load, the published load, busy, cost); a request sent away from a worker holding
more of its prompt is counted by reason (``dynamo_frontend_kv_away_from_holder_total``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynamo_worker.core.discovery import InstanceRecord
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Client
from dynamo_worker.frontend.kv_cost import BALANCE_ABS, BALANCE_REL, ActiveLoad, Decision, KvSelector, expected_blocks
from dynamo_worker.frontend.kv_forecast import FOREIGN_BLOCKS, EvictionForecast
from dynamo_worker.frontend.kv_index import ApproxIndex, KvIndex, WorkerKey, prompt_hashes

log = logging.getLogger(__name__)

KV_EVENTS_TOPIC = "kv_events"  # dynamo_worker.engine.kv_events.TOPIC (not imported: it is the worker's side)
LOAD_TOPIC = "load_metrics"
SNAPSHOT_ENDPOINT = "kv_blocks"
#: The block size assumed for a worker that publishes none (it is routed by load alone anyway).
DEFAULT_BLOCK_SIZE = 16
#: Seconds between two snapshot fetches of one instance (a worker whose events keep gapping
#: must not be asked for its whole cache on every batch).
RESYNC_INTERVAL = 1.0
RESYNC_TIMEOUT = 10.0
#: Diagnostics: a file to append one JSON line per routed request to (the prediction against the
#: engine's cached tokens, see :meth:`KvRouting.finished`); unset, nothing is written.
PREDICTION_LOG_ENV = "DYN_KV_PREDICTION_LOG"

_DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
_BLOCK_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class KvRoutingMetrics:
    """The router's own metrics on the frontend's ``/metrics``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.decision_seconds = Histogram(
            "dynamo_frontend_kv_routing_decision_seconds",
            "Time to choose a worker by KV overlap and load",
            registry=registry,
            buckets=_DECISION_BUCKETS,
        )
        self.predicted_overlap = Histogram(
            "dynamo_frontend_kv_predicted_overlap_blocks",
            "Prompt blocks predicted cached on the chosen worker",
            registry=registry,
            buckets=_BLOCK_BUCKETS,
        )
        self.routed = Counter(
            "dynamo_frontend_kv_routed_requests",
            "Requests routed by KV overlap, per worker",
            ("instance", "dp_rank"),
            registry=registry,
        )
        self.index_blocks = Gauge(
            "dynamo_frontend_kv_index_blocks",
            "Cached blocks in the router's index (over every worker)",
            ("component",),
            registry=registry,
        )
        self.index_workers = Gauge(
            "dynamo_frontend_kv_index_workers",
            "Workers (instance, dp rank) in the router's index",
            ("component",),
            registry=registry,
        )
        self.away_from_holder = Counter(
            "dynamo_frontend_kv_away_from_holder",
            "Requests routed to a worker holding less of their prompt "
            "than another, by reason (busy, balance, load, published_load, sampled)",
            ("reason",),
            registry=registry,
        )
        self.event_gaps = Counter(
            "dynamo_frontend_kv_event_gaps",
            "KV event gaps seen (lost batches, unknown parents, first contact)",
            registry=registry,
        )
        self.resyncs = Counter(
            "dynamo_frontend_kv_resyncs",
            "Workers' block sets fetched to rebuild the index, by outcome",
            ("outcome",),
            registry=registry,
        )
        self.predicted_tokens = Counter(
            "dynamo_frontend_kv_predicted_cached_tokens", "Prompt tokens the router predicted cached", registry=registry
        )
        self.actual_tokens = Counter(
            "dynamo_frontend_kv_actual_cached_tokens",
            "Prompt tokens the engines reported cached "
            "(usage.prompt_tokens_details.cached_tokens) for requests routed by KV overlap",
            registry=registry,
        )
        self.prediction_misses = Counter(
            "dynamo_frontend_kv_prediction_misses",
            "Requests whose cached tokens differed from the prediction",
            registry=registry,
        )


class KvRouting:
    """The KV-aware choice among the instances of one endpoint (``backend.generate``)."""

    def __init__(
        self,
        client: Client,
        *,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        busy_threshold: float | None = 0.9,
        balance_requests: float | None = BALANCE_ABS,
        balance_ratio: float = BALANCE_REL,
        prefill_queue: bool = False,
        use_events: bool = True,
        registry: CollectorRegistry | None = None,
        metrics: KvRoutingMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.runtime = client.runtime
        self.use_events = use_events
        self.index: KvIndex | ApproxIndex = KvIndex() if use_events else ApproxIndex()
        self.load = ActiveLoad()
        # Evictions a request routed now will find done (the event-fed index only: the
        # approximate one is the router's own record, with its own capacity bound).
        self.forecast = EvictionForecast(self.index.holds) if isinstance(self.index, KvIndex) else None
        self.selector = KvSelector(
            overlap_weight=overlap_weight,
            temperature=temperature,
            busy_threshold=busy_threshold,
            balance_abs=balance_requests,
            balance_rel=balance_ratio,
            prefill_queue=prefill_queue,
        )
        self.metrics = metrics or KvRoutingMetrics(registry or CollectorRegistry())
        self._index_blocks = self.metrics.index_blocks.labels(client.component)
        self._index_workers = self.metrics.index_workers.labels(client.component)
        self.snapshots = self.runtime.client(client.component, SNAPSHOT_ENDPOINT)
        self.clock = clock
        self._predicted: dict[str, int] = {}  # request id -> predicted cached tokens
        self._prediction_log = os.environ.get(PREDICTION_LOG_ENV) or None
        self._diagnostics: dict[str, dict[str, Any]] = {}  # request id -> its decision (with the log only)
        self._resyncing: dict[str, asyncio.Task[None]] = {}
        self._last_resync: dict[str, float] = {}
        self._said_no_events: set[str] = set()
        self._subscriptions: list[Any] = []

    async def start(self) -> None:
        """Follow events, load and discovery (call once the runtime is connected)."""
        self.client.watcher.add_listener(self._on_discovery_change)
        if self.use_events:
            self._subscriptions.append(await self.runtime.subscribe_events(KV_EVENTS_TOPIC, self._on_kv_events))
        self._subscriptions.append(await self.runtime.subscribe_events(LOAD_TOPIC, self._on_load))

    async def stop(self) -> None:
        for task in self._resyncing.values():
            task.cancel()
        for sub in self._subscriptions:
            await sub.unsubscribe()
        self._subscriptions.clear()

    # ---- choosing ---------------------------------------------------------------------------------

    def choose(
        self, records: Sequence[InstanceRecord], payload: dict[str, Any], request_id: str
    ) -> tuple[InstanceRecord, int]:
        """The instance and data-parallel rank for ``payload`` among ``records`` (not empty);
        counts the request's blocks on it until :meth:`finished`."""
        started = time.perf_counter()
        token_ids: list[int] = payload.get("token_ids") or []
        by_worker: dict[WorkerKey, InstanceRecord] = {}
        for record in records:
            self._note_capacity(record)
            for rank in range(_dp_size(record)):
                by_worker[(record.instance_id, rank)] = record
        # Workers of one model share a block size; group anyway so mixed ones stay correct.
        overlaps: dict[WorkerKey, int] = {}
        block_sizes = {_block_size(r) for r in records}
        lora = _lora_name(payload, records[0])
        hashes_by_size = {}
        for size in block_sizes:
            hashes = prompt_hashes(token_ids, size, lora_name=lora)
            hashes_by_size[size] = hashes
            for worker, blocks in self.index.overlaps(hashes).items():
                record = by_worker.get(worker)
                if record is not None and _block_size(record) == size:
                    overlaps[worker] = blocks
        indexed = dict(overlaps)
        if self.forecast is not None:
            # Blocks the requests routed there just before this one will evict first; not where
            # other frontends' requests run (they keep blocks warm that the forecast cannot see).
            for worker, blocks in indexed.items():
                if self.load.foreign_blocks(worker) > FOREIGN_BLOCKS:
                    continue
                overlaps[worker] = self.forecast.surviving(
                    worker, hashes_by_size[_block_size(by_worker[worker])], blocks
                )
        surviving = dict(overlaps) if self._prediction_log is not None else {}  # for the log
        # A prefix that a request in flight on a worker has in its prompt is cached there by the time
        # this one is scheduled, even if its BlockStored has not arrived yet (the engine schedules in
        # arrival order and keeps a running request's blocks).
        pending: dict[WorkerKey, int] = {}
        for worker, record in by_worker.items():
            pending[worker] = self.load.in_flight_prefix(worker, hashes_by_size[_block_size(record)])
            if pending[worker] > overlaps.get(worker, 0):
                overlaps[worker] = pending[worker]
        block_size = min(block_sizes)
        prompt_blocks = len(token_ids) // block_size
        workers = sorted(by_worker)
        # For the prediction log: before start() counts this request in flight.
        in_flight = {w: self.load.in_flight(w) for w in workers} if self._prediction_log is not None else {}
        max_tokens = (payload.get("stop_conditions") or {}).get("max_tokens")
        decision = self.selector.choose(
            workers,
            prompt_blocks,
            overlaps,
            self.load,
            running_shared=pending,
            request_blocks=expected_blocks(len(token_ids), max_tokens, block_size),
            running_sharing={
                w: self.load.sharing(w, hashes_by_size[_block_size(r)], pending[w]) for w, r in by_worker.items()
            },
            hashes=hashes_by_size[block_size],
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: %d prompt blocks -> %s (away from holder: %s); candidates %s",
                self.client.component,
                prompt_blocks,
                decision.worker,
                decision.away_from_holder,
                self.selector.explain(workers, prompt_blocks, overlaps, self.load),
            )
        record = by_worker[decision.worker]
        size = _block_size(record)
        self.load.start(
            request_id,
            decision.worker,
            expected_blocks(len(token_ids), max_tokens, size),
            shared=hashes_by_size[size],
            prefill_blocks=max(0, prompt_blocks - decision.overlap_blocks),
        )
        if isinstance(self.index, ApproxIndex):
            self.index.record(decision.worker, hashes_by_size[size], capacity=self.load.capacity(decision.worker))
        predicted = predicted_cached_tokens(decision.overlap_blocks, len(token_ids), size)
        dooms = 0
        if self.forecast is not None:
            dooms = self.forecast.route(
                request_id,
                decision.worker,
                hashes_by_size[size],
                len(token_ids),
                size,
                predicted // size,
                self.load.capacity(decision.worker),
                decodes=max_tokens is None or max_tokens > 1,
            )
        self._observe(decision, predicted, request_id, started)
        if self._prediction_log is not None:
            worker = decision.worker
            self._diagnostics[request_id] = {
                "request": request_id,
                "decided": self.clock(),
                "worker": list(worker),
                "prompt_tokens": len(token_ids),
                "block_size": size,
                "predicted_tokens": predicted,
                "indexed_blocks": indexed.get(worker, 0),
                # Held there but forecast evicted before it runs (kv_forecast); and the
                # blocks this request's own allocation is forecast to evict there.
                "forecast_evicted_blocks": indexed.get(worker, 0) - surviving.get(worker, 0),
                "dooms": dooms,
                "in_flight_blocks": pending[worker],
                "in_flight_requests": in_flight[worker],
                "best_elsewhere_blocks": max((b for w, b in overlaps.items() if w != worker), default=0),
                "away_from_holder": decision.away_from_holder,
                # The fewest of the prompt's blocks the index held there between decision and finish
                # (the request stores its prefix again when it runs: the index at its finish
                # cannot show an eviction in between), and when that low was first seen.
                "min_indexed_blocks": indexed.get(worker, 0),
                "min_indexed_after_s": None,
                "_hashes": hashes_by_size[size],
            }
        return record, decision.worker[1]

    def _observe(self, decision: Decision, predicted: int, request_id: str, started: float) -> None:
        m = self.metrics
        m.decision_seconds.observe(time.perf_counter() - started)
        m.predicted_overlap.observe(decision.overlap_blocks)
        m.routed.labels(decision.worker[0], str(decision.worker[1])).inc()
        if decision.away_from_holder is not None:
            m.away_from_holder.labels(decision.away_from_holder).inc()
        self._predicted[request_id] = predicted
        self._index_blocks.set(self.index.block_count)
        self._index_workers.set(self.index.worker_count)

    def first_token(self, request_id: str) -> None:
        """The request's first token arrived: its worker's prefill queue is shorter by it."""
        self.load.prefill_done(request_id)
        if self.forecast is not None:
            self.forecast.first_token(request_id)

    def finished(self, request_id: str, cached_tokens: int | None = None) -> None:
        """The request ended (however): its blocks no longer load its worker. ``cached_tokens``:
        what the engine reported cached, to measure the prediction."""
        self.load.finish(request_id)
        if self.forecast is not None:
            self.forecast.finish(request_id)
        predicted = self._predicted.pop(request_id, None)
        diagnostics = self._diagnostics.pop(request_id, None)
        if diagnostics is not None:
            self._log_prediction(diagnostics, cached_tokens)
        if predicted is None or cached_tokens is None:
            return
        self.metrics.predicted_tokens.inc(predicted)
        self.metrics.actual_tokens.inc(cached_tokens)
        if cached_tokens != predicted:
            self.metrics.prediction_misses.inc()

    def _note_removals(self, worker: WorkerKey) -> None:
        """For the prediction log: blocks of a pending request's prompt the worker no longer holds."""
        now = self.clock()
        for entry in self._diagnostics.values():
            if (entry["worker"][0], entry["worker"][1]) != worker:
                continue
            held = self.index.overlaps(entry["_hashes"]).get(worker, 0)
            if held < entry["min_indexed_blocks"]:
                entry["min_indexed_blocks"] = held
                entry["min_indexed_after_s"] = round(now - entry["decided"], 4)

    def _log_prediction(self, entry: dict[str, Any], cached_tokens: int | None) -> None:
        """Append one request's prediction, the engine's answer and what the index says now."""
        assert self._prediction_log is not None
        hashes = entry.pop("_hashes")
        worker = (entry["worker"][0], entry["worker"][1])
        entry["cached_tokens"] = cached_tokens
        entry["finished"] = self.clock()
        # Blocks of the prompt the index holds on that worker now: below the prediction, removals
        # arrived after the decision; at or above the engine's answer, stores did.
        entry["indexed_blocks_at_finish"] = self.index.overlaps(hashes).get(worker, 0)
        try:
            with open(self._prediction_log, "a") as out:
                out.write(json.dumps(entry) + "\n")
        except OSError as exc:
            log.warning("%s=%s: cannot write (%s); prediction log off", PREDICTION_LOG_ENV, self._prediction_log, exc)
            self._prediction_log = None
            self._diagnostics.clear()

    def _note_capacity(self, record: InstanceRecord) -> None:
        capacity = record.data.get("kv_capacity_blocks")
        eviction = record.data.get("kv_eviction")
        for rank in range(_dp_size(record)):
            self.load.set_capacity((record.instance_id, rank), capacity if isinstance(capacity, int) else None)
            if self.forecast is not None:
                self.forecast.set_eviction((record.instance_id, rank), eviction if isinstance(eviction, str) else "lru")
        if self.use_events and not record.data.get("kv_events") and record.instance_id not in self._said_no_events:
            self._said_no_events.add(record.instance_id)
            log.info(
                "instance %s publishes no KV events (prefix caching off, or not a vLLM worker): routed by load alone",
                record.instance_id,
            )

    # ---- following the workers ---------------------------------------------------------------------

    def _known(self, instance_id: str) -> bool:
        return any(r.instance_id == instance_id for r in self.client.instances())

    async def _on_kv_events(self, message: Any) -> None:
        if not isinstance(message, dict):
            return
        instance_id, rank, seq = message.get("instance_id"), message.get("dp_rank", 0), message.get("seq")
        events = message.get("events")
        if not isinstance(instance_id, str) or not isinstance(seq, int) or not isinstance(events, list):
            log.warning("ignoring a malformed kv_events message")
            return
        if not self._known(instance_id) or instance_id in self._resyncing:
            return  # a departed instance, or one being rebuilt from its snapshot
        assert isinstance(self.index, KvIndex)
        worker = (instance_id, int(rank or 0))
        result = self.index.apply(instance_id, worker[1], seq, events)
        if self.forecast is not None:
            if result.cleared:
                self.forecast.forget(worker)
            elif result.removed_hashes:
                self.forecast.removed(worker, result.removed_hashes)
        if result.removed and self._diagnostics:
            self._note_removals(worker)
        if result.gap:
            self.metrics.event_gaps.inc()
            log.info("KV events of instance %s rank %s: %s; fetching its block set", instance_id, rank, result.reason)
            self._resync(instance_id)
        self._index_blocks.set(self.index.block_count)

    async def _on_load(self, message: Any) -> None:
        if isinstance(message, dict) and self._known(str(message.get("instance_id"))):
            self.load.apply_load_metrics(message)

    def _on_discovery_change(self, key: str, record: InstanceRecord | None, expired: bool) -> None:
        # Keys are namespace.component.endpoint.instance; only a departure of the routed endpoint counts.
        *_, component, endpoint, instance_id = key.split(".")
        if record is not None or (component, endpoint) != (self.client.component, self.client.endpoint):
            return
        self.index.remove_instance(instance_id)
        self.load.remove_instance(instance_id)
        if self.forecast is not None:
            self.forecast.remove_instance(instance_id)
        task = self._resyncing.pop(instance_id, None)
        if task is not None:
            task.cancel()
        self._index_blocks.set(self.index.block_count)
        self._index_workers.set(self.index.worker_count)

    def _resync(self, instance_id: str) -> None:
        if instance_id in self._resyncing:
            return
        wait = self._last_resync.get(instance_id, -RESYNC_INTERVAL) + RESYNC_INTERVAL - self.clock()
        self._resyncing[instance_id] = asyncio.create_task(
            self._fetch_snapshot(instance_id, max(0.0, wait)), name=f"kv-resync-{instance_id}"
        )

    async def _fetch_snapshot(self, instance_id: str, wait: float) -> None:
        """Rebuild every rank of one instance from its ``kv_blocks`` endpoint."""
        try:
            if wait:
                await asyncio.sleep(wait)
            self._last_resync[instance_id] = self.clock()
            ranks: dict[int, tuple[int | None, list[dict[str, Any]]]] = {}
            stale = False
            async with asyncio.timeout(RESYNC_TIMEOUT):
                async with aclosing(self.snapshots.direct({}, instance_id)) as stream:
                    async for part in stream:
                        rank = int(part.get("dp_rank", 0))
                        seq, blocks = ranks.get(rank, (None, []))
                        blocks.extend(part.get("blocks") or [])
                        ranks[rank] = (part.get("seq", seq), blocks)
                        stale = stale or bool(part.get("stale"))
            if stale:  # the worker's own view lost a batch: it may under-report until its next reset
                log.info("instance %s says its block set may be incomplete (a lost event batch); using it", instance_id)
            assert isinstance(self.index, KvIndex)
            for rank, (seq, blocks) in ranks.items():
                self.index.replace_worker((instance_id, rank), blocks, seq)
                if self.forecast is not None:
                    self.forecast.forget((instance_id, rank))
            self.metrics.resyncs.labels("ok").inc()
            log.info(
                "rebuilt the KV index entry of instance %s from its block set (%d block(s))",
                instance_id,
                sum(self.index.blocks((instance_id, rank)) for rank in ranks),
            )
        except (RequestError, TimeoutError) as exc:
            # The instance keeps its (possibly stale) entry; the next gap tries again.
            self.metrics.resyncs.labels("failed").inc()
            log.warning("could not fetch the block set of instance %s: %s", instance_id, exc)
        finally:
            self._resyncing.pop(instance_id, None)
        self._index_blocks.set(self.index.block_count)
        self._index_workers.set(self.index.worker_count)


def predicted_cached_tokens(overlap_blocks: int, prompt_tokens: int, block_size: int) -> int:
    """The prompt tokens an engine holding ``overlap_blocks`` leading blocks reports cached:
    whole blocks, never the prompt's last token (vLLM computes it to sample the first output token,
    so a prompt held whole, of a multiple of the block size, hits one block less)."""
    return min(overlap_blocks, max(0, prompt_tokens - 1) // block_size) * block_size


def _dp_size(record: InstanceRecord) -> int:
    size = record.data.get("data_parallel_size", 1)
    return size if isinstance(size, int) and size >= 1 else 1


def _block_size(record: InstanceRecord) -> int:
    size = record.data.get("kv_block_size")
    return size if isinstance(size, int) and size > 0 else DEFAULT_BLOCK_SIZE


def _lora_name(payload: dict[str, Any], record: InstanceRecord) -> str | None:
    """The LoRA adapter a request runs with: its ``model`` when that is not the base model."""
    model = payload.get("model")
    return model if isinstance(model, str) and model != record.data.get("model") else None
