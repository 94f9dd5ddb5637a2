"""vLLM's KV-cache events, relayed from its ZMQ publisher onto the event plane.

vLLM's scheduler (in each EngineCore process) publishes a batch of events after every step
that changed the prefix cache: ``BlockStored`` (hashes of full blocks now cached, their parent,
their tokens), ``BlockRemoved`` (evicted hashes) and ``AllBlocksCleared`` (after a prefix-cache
reset; sent with the next engine step). Its ``ZmqEventPublisher`` sends ``(topic, seq: 8-byte
big-endian, payload)`` where the payload is msgpack of ``vllm.distributed.kv_events.KVEventBatch``
(``[ts, events, data_parallel_rank]``); it adds the data-parallel rank to the endpoint's port.
Hashes are 64-bit integers (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``), the same in every process
for the same prefix (and LoRA adapter).

Who binds: the worker's relay binds a SUB socket on ``tcp://127.0.0.1:{base + rank}`` for every
data-parallel rank *before* the engine starts, and vLLM's publisher connects to it
(``KVEventsConfig(publisher="zmq", endpoint="tcp://127.0.0.1:{base}")``: vLLM binds only
endpoints with a wildcard host, and connects to others). Binding first reserves the ports
atomically, on loopback only: with vLLM binding ``tcp://*:PORT`` instead, two workers on one host
started together would both see the default port free and the second engine would die 20 s later
when it cannot bind. Here a port in use is found at once: with ``DYN_VLLM_KV_EVENT_PORT`` set it
is a one-line error naming the variable; with the default (20080) the worker takes the next free
ports and logs them (unless the engine's ranks run in several processes, which must agree on the
port: then it is an error too).

Each batch is republished on the event plane topic ``kv_events``::

    {"instance_id": "a1b2...", "dp_rank": 0, "seq": 17, "ts": 1764000000.12,
     "events": [{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": null,
                 "token_ids": [...], "block_size": 32, "lora_name": null, "medium": "GPU", ...},
                {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU"},
                {"type": "AllBlocksCleared"}]}

Event fields are vLLM's, unchanged. The event plane is at-most-once: a consumer that misses a
message should resynchronise (for example on the next ``AllBlocksCleared``). A user's own
``--kv-events-config`` is left as given; a ZMQ publisher bound on ``tcp://*:PORT`` is relayed by
connecting to it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

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


@attrs.define
class KvEventsPlan:
    """Where this worker's engines send KV events and how the relay reaches them."""

    base: int  # the port of data-parallel rank 0
    ranks: int  # data-parallel ranks, each on base + rank
    bind: bool  # True: the relay binds (our config); False: it connects to the user's publisher
    explicit: bool  # the port came from DYN_VLLM_KV_EVENT_PORT (or the user's config), not the default
    may_move: bool  # the default port may be replaced by free ones (all ranks are this process's)

    @property
    def ports(self) -> list[int]:
        return [self.base + rank for rank in range(self.ranks)]


def configure(engine_args: Any) -> KvEventsPlan | None:
    """Turn on vLLM's ZMQ KV-event publisher; ``None`` when events stay off.

    Off when prefix caching is off (no blocks are shared, so nothing to report). A user's
    ``--kv-events-config`` is kept; it is relayed when it is a ZMQ publisher on ``tcp://*:PORT``.
    """
    dp_size = max(1, int(engine_args.data_parallel_size or 1))
    given = engine_args.kv_events_config
    if given is not None:
        if not given.enable_kv_cache_events or given.publisher != "zmq":
            return None
        port = _bound_port_of(given.endpoint)
        return None if port is None else KvEventsPlan(port, dp_size, bind=False, explicit=True, may_move=False)
    if not engine_args.enable_prefix_caching:
        return None
    from vllm.config import KVEventsConfig

    explicit = bool(os.environ.get(PORT_ENV, "").strip())
    port = base_port(dp_size)
    local = engine_args.data_parallel_size_local
    engine_args.kv_events_config = KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://127.0.0.1:{port}")
    return KvEventsPlan(port, dp_size, bind=True, explicit=explicit,
                        may_move=not explicit and (local is None or local == dp_size))


