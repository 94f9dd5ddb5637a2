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
message fetches the worker's block set (below). A user's own ``--kv-events-config`` is left as
given; a ZMQ publisher bound on ``tcp://*:PORT`` is relayed by connecting to it (and its
``replay_endpoint``, when it is a ``tcp://*:PORT`` too, used as below).

**The worker's own view.** The relay sees every batch since the engine started empty, so it
keeps, per rank, the blocks a consumer applying every batch would hold (:class:`KvBlockView`)
and the last batch's ``seq``. Each batch is applied before it is published, with no await in
between, and the ``kv_blocks`` endpoint copies the views in one step: a snapshot stating ``seq``
N holds exactly batches 0..N, and a consumer that subscribed first continues with batches after
N. A gap in vLLM's seq (a ZMQ message lost between engine and relay) is filled from vLLM's replay
buffer when there is one (its ``replay_endpoint``: our config with one data-parallel rank binds it
on an ``ipc://`` socket in a private temp directory), and the replayed batches are relayed in
order before the one that revealed the gap, so consumers see no gap. Otherwise (several ranks, no
answer within ``REPLAY_TIMEOUT``, batches older than vLLM's 10,000-batch buffer) the rank's view
is marked ``stale`` until the next ``AllBlocksCleared`` (a prefix-cache reset) makes it exact
again. The view is bounded by the engine's KV capacity: a store beyond it means removals were
lost; the view is marked stale and the store refused.

``kv_blocks`` answers ``{}`` (every rank) or ``{"dp_rank": N}`` with, per rank, one or more
messages ``{"dp_rank", "seq", "block_size", "stale", "last", "blocks"}``: ``blocks`` are one
``BlockStored`` event per cached block, every block after its parent, at most
``SNAPSHOT_CHUNK_BLOCKS`` and the request plane's size limit per message; ``last`` marks a rank's
final message. ``seq`` is -1 before the rank's first batch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from array import array
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import attrs

from dynamo_worker.core import wire
from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.request_plane import RequestContext, RequestError

log = logging.getLogger(__name__)

TOPIC = "kv_events"
PORT_ENV = "DYN_VLLM_KV_EVENT_PORT"
DEFAULT_PORT = 20080
PORT_RANGE = (1024, 49151)  # registered ports: never an ephemeral one the OS may hand out
#: Blocks in one ``kv_blocks`` message at most (a large cache is answered in several).
SNAPSHOT_CHUNK_BLOCKS = 1000
#: Bytes of the request plane's limit left to its own framing around a ``kv_blocks`` message.
ENVELOPE_BYTES = 1024
#: Seconds the relay waits for vLLM's replay of lost batches before marking the view stale.
REPLAY_TIMEOUT = 5.0
#: A Unix socket path's limit is 107 bytes; an ipc:// replay endpoint must stay under it.
IPC_PATH_MAX = 100

ExternalHash = int | bytes | str  # vLLM's ExternalBlockHash (int by default; bytes as base64 text)
BlockKey = tuple[str | None, int | None, ExternalHash]  # (medium, group_idx, engine block hash)
_GPU_MEDIA = (None, "GPU")  # what the engine's capacity bounds (other media are offload tiers)
# BlockStored fields that differ per block (split by the view) or name the storing request (dropped).
_PER_BLOCK = frozenset({"type", "block_hashes", "parent_block_hash", "token_ids", "extra_keys", "session_id"})
_METAS_LIMIT = 1024  # distinct BlockStored metadata remembered for sharing (LoRA names x groups x media)
Replayed = tuple[int, float, list[dict[str, Any]]]  # a batch from vLLM's replay buffer: seq, ts, events


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
            raise UsageError(
                f"{PORT_ENV}={raw!r} is not a port number; use an integer between {low} and {high}"
            ) from None
    if not low <= port <= high - (data_parallel_size - 1):
        top = high - (data_parallel_size - 1)
        ranks = (
            f" (one port per data-parallel rank: {port}..{port + data_parallel_size - 1})"
            if data_parallel_size > 1
            else ""
        )
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
    replay: list[str] | None = None  # per rank: vLLM's replay endpoint the relay connects to

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
        if port is None:
            return None
        replay = _bound_port_of(given.replay_endpoint, "KV-event replay") if given.replay_endpoint else None
        return KvEventsPlan(
            port,
            dp_size,
            bind=False,
            explicit=True,
            may_move=False,
            replay=None if replay is None else [f"tcp://127.0.0.1:{replay + rank}" for rank in range(dp_size)],
        )
    if not engine_args.enable_prefix_caching:
        return None
    from vllm.config import KVEventsConfig

    explicit = bool(os.environ.get(PORT_ENV, "").strip())
    port = base_port(dp_size)
    local = engine_args.data_parallel_size_local
    engine_args.kv_events_config = KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://127.0.0.1:{port}"
    )
    return KvEventsPlan(
        port, dp_size, bind=True, explicit=explicit, may_move=not explicit and (local is None or local == dp_size)
    )


def _bound_port_of(endpoint: str, what: str = "KV events") -> int | None:
    """The port of a user's ``tcp://*:PORT`` endpoint (vLLM adds the DP rank); None for others."""
    if not endpoint.startswith("tcp://") or "*" not in endpoint:
        log.warning("%s endpoint %s: not used (the worker uses only a bound tcp://*:PORT endpoint)", what, endpoint)
        return None
    port = int(endpoint.rpartition(":")[2])
    if port == 0:
        log.warning("%s endpoint %s has no fixed port: not used", what, endpoint)
        return None
    return port


class _Block(NamedTuple):
    """One cached block in a rank's view (a tuple: about 300 bytes with its token array)."""

    parent: ExternalHash | None  # the engine hash of the block before it (None: first block)
    tokens: array  # its token ids, int64 (a list of ints would cost 4-5 times as much)
    extra: tuple[Any, ...] | None  # (its extra_keys entry,), or None when the event had none
    meta: dict[str, Any]  # the event's other fields (block_size, lora_name, medium, ...), shared


def _interned(metas: dict[Any, dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    """One dict per distinct metadata: a view of 100,000 blocks holds a handful, not 100,000."""
    if len(metas) >= _METAS_LIMIT:  # a field unique per event: stop sharing rather than grow
        metas.clear()
    try:
        return metas.setdefault(tuple(meta.items()), meta)
    except TypeError:  # an unhashable value (a list): keep this event's own dict
        return meta


class KvBlockView:
    """One data-parallel rank's cached blocks, as a consumer applying every relayed batch holds them.

    Keyed by ``(medium, group_idx, engine hash)`` as the events name blocks (a removal names its
    medium and group). ``BlockStored`` adds one entry per hash (a stored hash again replaces its
    entry: vLLM re-reports prefix hits in its "full" report mode), ``BlockRemoved`` drops them,
    ``AllBlocksCleared`` empties the view and makes it trustworthy again. ``seq`` is the last
    batch applied (-1: none; the engine started empty). ``stale`` says the view may differ from
    the engine's cache: batches were lost and not replayed, a store would exceed the engine's
    capacity (removals were lost), or an event could not be split into blocks. Applied on the
    event loop only; :meth:`snapshot` copies it in one step.
    """

    def __init__(self, rank: int, capacity: int | None = None) -> None:
        self.rank = rank
        self.capacity = capacity  # the engine's KV blocks of this rank; None until the engine exists
        self.blocks: dict[BlockKey, _Block] = {}
        self.gpu_blocks = 0  # entries of the GPU medium: what the capacity bounds
        self.seq = -1
        self.stale = False
        self.stale_reason = ""
        self.unknown_removals = 0  # removals of hashes the view never held (counted, not fatal)
        self._metas: dict[Any, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def apply(self, seq: int, events: Iterable[Mapping[str, Any]]) -> None:
        """Apply one batch, in order, and remember its ``seq``."""
        for event in events:
            kind = event.get("type")
            if kind == "BlockStored":
                self._store(event)
            elif kind == "BlockRemoved":
                self._remove(event)
            elif kind == "AllBlocksCleared":
                self.clear()
        self.seq = seq

    def clear(self) -> None:
        """Empty the view: after a prefix-cache reset it is exactly the engine's (empty) cache."""
        if self.stale:
            log.info(
                "KV events of rank %d: the prefix cache was reset; the worker's block set is exact again", self.rank
            )
        self.blocks = {}
        self.gpu_blocks = 0
        self.stale = False
        self.stale_reason = ""
        self._metas = {}

    def mark_stale(self, reason: str) -> None:
        if not self.stale:
            log.warning(
                "KV events of rank %d: %s; its block set (kv_blocks) is marked stale until the next "
                "prefix-cache reset (clear_kv_blocks)",
                self.rank,
                reason,
            )
        self.stale = True
        self.stale_reason = reason

    def _store(self, event: Mapping[str, Any]) -> None:
        hashes = event.get("block_hashes") or []
        tokens = event.get("token_ids") or []
        size = event.get("block_size") or 0
        if not hashes:
            return
        if size <= 0 or len(tokens) != size * len(hashes):
            # Sparse groups (sliding window) skip blocks in block_hashes but not in token_ids.
            self.mark_stale(
                f"a BlockStored of {len(hashes)} hash(es) carries {len(tokens)} token ids with "
                f"block_size {size}: its blocks cannot be told apart"
            )
            return
        extra_keys = event.get("extra_keys")
        if extra_keys is not None and len(extra_keys) != len(hashes):
            self.mark_stale(f"a BlockStored of {len(hashes)} hash(es) carries {len(extra_keys)} extra_keys entries")
            return
        medium, group = event.get("medium"), event.get("group_idx")
        meta = _interned(self._metas, {k: v for k, v in event.items() if k not in _PER_BLOCK})
        gpu = medium in _GPU_MEDIA
        parent = event.get("parent_block_hash")
        for i, block_hash in enumerate(hashes):
            key = (medium, group, block_hash)
            new = key not in self.blocks
            if new and gpu and self.capacity is not None and self.gpu_blocks >= self.capacity:
                # The engine holds at most `capacity` blocks: removals were lost. Bounded memory:
                # the store is refused.
                self.mark_stale(
                    f"a store would hold more than the engine's {self.capacity} KV blocks (removals were lost)"
                )
                return
            self.blocks[key] = _Block(
                parent,
                array("q", tokens[i * size : (i + 1) * size]),
                None if extra_keys is None else (extra_keys[i],),
                meta,
            )
            if new and gpu:
                self.gpu_blocks += 1
            parent = block_hash

    def _remove(self, event: Mapping[str, Any]) -> None:
        medium, group = event.get("medium"), event.get("group_idx")
        gpu = medium in _GPU_MEDIA
        for block_hash in event.get("block_hashes") or []:
            if self.blocks.pop((medium, group, block_hash), None) is None:
                if not self.unknown_removals:
                    log.warning(
                        "KV events of rank %d: removal of block %s, which no event stored (first such)",
                        self.rank,
                        block_hash,
                    )
                self.unknown_removals += 1
            elif gpu:
                self.gpu_blocks -= 1

    def snapshot(self) -> RankSnapshot:
        """The view now, copied in one step (entries are immutable): safe to read while batches apply."""
        return RankSnapshot(self.rank, self.seq, self.stale, dict(self.blocks))


@attrs.frozen
class RankSnapshot:
    """One rank's blocks at one batch: ``blocks`` reflect exactly the batches up to ``seq``."""

    dp_rank: int
    seq: int
    stale: bool
    blocks: dict[BlockKey, _Block]


def parent_first(blocks: Mapping[BlockKey, _Block]) -> list[BlockKey]:
    """The keys with every block after its parent (when the parent is held), in one pass.

    Insertion order is not enough: a parent evicted and stored again comes after its children.
    A block whose parent is not held comes where it is (it still names that parent, as the engine
    reported it).
    """
    order: list[BlockKey] = []
    placed: set[BlockKey] = set()
    for key in blocks:
        chain: list[BlockKey] = []
        walk: BlockKey | None = key
        while walk is not None and walk not in placed and walk in blocks:
            placed.add(walk)  # before climbing: a hash cycle (a collision) cannot loop
            chain.append(walk)
            parent = blocks[walk].parent
            walk = None if parent is None else (walk[0], walk[1], parent)
        order.extend(reversed(chain))
    return order


def block_event(key: BlockKey, block: _Block) -> dict[str, Any]:
    """A held block as the ``BlockStored`` event of that one block."""
    return {
        "type": "BlockStored",
        "block_hashes": [key[2]],
        "parent_block_hash": block.parent,
        "token_ids": block.tokens.tolist(),
        **block.meta,
        "extra_keys": None if block.extra is None else list(block.extra),
    }


def snapshot_messages(
    snapshot: RankSnapshot,
    order: Iterable[BlockKey],
    block_size: int,
    limit: int,
    max_blocks: int = SNAPSHOT_CHUNK_BLOCKS,
) -> Iterator[dict[str, Any]]:
    """``kv_blocks`` answer messages of one rank: at most ``max_blocks`` blocks and
    ``limit - ENVELOPE_BYTES`` encoded bytes each (a single block larger than that goes alone),
    always at least one (an empty view is one message with no blocks); the last has ``last``."""
    budget = max(1, limit - ENVELOPE_BYTES)
    head = {
        "dp_rank": snapshot.dp_rank,
        "seq": snapshot.seq,
        "block_size": block_size,
        "stale": snapshot.stale,
        "last": False,
    }
    base = len(wire.encode({**head, "blocks": []}))  # "false" is longer than "true"
    chunk: list[dict[str, Any]] = []
    size = base
    for key in order:
        block = block_event(key, snapshot.blocks[key])
        grow = len(wire.encode(block)) + (1 if chunk else 0)  # the comma between blocks
        if chunk and (len(chunk) >= max_blocks or size + grow > budget):
            yield {**head, "blocks": chunk}
            chunk, size, grow = [], base, grow - 1
        chunk.append(block)
        size += grow
    yield {**head, "last": True, "blocks": chunk}


class KvEventRelay:
    """Receives vLLM's KV-event batches, keeps each rank's :class:`KvBlockView` and republishes
    each batch on the event plane; serves the views (``kv_blocks``)."""

    def __init__(self, plan: KvEventsPlan) -> None:
        import zmq
        import zmq.asyncio

        self.plan = plan
        self.instance_id = ""
        self.publish: Callable[[str, Any], Awaitable[None]] | None = None
        self.max_message_bytes: Callable[[], int] = lambda: 1024 * 1024  # the runtime's, once serving
        self.batches = 0
        self.recovered = 0  # lost batches taken from vLLM's replay buffer
        self.block_size = 0  # the engine's, set by set_engine
        self.capacity: int | None = None
        self.views: dict[int, KvBlockView] = {rank: KvBlockView(rank) for rank in range(plan.ranks)}
        self._decoder: Any = None
        self._replay: dict[int, Any] = {}  # rank -> DEALER socket on vLLM's replay endpoint
        self._replay_dir: str | None = None  # our private directory of the replay socket
        self._sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.setsockopt(zmq.LINGER, 0)

    def set_engine(self, block_size: int, capacity: int | None) -> None:
        """The engine's block size and KV capacity per rank (blocks), once it exists."""
        self.block_size = block_size
        self.capacity = capacity
        for view in self.views.values():
            view.capacity = capacity

    def view(self, rank: int) -> KvBlockView:
        view = self.views.get(rank)
        if view is None:  # a rank the plan did not expect: kept all the same
            view = self.views[rank] = KvBlockView(rank, self.capacity)
        return view

    def open(self, engine_args: Any) -> None:
        """Bind (or connect) before the engine starts; a :class:`UsageError` if the ports are taken.

        With the default port and ``may_move``, the next free block of ports is taken instead,
        and the engine's endpoint updated to match. Then the replay sockets (:meth:`_open_replay`).
        """
        plan = self.plan
        if not plan.bind:
            for port in plan.ports:
                self._sock.connect(f"tcp://127.0.0.1:{port}")
            self._open_replay(engine_args)
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
                raise UsageError(
                    f"{source}: port {busy} is in use on 127.0.0.1 (another worker on this "
                    f"host?); give each worker its own {PORT_ENV}"
                )
        else:
            raise UsageError(f"no free ports for KV events between {first} and {high}; set {PORT_ENV}")
        if base != first:
            log.info("KV event port %d is in use (another worker on this host?); using %d", first, base)
        plan.base = base
        engine_args.kv_events_config.endpoint = f"tcp://127.0.0.1:{base}"
        self._open_replay(engine_args)

    def _open_replay(self, engine_args: Any) -> None:
        """Connect a DEALER to vLLM's replay endpoint of each rank, to fetch lost batches.

        Our own config with one rank: vLLM binds an ``ipc://`` socket in a directory only this
        user can enter (nothing to reserve, nothing on the network). With several ranks there is
        none: vLLM offsets a replay endpoint by the rank only for TCP ports, which would need ports
        vLLM binds itself (the start-up race the event ports avoid). A user's ``replay_endpoint``
        on ``tcp://*:PORT`` is used as given.
        """
        import zmq

        plan = self.plan
        if plan.bind and plan.ranks == 1 and engine_args.kv_events_config.replay_endpoint is None:
            self._replay_dir = tempfile.mkdtemp(prefix="dw-kv-")
            path = os.path.join(self._replay_dir, "replay")
            if len(path.encode()) > IPC_PATH_MAX:
                log.info("no KV-event replay: the temp dir's path is too long for a socket (%s)", path)
                self._remove_replay_dir()
            else:
                engine_args.kv_events_config.replay_endpoint = f"ipc://{path}"
                plan.replay = [f"ipc://{path}"]
        for rank, address in enumerate(plan.replay or []):
            sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self._replay[rank] = sock

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
        for sock in self._replay.values():
            sock.close(linger=0)
        self._replay = {}
        self._remove_replay_dir()

    def _remove_replay_dir(self) -> None:
        if self._replay_dir is None:
            return
        try:
            shutil.rmtree(self._replay_dir)
        except FileNotFoundError:  # already gone (a second close)
            pass
        except OSError as exc:
            log.warning("could not remove the KV-event replay directory %s: %s", self._replay_dir, exc)
        self._replay_dir = None

    # -- relaying ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Relay until cancelled (a background task of the worker)."""
        log.info(
            "relaying vLLM KV events from 127.0.0.1 port(s) %s to topic %s%s",
            ", ".join(map(str, self.plan.ports)),
            TOPIC,
            " (lost batches replayed from vLLM)" if self._replay else "",
        )
        try:
            while True:
                await self.handle(await self._sock.recv_multipart())
        finally:
            self.close()

    def _decode(self, payload: bytes) -> Any:
        """vLLM's ``KVEventBatch`` from its msgpack, or None (logged) when it does not decode."""
        import msgspec

        if self._decoder is None:
            from vllm.distributed.kv_events import KVEventBatch

            self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        try:
            return self._decoder.decode(payload)
        except msgspec.DecodeError as exc:
            log.warning("ignoring a KV-event batch vLLM sent that does not decode: %s", exc)
            return None

    async def handle(self, frames: list[bytes]) -> None:
        """One message of vLLM's publisher: ``(topic, seq, payload)``. Lost batches before it are
        replayed (or the rank's view marked stale), then it is applied and relayed."""
        import msgspec

        if len(frames) != 3:
            log.warning("ignoring a KV-event message with %d frames (expected 3)", len(frames))
            return
        _topic, seq_bytes, payload = frames
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        batch = self._decode(payload)
        if batch is None:
            return
        rank = batch.data_parallel_rank or 0
        view = self.view(rank)
        expected = view.seq + 1
        if seq > expected:
            lost = await self._fetch_replay(rank, expected, seq)
            if lost is None:
                view.mark_stale(f"{seq - expected} batch(es) lost (seq {seq}, expected {expected}) and not replayed")
            else:
                log.info(
                    "KV events from rank %d: %d lost batch(es) (seq %d..%d) replayed by vLLM",
                    rank,
                    len(lost),
                    expected,
                    seq - 1,
                )
                self.recovered += len(lost)
                for lost_seq, ts, events in lost:
                    await self._forward(view, lost_seq, ts, events)
        elif seq < expected:
            view.mark_stale(f"seq went back to {seq} (expected {expected})")
        await self._forward(view, seq, batch.ts, msgspec.to_builtins(batch.events))

    async def _forward(self, view: KvBlockView, seq: int, ts: float, events: list[dict[str, Any]]) -> None:
        # Applied before it is published, with no await between: a snapshot stating seq N holds
        # batch N, and every batch after N is relayed after that snapshot could be taken.
        view.apply(seq, events)
        await self._relay(view.rank, seq, ts, events)

    async def _fetch_replay(self, rank: int, start: int, stop: int) -> list[Replayed] | None:
        """Batches ``start..stop-1`` from vLLM's replay buffer (its last 10,000 batches), or None."""
        import msgspec

        sock = self._replay.get(rank)
        if sock is None:
            return None
        found: dict[int, tuple[float, list[dict[str, Any]]]] = {}
        try:
            async with asyncio.timeout(REPLAY_TIMEOUT):
                await sock.send_multipart([b"", start.to_bytes(8, "big")])
                while True:  # every buffered batch from start on, then an end marker (seq -1)
                    reply = await sock.recv_multipart()
                    if len(reply) != 4:
                        log.warning("ignoring a KV-event replay message with %d frames (expected 4)", len(reply))
                        continue
                    _empty, _topic, seq_bytes, payload = reply
                    seq = int.from_bytes(seq_bytes, "big", signed=True)
                    if seq < 0:
                        break
                    if start <= seq < stop:
                        batch = self._decode(payload)
                        if batch is not None:
                            found[seq] = (batch.ts, msgspec.to_builtins(batch.events))
        except TimeoutError:
            log.warning("KV events from rank %d: vLLM's replay did not answer within %.0f s", rank, REPLAY_TIMEOUT)
            self._reset_replay(rank)  # a late answer must not be read as the next one's
            return None
        if len(found) != stop - start:  # the buffer no longer holds them all
            return None
        return [(seq, *found[seq]) for seq in range(start, stop)]

    def _reset_replay(self, rank: int) -> None:
        import zmq

        old = self._replay.pop(rank)
        old.close(linger=0)
        sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        assert self.plan.replay is not None
        sock.connect(self.plan.replay[rank])
        self._replay[rank] = sock

    async def _relay(self, rank: int, seq: int, ts: float, events: list[dict[str, Any]]) -> None:
        assert self.publish is not None
        message = {"instance_id": self.instance_id, "dp_rank": rank, "seq": seq, "ts": ts, "events": events}
        try:
            await self.publish(TOPIC, message)
        except Exception as exc:  # NATS outage: events are at-most-once anyway; keep relaying
            log.warning("could not publish KV events (%s: %s)", type(exc).__name__, exc)
            return
        self.batches += 1

    # -- the kv_blocks endpoint -------------------------------------------------------------------

    def _ranks_asked(self, request: Any) -> list[int]:
        if not isinstance(request, dict):
            raise RequestError("bad_request", 'kv_blocks takes {} or {"dp_rank": N}')
        rank = request.get("dp_rank")
        if rank is None:
            return sorted(self.views)
        if type(rank) is not int or rank not in self.views:
            raise RequestError("bad_request", f"dp_rank must be one of {sorted(self.views)} (got {rank!r})")
        return [rank]

    async def kv_blocks(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """Every asked rank's cached blocks: ``{"dp_rank", "seq", "block_size", "stale", "last",
        "blocks": [BlockStored of one block, ...]}``, parents first, in messages that fit the
        request plane. Events after ``seq`` are relayed after these blocks were copied."""
        ranks = self._ranks_asked(request)
        # Copied before the first await: no batch is half-applied in any of them.
        snapshots = [self.view(rank).snapshot() for rank in ranks]
        limit = self.max_message_bytes()
        for snapshot in snapshots:
            order = await asyncio.to_thread(parent_first, snapshot.blocks)  # O(blocks): off the loop
            for message in snapshot_messages(snapshot, order, self.block_size, limit):
                yield message


async def no_kv_blocks(request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
    """``kv_blocks`` of a worker that relays no KV events: a clear error, not "no responders"
    (which would make a caller route around the worker)."""
    raise RequestError(
        "not_found",
        "this worker relays no KV events (prefix caching is off, or "
        "--kv-events-config sends them elsewhere): it keeps no block set",
    )
    yield {}  # unreachable; makes this an async generator, as every endpoint is
