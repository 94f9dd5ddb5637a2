"""The cost of sending a request to each worker, and the choice (``--router-mode kv``).

Dynamo's formula, in KV blocks::

    cost = overlap_weight * new_prefill_blocks + decode_blocks
    new_prefill_blocks = prompt_blocks - overlap_blocks   (the blocks the worker must compute)
    decode_blocks      = the worker's active blocks        (the attention work of what it runs)

``overlap_weight`` (``--kv-overlap-score-weight``, default 1.0) trades time to first token
against inter-token latency: 0 routes by load alone. ``decode_blocks`` is what makes a hot
shared prefix spread instead of piling onto its first holder: every request routed to the
holder adds its blocks there until another worker, paying the prefix's prefill once, is cheaper.

**Decode load** (:class:`ActiveLoad`): the router's own requests in flight, each counted from
:meth:`ActiveLoad.start` (its prompt blocks plus expected output blocks, :func:`expected_blocks`)
to :meth:`ActiveLoad.finish`, corrected by the worker's published ``load_metrics``
(:mod:`dynamo_worker.engine.load`): the larger of the two, so requests routed by other frontends
count too (several routers otherwise pile onto the same worker), while our own burst counts
before the next publication. A publication older than ``stale_after`` (2 s) is ignored: an idle
worker publishes nothing, so its last figure would otherwise stay forever. A publication is also
*discounted* by the blocks of this router's requests that were running when it arrived and have
finished since: a worker publishes at most every 0.1 s, so for up to that long after a request
ends its last figure still counts it, and taken as it is it made a prefix's holder look loaded
by a request that was already gone (a flaky real-engine test: the next turn went to the worker
without the prefix). Prompt blocks that
several requests in flight on one worker share (a tenant's system prompt) count once, as in the
engine's cache: counted once per request, they made the holder of a hot prefix look busier than
a worker without it (35% of requests routed away from their prefix in the first benchmark).

**Busy** (:meth:`KvSelector.is_busy`): a worker whose decode blocks reach ``busy_threshold`` x
its capacity (published ``kv_total_blocks`` or discovery's), or whose fresh published KV usage
reaches ``busy_threshold``, is skipped while some candidate is not busy. When all are busy they
are all candidates again (the frontend's own limits queue or refuse the excess); a worker of
unknown capacity is never busy by blocks. A worker over the threshold stays a candidate for a
request whose leading prompt blocks its running requests hold (:meth:`ActiveLoad.in_flight_prefix`)
when the rest of the request's blocks fit its capacity: the engine schedules it at once on those
shared blocks, while sent elsewhere it computes its prefix again and evicts another (no effect
measured beyond the benchmark's spread: most busy holders hold the prefix cached but idle,
docs/performance.md).

**Balance slack** (``balance_abs`` requests, default 3; ``balance_rel``, default 1.5; SGLang's
cache-aware router has the same two thresholds). With Dynamo's cost as it is, one request more in
flight on a prefix's holder (its 35-47 blocks) outweighs the hit (32-44 blocks of prefill saved
on a 1,024-token system prompt), and in a closed loop some worker always runs one request more:
a third of the benchmark's requests went to a worker holding none of their prompt
(docs/performance.md). Two changes, both only where the load is within a few requests:

- the decode term counts only the blocks above the least-loaded candidate's plus ``balance_abs``
  requests of this one's size: ``max(0, decode_blocks - least_decode_blocks - balance_abs *
  prompt_blocks)``. Within that slack the cache decides; beyond it every further block counts
  in full, as in Dynamo (among candidates all beyond it the choice is Dynamo's: taking the same
  amount off every candidate changes no comparison);
- a worker running more than ``balance_abs`` requests above the least-loaded candidate and more
  than ``balance_rel`` x its count (this router's requests in flight) is skipped like a busy one.
  Counted in requests, because a hot tenant's requests share its prompt blocks: four of them on
  one worker weigh about as many blocks as two other requests, and without this a hot prefix
  piled onto its holder (busiest worker up to 2.6x the quietest in a model of the benchmark).

**A hot prefix gets a second holder** (with the balance slack on, below the load where it acts):
while the mean requests in flight per worker (with this one, rounded up) is under
``balance_abs``, a worker running at least ``HOT_PREFIX_REQUESTS`` (2) requests that share this
request's prefix, and at least that mean, is skipped like an overloaded one when some candidate
runs two requests fewer. Below saturation the slack of 3 requests never applies (three requests
over three workers), and a tenant sending half the traffic kept one holder: 126/46/52 requests
per worker on the benchmark's hot trace at concurrency 3. At concurrency 8 the slack acts and
this rule is off: its purpose is gone there. On there, the main trace's hit rate was 58.3-64.6% in
three rounds, against 63.5-66.2% without the rule and 58.9-64.1% with the gate; that is within
this machine's spread, so the gate rests on the design, not on a measured gain. A slack that
shrank with the load for every request spread the hot tenant too (1.81x) but sent 25 requests of
the uniform trace away from their holder and cost a tenth of its hit rate; this rule fires only
for a prefix that by itself fills a worker's share (docs/performance.md, "Below saturation").
Once the share window below judges (32 requests routed), this rule is off: it also moved 5-6
requests per uniform 3-worker trace off their holder (two of a tenant's users in flight at once),
each a system prompt computed again, and the share rule spreads a hot prefix instead. Off, the
main trace's hit rate rose from 68.2% to 71.2% (medians of three rounds, 3 workers).

**A hot prefix by its share of the traffic** (:meth:`KvSelector.spread_hot`, with the balance
slack on): when the first half of a request's prompt is in at least 1/(N+1) of the last
``SHARE_WINDOW`` (64) requests this router routed to N workers (judged once it has routed 32),
its requests balance the workers: such a request goes only to a candidate that the window sent at
most ``SHARE_MARGIN`` (2) requests more than the least-served one, and of those to one running the
fewest requests (sent behind another request's prefill it waits for it: on 2 workers without this
the hot trace's TTFT p99 was 1.15x round-robin's). The rule above needs two of the
prefix's requests in flight on one worker, which never happens at one request per worker: on 2
workers a tenant sending half the traffic kept one holder, which served 2.05x the requests of the
other. Half the prompt, because a prefix worth a copy on a second worker is a large part of its
requests; a chat template's opening that every request shares is not. Tenants of equal traffic
stay where they are: 8 of them (1/8 each) are below the share on up to 6 workers.

``balance_abs=None`` is Dynamo's choice unchanged (``cost`` below for every candidate).

**Prefill queue** (``prefill_queue``, ``--kv-prefill-queue``; Dynamo's newer router): the prefill
term also counts the blocks that this router's requests on the worker still have to prefill
(routed, no first token yet: :meth:`ActiveLoad.prefill_done`), the work the engine does before
this request's first token. Outside the balance slack: it is a time-to-first-token term, not load.

**Choice**: with ``temperature`` 0, the lowest cost; ties go to the least decode load, then the
fewest published waiting requests, then the worker this router sent the fewest requests lately
(decayed over ``RECENT_SECONDS``), then at random (never by worker order: every frontend would
send its first requests to the same worker). The recent count places a prefix no worker holds
(a new tenant) on the worker with the least traffic rather than on any idle one: below
saturation every worker is often idle, and a random tie left the busiest worker of the hot
trace with the tenants placed there by chance. With ``temperature`` > 0, Dynamo's softmax:
costs normalised to [0, 1] over the candidates, ``p ~ exp(-normalised / temperature)``.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from dynamo_worker.frontend.kv_index import WorkerKey

# Output tokens a request is expected to add to its worker's blocks: its max_tokens, capped
# (a max_tokens far above what requests really produce would make every worker look full).
OUTPUT_TOKENS_CAP = 256
# The balance slack (see the module docstring): load differences within 3 requests are left to
# the cache, a worker more than 3 requests and 1.5x above the least loaded is skipped. Measured
# (docs/performance.md, "The balance slack"): 2 spread a hot tenant better but sent 27 of 256
# requests away from their holder and gave back most of the hit rate; without the skip in
# requests a hot tenant piled onto its holder.
BALANCE_ABS = 3
BALANCE_REL = 1.5
# Requests of one prefix in flight on a worker before it counts as hot there (module docstring).
HOT_PREFIX_REQUESTS = 2
# Time constant of the recent-requests count that breaks ties (module docstring).
RECENT_SECONDS = 30.0
# The hot-prefix share rule (module docstring): the last requests routed that a prefix's share is
# judged over, how many must have been routed before it judges, and how many more of them than
# the least-served candidate a worker may have had before a hot prefix's request passes it by.
SHARE_WINDOW = 64
SHARE_WINDOW_MIN = 32
SHARE_MARGIN = 2


def expected_blocks(
    prompt_tokens: int, max_tokens: int | None, block_size: int, output_tokens_cap: int = OUTPUT_TOKENS_CAP
) -> int:
    """The blocks a request will occupy at its end: prompt plus expected output, rounded up."""
    output = output_tokens_cap if max_tokens is None else min(max(0, max_tokens), output_tokens_cap)
    return -(-(prompt_tokens + output) // block_size)


@attrs.frozen
class PublishedLoad:
    """A worker's last ``load_metrics`` message."""

    active_blocks: int
    total_blocks: int
    usage: float  # 0..1
    waiting: int
    received: float  # clock time it arrived
    # Blocks of this router's requests that it counted and that finished after it arrived.
    finished_since: int = 0

    @property
    def current_blocks(self) -> int:
        """Its active blocks less those known finished since."""
        return max(0, self.active_blocks - self.finished_since)