def _bound_port_of(endpoint: str) -> int | None:
    """The port of a user's ``tcp://*:PORT`` endpoint (vLLM adds the DP rank); None for others."""
    if not endpoint.startswith("tcp://") or "*" not in endpoint:
        log.warning("KV events go to %s; the worker relays only a bound tcp://*:PORT endpoint", endpoint)
        return None
    port = int(endpoint.rpartition(":")[2])
    if port == 0:
        log.warning("KV events endpoint %s has no fixed port; not relayed", endpoint)
        return None
    return port


class KvEventRelay:
    """Receives vLLM's KV-event batches and republishes each on the event plane."""

    def __init__(self, plan: KvEventsPlan) -> None:
        import zmq
        import zmq.asyncio

        self.plan = plan
        self.instance_id = ""
        self.publish: Callable[[str, Any], Awaitable[None]] | None = None
        self.batches = 0
        self._sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.LINGER, 0)

    def open(self, engine_args: Any) -> None:
        """Bind (or connect) before the engine starts; a :class:`UsageError` if the ports are taken.

        With the default port and ``may_move``, the next free block of ports is taken instead,
        and the engine's endpoint updated to match.
        """
        plan = self.plan
        if not plan.bind:
            for port in plan.ports:
                self._sock.connect(f"tcp://127.0.0.1:{port}")
            return
        low, high = PORT_RANGE
        first = plan.base
        candidates = range(first, high - plan.ranks + 2, plan.ranks) if plan.may_move else [first]
        for base in candidates:
            busy = self._try_bind([base + rank for rank in range(plan.ranks)])
            if busy is None:
                break
            if not plan.may_move:
                source = f"{PORT_ENV}={first}" if plan.explicit else f"the default KV event port {first}"
                raise UsageError(f"{source}: port {busy} is in use on 127.0.0.1 (another worker on this "
                                 f"host?); give each worker its own {PORT_ENV}")
        else:
            raise UsageError(f"no free ports for KV events between {first} and {high}; set {PORT_ENV}")
        if base != first:
            log.info("KV event port %d is in use (another worker on this host?); using %d", first, base)
        plan.base = base
        engine_args.kv_events_config.endpoint = f"tcp://127.0.0.1:{base}"

    def _try_bind(self, ports: list[int]) -> int | None:
        """Bind every port, or none of them; the first port in use, or None."""
        import zmq

        bound: list[str] = []
        for port in ports:
            address = f"tcp://127.0.0.1:{port}"
            try:
                self._sock.bind(address)
            except zmq.ZMQError:
                for done in bound:
                    self._sock.unbind(done)
                return port
            bound.append(address)
        return None

    def close(self) -> None:
        self._sock.close(linger=0)

    async def run(self) -> None:
        """Relay until cancelled (a background task of the worker)."""
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        log.info("relaying vLLM KV events from 127.0.0.1 port(s) %s to topic %s",
                 ", ".join(map(str, self.plan.ports)), TOPIC)
        next_seq: dict[int, int] = {}
        try:
            while True:
                frames = await self._sock.recv_multipart()
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
            self.close()

    async def _relay(self, rank: int, seq: int, ts: float, events: list[dict[str, Any]]) -> None:
        assert self.publish is not None
        message = {"instance_id": self.instance_id, "dp_rank": rank, "seq": seq, "ts": ts, "events": events}
        try:
            await self.publish(TOPIC, message)
        except Exception as exc:  # NATS outage: events are at-most-once anyway; keep relaying
            log.warning("could not publish KV events (%s: %s)", type(exc).__name__, exc)
            return
        self.batches += 1
