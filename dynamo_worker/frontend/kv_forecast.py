"""Which cached blocks a worker will evict before a request sent there now is scheduled.

The index (:mod:`.kv_index`) says what a worker holds *now*. Under cache pressure that is not what
a request routed there now finds: a request routed just before it, to the same worker, is
scheduled first and allocates the blocks its prompt does not hit, and vLLM takes them from the
head of its free queue, evicting the least recently freed cached blocks. Their ``BlockRemoved``
arrives only after the engine has done it. On the benchmark's 3-worker trace (caches 2.5x too
small for the tenants' prefixes, two requests often in flight on one worker) that was 9-13 of
256 requests predicted a prefix the engine had evicted by the time they ran, the largest cause
of missed predictions (docs/performance.md).

:class:`EvictionForecast` follows vLLM's block pool (``vllm/v1/core/block_pool.py``) for each
worker, from what this router sees:

* a request routed to the worker *touches* the blocks it hits (they leave the free queue) and
  then allocates the rest, popped from the head of the free queue: the blocks its prompt needs,
  and the block of its first generated token when the prompt fills its last block (that decode
  step runs before the next request is scheduled). The forecast does both at the decision (a
  worker schedules in arrival order, so a request routed later is scheduled after it). A popped
  block the index still holds is *doomed*: predicted evicted, though its ``BlockRemoved`` has not
  arrived. Blocks of later output tokens are not forecast;
* a request that ends frees its blocks: each one no other request in flight uses goes to the
  tail of the free queue, its last block first and its first block last (vLLM frees a request's
  blocks in reverse, so a prefix outlives its suffixes);
* a ``BlockRemoved`` takes the block out of the model; ``AllBlocksCleared`` or a rebuild from a
  snapshot forgets the worker's free queue.

A worker whose discovery record says ``kv_eviction: active-inactive`` (``--kv-eviction``,
:mod:`dynamo_worker.engine.kv_eviction`) keeps two such queues, and so does its model here: the
blocks a routed request hits, and blocks freed while their hash is among the worker's last
evicted (ghosts), go to the active list when freed, the rest to the inactive one; allocation pops
the inactive list first; the active list keeps at most ``ACTIVE_SHARE`` of the capacity, its
oldest moving to the inactive tail.

The model knows only the blocks of this router's requests. Every other free block (blocks never
used since the engine started, the partial last block of each request, output blocks, other
frontends' requests) is *unknown*: counted as capacity less the blocks held by this router's
requests less the known free queue, and assumed to sit at the head, used before any known one.
vLLM does put its never-used and unhashed blocks at the head; for the rest the assumption errs
toward predicting fewer evictions. A doomed block that the engine did not evict after
all (a request that hit more than forecast, another router's traffic) stops counting
``DOOM_GRACE`` seconds after the request that popped it got its first token: by then its
allocation is done and its ``BlockRemoved`` would have arrived.

**Other frontends.** Their requests refresh blocks in a worker's queue that this router's model
leaves old, so it would forecast the eviction of a prefix they keep warm. A worker whose fresh
published load (``load_metrics``) counts more than ``FOREIGN_BLOCKS`` blocks beyond this
router's own requests there gets no cut: its prediction is the index's, as before the forecast.

Only for the event-fed index and workers of known capacity (discovery's ``kv_capacity_blocks``);
not thread-safe (one event loop). Cost: a decision does a binary search of the prompt's held
blocks on each candidate that has doomed blocks (none when nothing is under pressure); routing a
request pops at most its new blocks; ending one re-queues its prompt's blocks.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import attrs

from dynamo_worker.engine.kv_eviction import ACTIVE_SHARE
from dynamo_worker.frontend.kv_index import WorkerKey

#: Seconds after the popping request's first token that a doomed block still counts as doomed.
DOOM_GRACE = 1.0
#: Blocks a worker may publish in use beyond the router's own requests there before the router
#: stops trusting its forecast for it (the published usage is a rounded fraction).
FOREIGN_BLOCKS = 2


@attrs.define
class _Pool:
    """One worker's free queue as far as this router can tell."""

    # Known free cached blocks (router hashes), head first: the next evicted. With the
    # active-inactive policy this is the inactive list.
    free: OrderedDict[int, None] = attrs.field(factory=OrderedDict)
    # Active-inactive only (``two_lists``): the active list (head first), the blocks hit since
    # they were cached (they go to the active list when freed) and the recently evicted.
    two_lists: bool = False
    capacity: int | None = None  # the worker's blocks, as the last request routed there said
    active: OrderedDict[int, None] = attrs.field(factory=OrderedDict)
    reused: set[int] = attrs.field(factory=set)
    ghosts: OrderedDict[int, None] = attrs.field(factory=OrderedDict)  # the last evicted, oldest first
    # Blocks of this router's requests in flight there: router hash -> how many requests use it.
    held: dict[int, int] = attrs.field(factory=dict)
    private: int = 0  # their blocks beyond their prompts' full ones
    # Blocks the forecast popped that the index still holds: router hash -> popping request.
    doomed: dict[int, str] = attrs.field(factory=dict)


