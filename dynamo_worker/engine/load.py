"""Per-engine load, from a vLLM stat logger to the event plane and to gauges.

vLLM calls a stat logger's ``record(scheduler_stats, iteration_stats, ...)`` after every engine
step, from ``AsyncLLM``'s output-handler task, which runs on the worker's event loop (the
handler is started by the first ``generate`` call on that loop). ``record`` must stay cheap: it
stores the engine's snapshot, sets the gauges, and wakes :meth:`LoadPublisher.run`, which
publishes on the event plane topic ``load_metrics``, at most once per ``min_interval`` per
engine and only when something changed. A router therefore sees the latest state within
``min_interval`` of each change, and no message at all while the worker is idle.

Message (Dynamo's ``ForwardPassMetrics`` shape, plus the instance id)::

    {"instance_id": "a1b2...", "dp_rank": 0,
     "worker_stats": {"data_parallel_rank": 0, "request_active_slots": 3,
                      "request_total_slots": 16, "num_requests_waiting": 0},
     "kv_stats": {"kv_active_blocks": 12, "kv_total_blocks": 2048,
                  "gpu_cache_usage_perc": 0.0059}}
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from dynamo_worker.engine.metrics import EngineMetrics

log = logging.getLogger(__name__)

TOPIC = "load_metrics"


@attrs.frozen
class LoadSnapshot:
    """One engine's load after a step."""

    dp_rank: int
    running: int
    waiting: int
    active_blocks: int
    total_blocks: int
    usage: float  # 0..1


class LoadPublisher:
    """Collects per-engine snapshots from the stat logger and publishes them, throttled."""

    def __init__(
        self, instance_id: str, publish: Callable[[str, Any], Awaitable[None]], *, min_interval: float = 0.1
    ) -> None:
        self.instance_id = instance_id
        self.publish = publish
        self.total_slots = 0  # max_num_seqs, known once the engine exists
        self.min_interval = min_interval
        self.metrics: EngineMetrics | None = None  # set once the metrics are registered
        self.engine_count = 1  # engines (DP ranks) the AsyncLLM manages; set once it exists
        self.latest: dict[int, LoadSnapshot] = {}
        self._published: dict[int, LoadSnapshot] = {}
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._changed = asyncio.Event()

    def stat_logger_factory(self) -> Callable[[Any, int], Any]:
        """vLLM's per-engine factory: ``factory(vllm_config, engine_index) -> StatLoggerBase``."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        publisher = self

        class LoadStatLogger(StatLoggerBase):
            """Reports each engine step's scheduler stats to the worker's load publisher."""

            def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
                self.engine_index = engine_index
                self.cache_config = vllm_config.cache_config

            def record(
                self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None, engine_idx: int = 0
            ) -> None:
                if scheduler_stats is None:
                    return
                total = publisher.blocks_per_engine(self.cache_config.num_gpu_blocks)
                usage = float(scheduler_stats.kv_cache_usage)
                publisher.record(
                    LoadSnapshot(
                        dp_rank=engine_idx,
                        running=scheduler_stats.num_running_reqs,
                        waiting=scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                        active_blocks=round(total * usage),
                        total_blocks=total,
                        usage=usage,
                    )
                )

            def log_engine_initialized(self) -> None:
                pass

        return LoadStatLogger

    def blocks_per_engine(self, num_gpu_blocks: int | None) -> int:
        # vLLM's front end sums num_gpu_blocks over every engine it manages.
        return (num_gpu_blocks or 0) // max(1, self.engine_count)

    def record(self, snapshot: LoadSnapshot) -> None:
        """Called on every engine step: must stay cheap."""
        self.latest[snapshot.dp_rank] = snapshot
        if self.metrics is not None:
            self.metrics.set_load(
                snapshot.dp_rank,
                total_blocks=snapshot.total_blocks,
                active_blocks=snapshot.active_blocks,
                usage=snapshot.usage,
                running=snapshot.running,
                waiting=snapshot.waiting,
            )
        if self._published.get(snapshot.dp_rank) != snapshot:
            if threading.get_ident() == self._loop_thread:
                self._changed.set()
            else:  # not expected (vLLM records on the loop), but never touch the loop from a thread
                self._loop.call_soon_threadsafe(self._changed.set)

    def attach(self, engine: Any) -> None:
        """Learn the engine's ranks and size; seed an idle snapshot per rank, so routers see the
        worker as soon as it serves, before its first request."""
        config = engine.vllm_config
        ranks = list(getattr(engine.engine_core, "engine_ranks_managed", None) or [0])
        self.engine_count = len(ranks)
        self.total_slots = config.scheduler_config.max_num_seqs
        total = self.blocks_per_engine(config.cache_config.num_gpu_blocks)
        for rank in ranks:
            self.record(LoadSnapshot(rank, 0, 0, 0, total, 0.0))

    def message(self, s: LoadSnapshot) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "dp_rank": s.dp_rank,
            "worker_stats": {
                "data_parallel_rank": s.dp_rank,
                "request_active_slots": s.running,
                "request_total_slots": self.total_slots,
                "num_requests_waiting": s.waiting,
            },
            "kv_stats": {
                "kv_active_blocks": s.active_blocks,
                "kv_total_blocks": s.total_blocks,
                "gpu_cache_usage_perc": s.usage,
            },
        }

    async def run(self) -> None:
        """Publish changed snapshots until cancelled (a background task of the worker).

        A change after a quiet spell is published at once; after a publication the next waits
        ``min_interval`` (and then carries the latest state). It pauses only after publishing:
        a pause after a wake-up that found nothing new could hide a whole short burst of
        requests (on a small model 4 requests can start and finish within 0.1 s)."""
        while True:
            await self._changed.wait()
            self._changed.clear()
            started = time.monotonic()
            pause = 0.0
            for rank, snapshot in list(self.latest.items()):
                if self._published.get(rank) == snapshot:
                    continue
                try:
                    await self.publish(TOPIC, self.message(snapshot))
                except Exception as exc:  # NATS outage: try the latest state again a bit later
                    log.warning("could not publish load metrics (%s: %s)", type(exc).__name__, exc)
                    self._changed.set()
                    pause = 1.0
                    continue
                self._published[rank] = snapshot
                pause = max(pause, self.min_interval)
            if pause:
                await asyncio.sleep(max(0.0, pause - (time.monotonic() - started)))
