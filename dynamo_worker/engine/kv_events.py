"""vLLM's KV-cache events, relayed from its ZMQ publisher onto the event plane.

vLLM's scheduler (in each EngineCore process) publishes a batch of events after every step
that changed the prefix cache: ``BlockStored`` (hashes of full blocks now cached, their parent,
their tokens), ``BlockRemoved`` (evicted hashes) and ``AllBlocksCleared`` (after a prefix-cache
reset; sent with the next engine step). Its ``ZmqEventPublisher`` binds
``tcp://*:{base + dp_rank}`` and sends ``(topic, seq: 8-byte big-endian, payload)`` where the
payload is msgpack of ``vllm.distributed.kv_events.KVEventBatch`` (``[ts, events,
data_parallel_rank]``). Hashes are 64-bit integers (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``),
the same in every process for the same prefix (and LoRA adapter).

The worker configures that publisher (unless the user gave ``--kv-events-config``; only with
prefix caching on) and :class:`KvEventRelay` subscribes to every data-parallel rank's port on
127.0.0.1 and republishes each batch on the event plane topic ``kv_events``::

    {"instance_id": "a1b2...", "dp_rank": 0, "seq": 17, "ts": 1764000000.12,
     "events": [{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": null,
                 "token_ids": [...], "block_size": 32, "lora_name": null, "medium": "CPU", ...},
                {"type": "BlockRemoved", "block_hashes": [...], "medium": "CPU"},
                {"type": "AllBlocksCleared"}]}

Event fields are vLLM's, unchanged. The event plane is at-most-once: a consumer that misses a
message should resynchronise (for example on the next ``AllBlocksCleared``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from dynamo_worker.core.errors import UsageError

log = logging.getLogger(__name__)

TOPIC = "kv_events"
PORT_ENV = "DYN_VLLM_KV_EVENT_PORT"
DEFAULT_PORT = 20080
PORT_RANGE = (1024, 49151)  # registered ports: never an ephemeral one the OS may hand out


def base_port(data_parallel_size: int = 1) -> int:
    """The base port from ``DYN_VLLM_KV_EVENT_PORT`` (default 20080); a one-line error if invalid."""
    raw = os.environ.get(PORT_ENV, "").strip()
    low, high = PORT_RANGE
    if not raw:
        port = DEFAULT_PORT
    else:
        try:
            port = int(raw)
        except ValueError:
            raise UsageError(f"{PORT_ENV}={raw!r} is not a port number; use an integer between "
                             f"{low} and {high}") from None
    if not low <= port <= high - (data_parallel_size - 1):
        top = high - (data_parallel_size - 1)
        ranks = f" (one port per data-parallel rank: {port}..{port + data_parallel_size - 1})" \
            if data_parallel_size > 1 else ""
        raise UsageError(f"{PORT_ENV}={port} is out of range{ranks}; use an integer between {low} and {top}")
    return port


def configure(engine_args: Any) -> list[int] | None:
    """Turn on vLLM's ZMQ KV-event publisher; return the ports to relay from, one per DP rank.

    ``None`` when events stay off: prefix caching is off (no blocks are shared, so nothing to
    report), or the user configured ``--kv-events-config`` (then the user owns the publisher;
    a ZMQ publisher on a ``tcp://*:PORT`` endpoint is still relayed).
    """
    dp_size = max(1, int(engine_args.data_parallel_size or 1))
    given = engine_args.kv_events_config
    if given is not None:
        if not given.enable_kv_cache_events or given.publisher != "zmq":
            return None
        return _ports_of(given.endpoint, dp_size)
    if not engine_args.enable_prefix_caching:
        return None
    from vllm.config import KVEventsConfig

    port = base_port(dp_size)
    engine_args.kv_events_config = KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{port}")
    return [port + rank for rank in range(dp_size)]


def _ports_of(endpoint: str, dp_size: int) -> list[int] | None:
    """Ports of a user's ``tcp://*:PORT`` endpoint (vLLM adds the DP rank); None for others."""
    if not endpoint.startswith("tcp://") or "*" not in endpoint:
        log.warning("KV events go to %s; the worker relays only a bound tcp://*:PORT endpoint", endpoint)
        return None
    port = int(endpoint.rpartition(":")[2])
    if port == 0:
        log.warning("KV events endpoint %s has no fixed port; not relayed", endpoint)
        return None
    return [port + rank for rank in range(dp_size)]


class KvEventRelay:
    """Subscribes to vLLM's KV-event publishers and republishes each batch on the event plane."""

    def __init__(self, instance_id: str, ports: list[int],
                 publish: Callable[[str, Any], Awaitable[None]]) -> None:
        self.instance_id = instance_id
        self.ports = ports
        self.publish = publish
        self.batches = 0

    async def run(self) -> None:
        """Relay until cancelled (a background task of the worker)."""
        import msgspec
        import zmq
        import zmq.asyncio
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        for port in self.ports:
            sock.connect(f"tcp://127.0.0.1:{port}")
        log.info("relaying vLLM KV events from 127.0.0.1 port(s) %s to topic %s",
                 ", ".join(map(str, self.ports)), TOPIC)
        next_seq: dict[int, int] = {}
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    log.warning("ignoring a KV-event message with %d frames (expected 3)", len(frames))
                    continue
                _topic, seq_bytes, payload = frames
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                try:
                    batch = decoder.decode(payload)
                except msgspec.DecodeError as exc:
                    log.warning("ignoring a KV-event batch vLLM sent that does not decode: %s", exc)
                    continue
                rank = batch.data_parallel_rank or 0
                expected = next_seq.get(rank)
                if expected is not None and seq != expected:
                    log.warning("KV events from rank %d: %d batch(es) lost (seq %d, expected %d)",
                                rank, seq - expected, seq, expected)
                next_seq[rank] = seq + 1
                await self._relay(rank, seq, batch.ts, msgspec.to_builtins(batch.events))
        finally:
            sock.close(linger=0)

    async def _relay(self, rank: int, seq: int, ts: float, events: list[dict[str, Any]]) -> None:
        message = {"instance_id": self.instance_id, "dp_rank": rank, "seq": seq, "ts": ts, "events": events}
        try:
            await self.publish(TOPIC, message)
        except Exception as exc:  # NATS outage: events are at-most-once anyway; keep relaying
            log.warning("could not publish KV events (%s: %s)", type(exc).__name__, exc)
            return
        self.batches += 1