class ActiveLoad:
    """The load the router sees on each worker: its own requests in flight, in blocks, and the
    workers' published ``load_metrics``."""

    def __init__(self, *, stale_after: float = 2.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stale_after = stale_after
        self.clock = clock
        # request id -> (worker, blocks of its own, shared prompt hashes, blocks, clock at start)
        self._requests: dict[str, tuple[WorkerKey, int, tuple[int, ...], int, float]] = {}
        self._blocks: dict[WorkerKey, int] = {}  # blocks of requests in flight that are theirs alone
        # Prompt blocks of requests in flight, by router hash, with how many requests use each: a
        # block shared by several (a tenant's system prompt) is one block of the worker's cache.
        self._shared: dict[WorkerKey, dict[int, int]] = {}
        self._counts: dict[WorkerKey, int] = {}
        self._published: dict[WorkerKey, PublishedLoad] = {}
        self._capacity: dict[WorkerKey, int] = {}
        # Prefill still ahead of requests in flight (routed, no first token yet), in blocks.
        self._prefill: dict[str, tuple[WorkerKey, int]] = {}
        self._queued: dict[WorkerKey, int] = {}
        # Requests routed to each worker, decayed over RECENT_SECONDS: (count, clock when counted).
        self._recent: dict[WorkerKey, tuple[float, float]] = {}
        # The last SHARE_WINDOW requests routed: (worker, their prompt's router hashes).
        self._window: deque[tuple[WorkerKey, tuple[int, ...]]] = deque(maxlen=SHARE_WINDOW)
        # Requests of the window per worker, kept with it: counted per candidate for every hot
        # request, a scan of the window each took 0.9 ms per decision among 128 workers.
        self._window_routed: dict[WorkerKey, int] = {}

    def start(
        self, request_id: str, worker: WorkerKey, blocks: int, shared: Sequence[int] = (), prefill_blocks: int = 0
    ) -> None:
        """A request was routed to ``worker``; it occupies ``blocks`` until :meth:`finish`.

        ``shared``: the router hashes of its prompt's full blocks (part of ``blocks``): each counts
        once per worker however many requests in flight there use it, as in the engine's cache.
        ``prefill_blocks``: the blocks the worker must compute for it (not cached there), queued
        prefill work until :meth:`prefill_done`.
        """
        if request_id in self._requests:
            self.finish(request_id)  # routed again (a retry or a migration): moved, not doubled
        hashes = tuple(shared[:blocks])
        own = blocks - len(hashes)
        self._requests[request_id] = (worker, own, hashes, blocks, self.clock())
        self._blocks[worker] = self._blocks.get(worker, 0) + own
        refs = self._shared.setdefault(worker, {})
        for h in hashes:
            refs[h] = refs.get(h, 0) + 1
        self._counts[worker] = self._counts.get(worker, 0) + 1
        self._recent[worker] = (self.recent(worker) + 1.0, self.clock())
        if len(self._window) == SHARE_WINDOW:
            dropped = self._window[0][0]
            left = self._window_routed[dropped] - 1
            if left:
                self._window_routed[dropped] = left
            else:
                del self._window_routed[dropped]
        self._window.append((worker, tuple(shared)))
        self._window_routed[worker] = self._window_routed.get(worker, 0) + 1
        if prefill_blocks > 0:
            self._prefill[request_id] = (worker, prefill_blocks)
            self._queued[worker] = self._queued.get(worker, 0) + prefill_blocks

    def recent(self, worker: WorkerKey) -> float:
        """Requests routed to ``worker`` lately: each counts 1, decaying by e every RECENT_SECONDS."""
        found = self._recent.get(worker)
        if found is None:
            return 0.0
        count, at = found
        return count * math.exp(-(self.clock() - at) / RECENT_SECONDS)

    def window_size(self) -> int:
        """Requests in the share window (at most SHARE_WINDOW, the last routed)."""
        return len(self._window)

    def window_sharing(self, hashes: Sequence[int], depth: int) -> int:
        """Requests in the share window whose prompts hold the first ``depth`` of ``hashes``
        (chained: the same hash at that depth is the same prefix)."""
        if depth <= 0 or depth > len(hashes):
            return 0
        key = hashes[depth - 1]
        return sum(1 for _, held in self._window if len(held) >= depth and held[depth - 1] == key)

    def window_routed(self, worker: WorkerKey) -> int:
        """Requests in the share window routed to ``worker``."""
        return self._window_routed.get(worker, 0)

    def prefill_done(self, request_id: str) -> None:
        """The request's first token arrived: its prefill no longer queues on its worker."""
        found = self._prefill.pop(request_id, None)
        if found is None:
            return
        worker, blocks = found
        left = self._queued[worker] - blocks
        if left:
            self._queued[worker] = left
        else:
            del self._queued[worker]

    def queued_prefill(self, worker: WorkerKey) -> int:
        """Blocks of prefill that this router's requests in flight on ``worker`` still wait for."""
        return self._queued.get(worker, 0)

    def finish(self, request_id: str) -> bool:
        """The request ended (any way); False if it was not in flight."""
        found = self._requests.pop(request_id, None)
        if found is None:
            return False
        self.prefill_done(request_id)
        worker, own, hashes, blocks, started = found
        published = self._published.get(worker)
        if published is not None and started <= published.received:
            # That publication counted this request (it was routed before the figure arrived).
            self._published[worker] = attrs.evolve(published, finished_since=published.finished_since + blocks)
        refs = self._shared[worker]
        for h in hashes:
            left_users = refs[h] - 1
            if left_users:
                refs[h] = left_users
            else:
                del refs[h]
        count = self._counts[worker] - 1
        if count:
            self._blocks[worker] -= own
            self._counts[worker] = count
        else:
            del self._blocks[worker], self._counts[worker], self._shared[worker]
        return True

    def set_capacity(self, worker: WorkerKey, blocks: int | None) -> None:
        """The worker's KV capacity in blocks (from discovery); None forgets it."""
        if blocks:
            self._capacity[worker] = blocks
        else:
            self._capacity.pop(worker, None)

    def apply_load_metrics(self, message: Mapping[str, Any]) -> WorkerKey:
        """Take one ``load_metrics`` message (dynamo_worker.engine.load); the worker it is about."""
        worker = (str(message["instance_id"]), int(message.get("dp_rank") or 0))
        kv = message.get("kv_stats") or {}
        stats = message.get("worker_stats") or {}
        self._published[worker] = PublishedLoad(
            active_blocks=int(kv.get("kv_active_blocks") or 0),
            total_blocks=int(kv.get("kv_total_blocks") or 0),
            usage=float(kv.get("gpu_cache_usage_perc") or 0.0),
            waiting=int(stats.get("num_requests_waiting") or 0),
            received=self.clock(),
        )
        return worker

    def remove_instance(self, instance_id: str) -> None:
        """Forget an instance that left discovery (its requests will fail and finish anyway)."""
        for request_id, (worker, *_) in list(self._requests.items()):
            if worker[0] == instance_id:
                self.finish(request_id)
        for table in (self._published, self._capacity, self._recent):
            for worker in [w for w in table if w[0] == instance_id]:
                del table[worker]

    def tracked_blocks(self, worker: WorkerKey) -> int:
        """Blocks of this router's requests in flight on ``worker`` (shared prompt blocks once)."""
        return self._blocks.get(worker, 0) + len(self._shared.get(worker, ()))

    def in_flight(self, worker: WorkerKey) -> int:
        """This router's requests in flight on ``worker``."""
        return self._counts.get(worker, 0)

    def sharing(self, worker: WorkerKey, hashes: Sequence[int], depth: int) -> int:
        """Requests of this router in flight on ``worker`` whose prompts hold the first ``depth``
        of ``hashes`` (``depth`` from :meth:`in_flight_prefix`; chained, so the deepest block counts)."""
        if depth <= 0:
            return 0
        return self._shared.get(worker, {}).get(hashes[depth - 1], 0)

    def in_flight_prefix(self, worker: WorkerKey, hashes: Sequence[int]) -> int:
        """Leading ``hashes`` (a prompt's router hashes) that a request of this router in flight
        on ``worker`` has in its prompt: blocks the engine computes for that request and keeps
        while it runs, so it will hold them when a request sent there now is scheduled (it
        schedules in arrival order), whether or not their ``BlockStored`` has arrived yet."""
        refs = self._shared.get(worker)
        if not refs:
            return 0
        # Chained hashes: a block held means the whole prefix before it is held, so the held ones
        # are a leading run and a binary search finds its end (128 workers all running a 256-block
        # prompt: 0.07 ms p50, 0.24 ms p99; a walk block by block took 0.73 / 1.29 ms).
        low, high = 0, len(hashes)
        while low < high:
            middle = (low + high + 1) // 2
            if hashes[middle - 1] in refs:
                low = middle
            else:
                high = middle - 1
        return low

    def published(self, worker: WorkerKey) -> PublishedLoad | None:
        """The worker's last publication, if fresh."""
        load = self._published.get(worker)
        if load is None or self.clock() - load.received > self.stale_after:
            return None
        return load

    def published_blocks(self, worker: WorkerKey) -> int | None:
        """The worker's fresh published active blocks, less this router's requests finished since."""
        load = self.published(worker)
        return None if load is None else load.current_blocks

    def foreign_blocks(self, worker: WorkerKey) -> int:
        """Blocks the worker's fresh publication counts beyond this router's requests in flight
        there: other frontends' requests (0 without a fresh publication)."""
        published = self.published_blocks(worker)
        return 0 if published is None else max(0, published - self.tracked_blocks(worker))

    def decode_blocks(self, worker: WorkerKey) -> int:
        tracked = self.tracked_blocks(worker)
        published = self.published_blocks(worker)
        return tracked if published is None else max(tracked, published)

    def capacity(self, worker: WorkerKey) -> int | None:
        known = self._capacity.get(worker)
        if known:
            return known
        load = self._published.get(worker)  # capacity does not go stale
        return load.total_blocks if load is not None and load.total_blocks > 0 else None

    def waiting(self, worker: WorkerKey) -> int:
        load = self.published(worker)
        return 0 if load is None else load.waiting


@attrs.frozen
class Decision:
    """The worker chosen for one request, and why."""

    worker: WorkerKey
    cost: float
    overlap_blocks: int  # the predicted cached prefix on that worker
    prompt_blocks: int
    busy_skipped: int  # busy workers passed over
    # Why a worker holding more of the prompt was passed over (None: it was not): "busy" (the
    # holder was skipped as busy), "balance" (skipped for running too many requests more than
    # the least-loaded worker), "published_load" (the holder would have won on this router's
    # own count of its load: its published load decided), "load" (this router's own count of
    # the holder's requests in flight outweighed the hit), "sampled" (temperature).
    away_from_holder: str | None = None
    balance_skipped: int = 0  # workers passed over for balance


class KvSelector:
    """Scores candidate workers by cost and picks one (Dynamo's knobs)."""

    def __init__(
        self,
        *,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        busy_threshold: float | None = 0.9,
        balance_abs: float | None = BALANCE_ABS,
        balance_rel: float = BALANCE_REL,
        prefill_queue: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        if overlap_weight < 0 or temperature < 0:
            raise ValueError("overlap_weight and temperature must be >= 0")
        if busy_threshold is not None and busy_threshold <= 0:
            raise ValueError("busy_threshold must be > 0 (or None: never busy)")
        if (balance_abs is not None and balance_abs < 0) or balance_rel < 1:
            raise ValueError("balance_abs must be >= 0 (or None: Dynamo's choice) and balance_rel >= 1")
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.busy_threshold = busy_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self.prefill_queue = prefill_queue
        self.rng = rng or random.Random()

    def cost(self, prompt_blocks: int, overlap_blocks: int, decode_blocks: float, queued_prefill: int = 0) -> float:
        """Dynamo's cost (the decode term as given: :meth:`choose` passes it less the slack);
        ``queued_prefill``: the worker's prefill still ahead of this request, with ``prefill_queue``."""
        return self.overlap_weight * (max(0, prompt_blocks - overlap_blocks) + queued_prefill) + decode_blocks

    def queued(self, workers: Sequence[WorkerKey], load: ActiveLoad) -> list[int]:
        """Each worker's queued prefill blocks as the cost counts them (0 without ``prefill_queue``)."""
        return [load.queued_prefill(w) if self.prefill_queue else 0 for w in workers]

    def decode_terms(self, decode: Sequence[float], prompt_blocks: int) -> list[float]:
        """Each candidate's decode term: its blocks beyond the least-loaded candidate's plus the
        slack of ``balance_abs`` requests of ``prompt_blocks`` (as given with ``balance_abs=None``)."""
        if self.balance_abs is None or not decode:
            return list(decode)
        floor = min(decode) + self.balance_abs * prompt_blocks
        return [max(0.0, d - floor) for d in decode]

    def is_overloaded(self, count: int, least: int) -> bool:
        """A worker running ``count`` requests is too far above the least-loaded one (``least``)."""
        if self.balance_abs is None:
            return False
        return count - least > self.balance_abs and count > self.balance_rel * least

    def crowded(
        self,
        workers: Sequence[WorkerKey],
        candidates: Sequence[WorkerKey],
        sharing: Mapping[WorkerKey, int],
        load: ActiveLoad,
    ) -> set[WorkerKey]:
        """Candidates that run a hot prefix's requests (``sharing``: per worker, those sharing this
        request's prefix) beyond a fair share of all ``workers``' requests while some candidate runs
        two fewer requests (module docstring)."""
        if not sharing or not candidates:
            return set()
        mean = math.ceil((sum(load.in_flight(w) for w in workers) + 1) / len(workers))
        if self.balance_abs is not None and mean >= self.balance_abs:
            return set()  # loaded enough for the balance slack to act (module docstring)
        fair = max(HOT_PREFIX_REQUESTS, mean)
        least = min(load.in_flight(w) for w in candidates)
        return {w for w in candidates if sharing.get(w, 0) >= fair and load.in_flight(w) - least > 1}

    @staticmethod
    def share(workers: Sequence[WorkerKey], hashes: Sequence[int], load: ActiveLoad) -> bool | None:
        """Whether the first half of the prompt (``hashes``) is in at least 1/(N+1) of the share
        window's requests, N = len(workers); None until the window holds SHARE_WINDOW_MIN."""
        depth = -(-len(hashes) // 2)  # half its prompt: a chat template's opening is not a prefix
        seen = load.window_size()
        if depth == 0 or seen < SHARE_WINDOW_MIN:
            return None
        return load.window_sharing(hashes, depth) * (len(workers) + 1) >= seen

    def spread_hot(self, candidates: Sequence[WorkerKey], hot: bool | None, load: ActiveLoad) -> list[WorkerKey]:
        """For a request whose prefix is ``hot`` by its share of the traffic (:meth:`share`): the
        candidates that the share window sent at most SHARE_MARGIN requests more than the least
        served one; for any other request, all of them."""
        if self.balance_abs is None or len(candidates) < 2 or not hot:
            return list(candidates)
        routed = {w: load.window_routed(w) for w in candidates}
        least = min(routed.values())
        even = [w for w in candidates if routed[w] - least <= SHARE_MARGIN]
        # Of those, the ones running the fewest requests: a hot prefix is (soon) on each of them,
        # and a request sent behind another's prefill waits for it (the TTFT tail).
        fewest = min(load.in_flight(w) for w in even)
        return [w for w in even if load.in_flight(w) == fewest]

    def is_busy(self, worker: WorkerKey, load: ActiveLoad, running_shared: int = 0, request_blocks: int = 0) -> bool:
        """Over the busy threshold, unless the request's first ``running_shared`` prompt blocks are
        in use by requests running there and the rest of its ``request_blocks`` fit in the worker's
        capacity: it adds only those (the engine schedules it at once, hitting its prefix), while
        sent elsewhere it computes the prefix again and evicts some other one."""
        if not self._over_threshold(worker, load):
            return False
        if running_shared <= 0 or request_blocks <= 0:
            return True
        capacity = load.capacity(worker)
        return not capacity or load.decode_blocks(worker) + max(0, request_blocks - running_shared) > capacity

    def _over_threshold(self, worker: WorkerKey, load: ActiveLoad) -> bool:
        threshold = self.busy_threshold
        if threshold is None:
            return False
        capacity = load.capacity(worker)
        if capacity and load.decode_blocks(worker) >= threshold * capacity:
            return True
        published = load.published(worker)
        if published is None:
            return False
        if published.finished_since:  # its usage still counts requests that are gone
            return bool(published.total_blocks) and published.current_blocks >= threshold * published.total_blocks
        return published.usage >= threshold

    def choose(
        self,
        workers: Sequence[WorkerKey],
        prompt_blocks: int,
        overlaps: Mapping[WorkerKey, int],
        load: ActiveLoad,
        running_shared: Mapping[WorkerKey, int] | None = None,
        request_blocks: int = 0,
        running_sharing: Mapping[WorkerKey, int] | None = None,
        hashes: Sequence[int] = (),
    ) -> Decision:
        """The worker for a request of ``prompt_blocks`` blocks among ``workers`` (not empty).

        ``running_shared``: per worker, the leading prompt blocks that requests running there have
        in their prompts (:meth:`ActiveLoad.in_flight_prefix`); ``request_blocks``: the blocks this
        request will occupy (:func:`expected_blocks`). With both, a worker over the busy threshold
        stays a candidate if the request's own blocks fit (:meth:`is_busy`). ``running_sharing``:
        per worker, its requests in flight that share that prefix (:meth:`ActiveLoad.sharing`), for
        the hot-prefix rule (:meth:`crowded`). ``hashes``: the prompt's router hashes, for the
        hot-prefix share rule (:meth:`spread_hot`)."""
        if not workers:
            raise ValueError("no candidate workers")
        shared = running_shared or {}
        candidates = (
            [w for w in workers if not self.is_busy(w, load, shared.get(w, 0), request_blocks)]
            if self.busy_threshold is not None
            else []
        )
        skipped = len(workers) - len(candidates)
        if not candidates:
            candidates, skipped = list(workers), 0
        not_busy = candidates
        if self.balance_abs is not None:
            least = min(load.in_flight(w) for w in candidates)
            candidates = [w for w in candidates if not self.is_overloaded(load.in_flight(w), least)]
            # Once the share window judges, a prefix of an ordinary share keeps its holder (its
            # moves cost hit rate), and a hot one is spread by spread_hot.
            hot = self.share(workers, hashes, load)
            crowded = set() if hot is not None else self.crowded(workers, candidates, running_sharing or {}, load)
            if crowded and len(crowded) < len(candidates):
                candidates = [w for w in candidates if w not in crowded]
            candidates = self.spread_hot(candidates, hot, load)
        decode = [load.decode_blocks(w) for w in candidates]
        terms = self.decode_terms(decode, prompt_blocks)
        costs = [
            self.cost(prompt_blocks, overlaps.get(w, 0), t, q)
            for w, t, q in zip(candidates, terms, self.queued(candidates, load))
        ]
        if self.temperature == 0 or len(candidates) == 1:
            index = self._lowest(candidates, costs, decode, load)
        else:
            index = self._sample(costs)
        worker = candidates[index]
        return Decision(
            worker=worker,
            cost=costs[index],
            overlap_blocks=overlaps.get(worker, 0),
            prompt_blocks=prompt_blocks,
            busy_skipped=skipped,
            away_from_holder=self._away_from_holder(
                worker, costs[index], min(costs), workers, not_busy, candidates, prompt_blocks, overlaps, load
            ),
            balance_skipped=len(not_busy) - len(candidates),
        )

    def _away_from_holder(
        self,
        chosen: WorkerKey,
        chosen_cost: float,
        lowest: float,
        workers: Sequence[WorkerKey],
        not_busy: Sequence[WorkerKey],
        candidates: Sequence[WorkerKey],
        prompt_blocks: int,
        overlaps: Mapping[WorkerKey, int],
        load: ActiveLoad,
    ) -> str | None:
        """Why the chosen worker holds less of the prompt than the best holder (see :class:`Decision`)."""
        best = max((overlaps.get(w, 0) for w in workers), default=0)
        if best == 0 or overlaps.get(chosen, 0) >= best:
            return None
        if not any(overlaps.get(w, 0) == best for w in not_busy):
            return "busy"
        holders = [w for w in candidates if overlaps.get(w, 0) == best]
        if not holders:
            return "balance"
        if chosen_cost > lowest:
            return "sampled"
        # The same choice on this router's own count of every candidate's load.
        own = self.decode_terms([load.tracked_blocks(w) for w in candidates], prompt_blocks)
        own_cost = dict(zip(candidates, own))
        queued = dict(zip(candidates, self.queued(candidates, load)))
        held = min(self.cost(prompt_blocks, best, own_cost[w], queued[w]) for w in holders)
        away = self.cost(prompt_blocks, overlaps.get(chosen, 0), own_cost[chosen], queued[chosen])
        return "published_load" if held <= away else "load"

    def explain(
        self, workers: Sequence[WorkerKey], prompt_blocks: int, overlaps: Mapping[WorkerKey, int], load: ActiveLoad
    ) -> list[dict[str, Any]]:
        """Every candidate's terms, for a debug log of one decision (the slack taken over all of
        them, busy or not)."""
        terms = self.decode_terms([load.decode_blocks(w) for w in workers], prompt_blocks)
        least = min((load.in_flight(w) for w in workers), default=0)
        queued = self.queued(workers, load)
        return [
            {
                "worker": w,
                "overlap": overlaps.get(w, 0),
                "tracked": load.tracked_blocks(w),
                "published": load.published_blocks(w),
                "in_flight": load.in_flight(w),
                "capacity": load.capacity(w),
                "busy": self.is_busy(w, load),
                "overloaded": self.is_overloaded(load.in_flight(w), least),
                "queued_prefill": q,
                "cost": self.cost(prompt_blocks, overlaps.get(w, 0), term, q),
            }
            for w, term, q in zip(workers, terms, queued)
        ]

    def _lowest(self, candidates: list[WorkerKey], costs: list[float], decode: list[int], load: ActiveLoad) -> int:
        """The lowest cost; a tie to the least decode load, then the fewest waiting requests, then
        the least recent traffic, then at random."""
        keys: tuple[Callable[[int], float], ...] = (
            lambda i: costs[i],
            lambda i: decode[i],
            lambda i: load.waiting(candidates[i]),
            lambda i: load.recent(candidates[i]),
        )
        tied = list(range(len(candidates)))
        for key in keys:
            if len(tied) == 1:
                break
            values = {i: key(i) for i in tied}
            best = min(values.values())
            tied = [i for i in tied if values[i] == best]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    def _sample(self, costs: list[float]) -> int:
        low, high = min(costs), max(costs)
        if high == low:
            return self.rng.randrange(len(costs))
        scale = 1.0 / ((high - low) * self.temperature)
        weights = [math.exp(-(c - low) * scale) for c in costs]
        pick = self.rng.random() * sum(weights)
        for index, w in enumerate(weights):
            pick -= w
            if pick < 0:
                return index
        return len(costs) - 1