@attrs.define
class _Routed:
    worker: WorkerKey
    chain: tuple[int, ...]  # router hashes of its prompt's full blocks
    partial: int  # blocks allocated beyond its prompt's full ones (never cached by the forecast)
    doomed: list[int]
    expires: float | None = None  # when its doomed blocks stop counting (set at its first token)


class EvictionForecast:
    """Each worker's free queue, from the router's requests and the index's removals."""

    def __init__(self, holds: Callable[[WorkerKey, int], bool], *, clock: Callable[[], float] = time.monotonic) -> None:
        self._holds = holds  # whether the index holds a router hash on a worker
        self.clock = clock
        self._pools: dict[WorkerKey, _Pool] = {}
        self._requests: dict[str, _Routed] = {}

    # -- queries ---------------------------------------------------------------------

    def surviving(self, worker: WorkerKey, hashes: Sequence[int], overlap: int) -> int:
        """Of the ``overlap`` leading ``hashes`` the index holds on ``worker``, how many lead up to
        the first one forecast evicted (all of them when none is).

        Along one prompt's chain the doomed blocks are a trailing run: blocks held by requests in
        flight come first (a request holding a block holds its whole prefix), then free ones,
        each older than the one before it (a request frees its last block first, and a block
        cannot be freed while a deeper one of its chain stays held), and the queue's head, the
        oldest, is popped first. With two lists too: a request that hits a block hits its whole
        prefix, so along a chain the active blocks come before the inactive ones, which go
        first. So a binary search finds the run's start: 128 workers each with 200 doomed
        blocks and a 256-block overlap took 1.5 ms p50 walked block by block, 0.094 ms
        searched (measured by hand, 2026-12-07)."""
        pool = self._pools.get(worker)
        if pool is None or not pool.doomed or overlap <= 0:
            return overlap
        doomed = pool.doomed
        low, high = 0, overlap
        while low < high:
            middle = (low + high) // 2
            h = hashes[middle]
            if h in doomed and self._still_doomed(pool, h):
                high = middle
            else:
                low = middle + 1
        return low

    def doomed(self, worker: WorkerKey) -> int:
        """Blocks forecast evicted on ``worker`` whose removal has not arrived."""
        pool = self._pools.get(worker)
        return 0 if pool is None else len(pool.doomed)

    def known_free(self, worker: WorkerKey) -> int:
        pool = self._pools.get(worker)
        return 0 if pool is None else len(pool.free)

    # -- the router's requests -------------------------------------------------------

    def route(
        self,
        request_id: str,
        worker: WorkerKey,
        hashes: Sequence[int],
        prompt_tokens: int,
        block_size: int,
        hit_blocks: int,
        capacity: int | None,
        decodes: bool = True,
    ) -> int:
        """``request_id`` was sent to ``worker`` expecting ``hit_blocks`` of ``hashes`` cached
        there; returns how many cached blocks its allocation is forecast to evict.

        ``capacity``: the worker's KV blocks (vLLM's ``num_gpu_blocks``); None: not forecast.
        ``decodes``: it generates more than its first token (which the prefill samples)."""
        if request_id in self._requests:
            self.finish(request_id)  # routed again (a retry): moved, not doubled
        pool = self._pools.setdefault(worker, _Pool())
        pool.capacity = capacity
        chain = tuple(hashes[: prompt_tokens // block_size])
        # Blocks beyond its prompt's full ones: a partial last one, or the first decode token's.
        partial = -(-(prompt_tokens + (1 if decodes else 0)) // block_size) - len(chain)
        hits = max(0, min(hit_blocks, len(chain)))
        routed = _Routed(worker, chain, partial, [])
        self._requests[request_id] = routed
        if capacity:
            # Free blocks that are not in the known queue, assumed at its head (module docstring);
            # vLLM keeps one block (the null block) out of the pool.
            unknown = capacity - 1 - len(pool.held) - pool.private - len(pool.free) - len(pool.active)
            for h in chain[:hits]:  # touched: out of the free queue before anything is allocated
                pool.free.pop(h, None)
                pool.active.pop(h, None)
                if pool.two_lists:
                    pool.reused.add(h)
            popping = len(chain) + partial - hits - max(0, unknown)  # known blocks it pops
            for queue in (pool.free, pool.active):  # the active list only once the inactive is empty
                for _ in range(min(len(queue), popping)):
                    h, _ = queue.popitem(last=False)
                    popping -= 1
                    if self._holds(worker, h):
                        pool.doomed[h] = request_id
                        routed.doomed.append(h)
                        self._evicted(pool, h)
        held = pool.held
        for h in chain:
            held[h] = held.get(h, 0) + 1
        pool.private += partial
        return len(routed.doomed)

    def set_eviction(self, worker: WorkerKey, policy: str) -> None:
        """The worker's engine evicts by ``policy`` (discovery's ``kv_eviction``): ``lru`` (vLLM's
        one queue) or ``active-inactive`` (:mod:`dynamo_worker.engine.kv_eviction`)."""
        pool = self._pools.setdefault(worker, _Pool())
        pool.two_lists = policy == "active-inactive"

    def first_token(self, request_id: str) -> None:
        """Its allocation is done: what it doomed counts only ``DOOM_GRACE`` longer."""
        routed = self._requests.get(request_id)
        if routed is not None and routed.expires is None:
            routed.expires = self.clock() + DOOM_GRACE

    def finish(self, request_id: str) -> None:
        """The request ended: its blocks no other request uses join the free queue's tail."""
        routed = self._requests.pop(request_id, None)
        if routed is None:
            return
        pool = self._pools[routed.worker]
        self._forget_doomed(pool, request_id, routed.doomed)
        held = pool.held
        for h in reversed(routed.chain):
            users = held[h] - 1
            if users:
                held[h] = users
                continue
            del held[h]
            if self._holds(routed.worker, h):
                if h in pool.ghosts:  # computed again soon after its eviction
                    del pool.ghosts[h]
                    pool.reused.add(h)
                queue = pool.active if h in pool.reused else pool.free
                queue.pop(h, None)
                queue[h] = None
        pool.private -= routed.partial
        if pool.capacity:
            # Past its share the active list's oldest blocks move to the inactive tail.
            for _ in range(len(pool.active) - int(pool.capacity * ACTIVE_SHARE)):
                h, _ = pool.active.popitem(last=False)
                pool.free[h] = None

    # -- the index's changes ---------------------------------------------------------

    def removed(self, worker: WorkerKey, hashes: Iterable[int]) -> None:
        """The index no longer holds ``hashes`` on ``worker`` (``BlockRemoved``)."""
        pool = self._pools.get(worker)
        if pool is None:
            return
        for h in hashes:
            pool.free.pop(h, None)
            pool.active.pop(h, None)
            pool.doomed.pop(h, None)
            self._evicted(pool, h)

    def forget(self, worker: WorkerKey) -> None:
        """The worker's cache was cleared or its index entry rebuilt: its free queue is unknown
        (its requests in flight still hold their blocks)."""
        pool = self._pools.get(worker)
        if pool is not None:
            pool.free.clear()
            pool.active.clear()
            pool.reused.clear()
            pool.ghosts.clear()
            pool.doomed.clear()

    def remove_instance(self, instance_id: str) -> None:
        for request_id in [r for r, routed in self._requests.items() if routed.worker[0] == instance_id]:
            del self._requests[request_id]
        for worker in [w for w in self._pools if w[0] == instance_id]:
            del self._pools[worker]

    # -- internals -------------------------------------------------------------------

    @staticmethod
    def _evicted(pool: _Pool, h: int) -> None:
        """``h`` was (or is forecast) evicted: not reused any more; with two lists, a ghost."""
        pool.reused.discard(h)
        if pool.two_lists and pool.capacity:
            pool.ghosts.pop(h, None)
            pool.ghosts[h] = None
            while len(pool.ghosts) > pool.capacity:
                pool.ghosts.popitem(last=False)

    def _still_doomed(self, pool: _Pool, h: int) -> bool:
        """Whether the doomed ``h`` still counts; drops it when its grace has run out."""
        routed = self._requests.get(pool.doomed[h])
        if routed is not None and (routed.expires is None or self.clock() < routed.expires):
            return True
        del pool.doomed[h]
        return False

    @staticmethod
    def _forget_doomed(pool: _Pool, request_id: str, hashes: Iterable[int]) -> None:
        for h in hashes:
            if pool.doomed.get(h) == request_id:
                del pool.doomed[h]
