"""Discovery: a JetStream key-value bucket of live instances, kept alive by per-key leases.

Each instance writes one record per endpoint under ``{ns}.{component}.{endpoint}.{instance}``
with a per-message TTL (``--lease-ttl`` seconds) and rewrites it every third of that. A process
that dies stops rewriting, and the server expires its keys: the bucket is created with
``limit_marker_ttl`` so watchers see the expiry as a PURGE about a millisecond after it runs out.
A clean shutdown deletes its keys at once. A watcher does not admit a record written longer ago than
its lease (see :func:`lease_lapsed`), whatever the store holds, and purges it a lease later unless it
was rewritten meanwhile (:meth:`Discovery.purge_lapsed`), so dead records do not pile up. Watchers
are recreated after a reconnect, because an existing JetStream watcher stalls for many seconds after
a server restart. A watcher that hears
nothing for a lease asks the bucket's stream whether it has a quorum: if not, it says so once (and
once when it works again); if it has, but known instances went quiet, its own consumer was lost,
and it watches anew.

On one nats-server the bucket has one replica, in memory. On a cluster (``--discovery-replicas N``)
it has N replicas in file storage, so discovery survives the loss of a minority of the servers and a
partition leaves the majority side with the live view (an instance cut off with a minority cannot
refresh its lease, and leaves routing when it runs out).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import msgspec
import nats.errors
from nats.js.api import Header, KeyValueConfig, StorageType
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError, NotFoundError
from nats.js.kv import KV_DEL, KV_OP, KV_PURGE, MSG_ROLLUP_SUBJECT, StopIterSentinel

from dynamo_worker.core import wire
from dynamo_worker.core.errors import UsageError

if TYPE_CHECKING:
    from nats.js import JetStreamContext
    from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

BUCKET = "dynamo_worker_instances"
#: A replica the bucket's leader has not heard from for this long (in ns) does not count for
#: quorum (a healthy cluster's replicas, idle or not, are heard from every few ms). No longer than the
#: shortest lease (1 s), so that a watch quiet for a lease because quorum is lost is told from one that stalled.
PEER_SILENCE_NS = 1_000_000_000
#: Seconds a record may be older than its lease (by the watcher's clock against the JetStream
#: leader's timestamp) and still be admitted: the clock skew between hosts plus delivery delay.
CLOCK_SKEW_ALLOWANCE = 5.0
#: Seconds a PURGE marker stays in the bucket: the server's lease-expiry markers (the bucket's
#: ``limit_marker_ttl``) and the purges of lapsed records alike, so markers do not pile up either.
MARKER_TTL = 5
#: Seconds at least that a record's write waits for its ack (a third of the lease otherwise).
PUT_TIMEOUT_FLOOR = 1.0
#: JetStream's "wrong last sequence": a revision-guarded write found a newer revision of the key.
WRONG_LAST_SEQUENCE = 10071


class InstanceRecord(msgspec.Struct, omit_defaults=True):
    """What an instance publishes about one of its endpoints."""

    namespace: str
    component: str
    endpoint: str
    instance_id: str
    role: str
    pid: int
    host: str
    data: dict[str, Any] = {}
    address: str = ""  # host:port of its TCP request-plane listener ("": NATS only)
    lease_ttl: int = 0  # the writer's --lease-ttl (0: an older writer that did not say; not judged)

    @property
    def key(self) -> str:
        return f"{self.namespace}.{self.component}.{self.endpoint}.{self.instance_id}"

    @property
    def subject(self) -> str:
        return self.key


_record_decoder = msgspec.json.Decoder(InstanceRecord)


def lease_lapsed(record: InstanceRecord, written: datetime.datetime | None, now: datetime.datetime) -> float:
    """Seconds by which ``record``, stored at ``written`` (the stream's timestamp, the JetStream
    leader's clock), is past its lease at ``now`` (this host's clock); 0 while it is within it.

    A live instance rewrites its record every third of its lease, so the newest copy is never older
    than that. An older one is a copy the store should have expired: a restarted replica's file
    store can bring such a copy back (issue 18). Up to :data:`CLOCK_SKEW_ALLOWANCE` seconds past the
    lease are forgiven, for clocks that disagree and slow delivery: a host whose clock runs ahead
    of the NATS servers' by more than that would judge every record lapsed (and says so, one line
    per record); one whose clock runs behind admits a lapsed copy that much longer.
    """
    if not record.lease_ttl or written is None:
        return 0.0
    past = (now - written).total_seconds() - record.lease_ttl
    return past if past > CLOCK_SKEW_ALLOWANCE else 0.0


class Discovery:
    """Registers this process's records and keeps their leases alive."""

    def __init__(self, js: JetStreamContext, lease_ttl: int, replicas: int = 1) -> None:
        self.js = js
        self.lease_ttl = lease_ttl
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._records: dict[str, InstanceRecord] = {}
        self._keepalive: asyncio.Task[None] | None = None
        self._failing = False  # keep-alives are failing: said once, and once when they work again

    async def bucket(self) -> KeyValue:
        if self._kv is None:
            try:
                kv = await self.js.key_value(BUCKET)
            except BucketNotFoundError:
                kv = await self._create()
            self._kv = kv
        return self._kv

    async def _create(self) -> KeyValue:
        # Replicated: file storage, so a restarted server catches up from its own copy plus the log.
        storage = StorageType.MEMORY if self.replicas == 1 else StorageType.FILE
        try:
            return await self.js.create_key_value(
                KeyValueConfig(
                    bucket=BUCKET, history=1, storage=storage, replicas=self.replicas, limit_marker_ttl=MARKER_TTL
                )
            )
        except APIError as exc:
            # 10074: replicas > 1 on a server that is not clustered; 10005 ("no suitable peers for
            # placement") and 10023 ("insufficient resources"): fewer servers than replicas.
            if self.replicas > 1 and exc.err_code in (10074, 10005, 10023):
                raise UsageError(
                    f"--discovery-replicas {self.replicas}: the NATS cluster cannot hold {self.replicas} replicas "
                    f"({exc.description}); give at most the number of JetStream servers in the cluster "
                    "(1 for a single nats-server)"
                ) from exc
            raise

    async def check_replicas(self) -> None:
        """Create (or find) the bucket now; a one-line :class:`UsageError` if the cluster has fewer
        servers than ``--discovery-replicas``. A bucket made earlier with another count is used as
        it is, with a warning (changing it is the operator's: ``nats kv edit``, or recreate it)."""
        kv = await self.bucket()
        status = await kv.status()
        have = status.stream_info.config.num_replicas or 1
        if have != self.replicas:
            log.warning(
                "the discovery bucket %s exists with %d replica(s), not the %d of --discovery-replicas; "
                "using it as it is",
                BUCKET,
                have,
                self.replicas,
            )

    async def _put(self, record: InstanceRecord) -> None:
        await self.bucket()
        # kv.put() takes no TTL; a JetStream publish on the key's subject does. Its ack is awaited
        # for about a keep-alive interval, not nats-py's 5 s: while JetStream elects a leader the
        # publish hangs, and a round stuck for 5 s rewrote the record only seconds after JetStream
        # answered again, when the servers had expired it meanwhile (the instance out of routing).
        await self.js.publish(
            f"$KV.{BUCKET}.{record.key}",
            wire.encode(record),
            msg_ttl=self.lease_ttl,
            timeout=max(self.lease_ttl / 3, PUT_TIMEOUT_FLOOR),
        )

    async def register(self, record: InstanceRecord) -> InstanceRecord:
        """Publish ``record`` (stamped with this lease, for watchers to judge its age) and keep it alive."""
        record = msgspec.structs.replace(record, lease_ttl=self.lease_ttl)
        self._records[record.key] = record
        await self._put(record)
        if self._keepalive is None:
            self._keepalive = asyncio.create_task(self._keep_alive(), name="discovery-keepalive")
        return record

    async def withdraw(self, key: str | None = None) -> None:
        """Delete one record (or all of this process's) so routers stop sending work at once."""
        keys = [key] if key is not None else list(self._records)
        kv = await self.bucket()
        for k in keys:
            self._records.pop(k, None)
            await kv.delete(k)

    async def purge_lapsed(self, key: str, revision: int) -> bool:
        """Remove a record a watcher refused as past its lease, unless the key was rewritten since.

        A PURGE, as the server's own lease expiry (watchers see a death, not a withdrawal), guarded
        by the revision the watcher read (``Nats-Expected-Last-Subject-Sequence``), so an instance
        that registered again under the key meanwhile is never removed; its marker expires after
        :data:`MARKER_TTL` seconds. True if purged, False if the key holds a newer revision.
        """
        await self.bucket()
        headers = {
            KV_OP: KV_PURGE,
            Header.ROLLUP: MSG_ROLLUP_SUBJECT,
            Header.EXPECTED_LAST_SUBJECT_SEQUENCE: str(revision),
        }
        try:
            await self.js.publish(f"$KV.{BUCKET}.{key}", b"", headers=headers, msg_ttl=MARKER_TTL)
        except APIError as exc:
            if exc.err_code == WRONG_LAST_SEQUENCE:
                return False
            raise
        return True

    async def refresh(self) -> None:
        """Rewrite every record now (also after a reconnect: the bucket may be new).

        All at once: one after the other, a worker's five or more records took five acks' time
        per round, which a busy machine stretches towards the lease.
        """
        records = list(self._records.values())
        try:
            await asyncio.gather(*(self._put(r) for r in records))
        except (BucketNotFoundError, NotFoundError):
            self._kv = None  # the server lost its JetStream state: recreate the bucket
            await asyncio.gather(*(self._put(r) for r in records))

    async def _keep_alive(self) -> None:
        # Rounds start every third of the lease, counted from the previous round's start (not its
        # end), so a slow round does not push the next one later.
        interval = max(self.lease_ttl / 3, 0.2)
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, due - loop.time()))
            started = loop.time()
            # Two thirds of the lease gone: the lease may lapse (during an outage, each failed round
            # waits out its publish timeout: that lateness is the outage's, already said).
            if started - due > interval and not self._failing:
                log.warning(
                    "discovery keep-alive ran %.1f s late (the event loop or NATS was busy); the lease is %s s",
                    started - due,
                    self.lease_ttl,
                )
            try:
                await self.refresh()
            except Exception as exc:  # an outage: keep trying, the lease may lapse meanwhile
                if not self._failing:
                    # Once per outage: with no JetStream quorum (most servers down, or this one cut
                    # off) this fails every round. Requests to instances already known still flow.
                    log.warning(
                        "discovery keep-alive failed (%s: %s): JetStream is unreachable or has no "
                        "quorum; this instance's lease runs out in %s s and peers stop routing to it "
                        "until it comes back; retrying every %.1f s",
                        type(exc).__name__,
                        exc or "",
                        self.lease_ttl,
                        interval,
                    )
                    self._failing = True
            else:
                if self._failing:
                    log.warning("discovery keep-alive works again: this instance is back in discovery")
                    self._failing = False
            due = started + interval

    async def close(self) -> None:
        if self._keepalive is not None:
            await cancel_and_wait(self._keepalive)
            self._keepalive = None


Listener = Callable[[str, InstanceRecord | None, bool], None]


async def cancel_and_wait(task: asyncio.Task[Any], attempts: int = 20) -> None:
    """Cancel ``task`` and wait for it to end.

    nats-py swallows a ``CancelledError`` that lands while it flushes a publish
    (``Client._flush_pending``), so a task cancelled at that moment goes on running: cancel
    again until it ends (bounded; a task that still runs is logged, not waited for forever).
    """
    for _ in range(attempts):
        if task.done():
            break
        task.cancel()
        await asyncio.wait([task], timeout=0.25)
    if not task.done():
        log.warning("task %s did not stop after %d cancellations", task.get_name(), attempts)
        return
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())


class InstanceWatcher:
    """The live set of records under a key prefix, with callbacks on arrivals and departures."""

    def __init__(self, discovery: Discovery, prefix: str) -> None:
        self.discovery = discovery
        self.prefix = prefix
        self.records: dict[str, InstanceRecord] = {}
        self.version = 0  # bumped on every change of ``records``: views computed from it can be cached
        self.listeners: list[Listener] = []
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        # The watch fails or stalls (no JetStream quorum): said once per outage, and once when it
        # works again. Kept across restarts (a restart during an outage is the same outage).
        self._failing = False
        self._refused: set[tuple[str, int | None]] = set()  # lapsed copies said once each
        self._purges: dict[tuple[str, int], asyncio.Task[None]] = {}  # lapsed copies waiting to be purged

    def add_listener(self, listener: Listener) -> None:
        """``listener(key, record, False)`` on arrival or update; ``listener(key, None, expired)``
        on departure, where ``expired`` is True when the lease ran out (the process died) and
        False for a clean withdrawal (the process is draining: its open streams go on)."""
        self.listeners.append(listener)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch-{self.prefix}")

    async def restart(self) -> None:
        await self.stop()
        self.start()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for task in list(self._purges.values()):
            await cancel_and_wait(task)
        self._purges.clear()

    def matching(self, component: str, endpoint: str) -> list[InstanceRecord]:
        return [r for r in self.records.values() if r.component == component and r.endpoint == endpoint]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` holds on the live set, up to ``timeout`` seconds."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), timeout)
            except asyncio.TimeoutError:
                return False
        return True

    async def _notify(self, key: str, record: InstanceRecord | None, expired: bool) -> None:
        for listener in self.listeners:
            try:
                listener(key, record, expired)
            except Exception:  # one listener's bug must not break discovery for the others
                log.exception("discovery listener %r failed on %s", listener, key)
        async with self._changed:
            self._changed.notify_all()

    async def _apply(self, key: str, record: InstanceRecord | None, expired: bool = False) -> None:
        if record is None:
            if self.records.pop(key, None) is not None:
                self.version += 1
                log.info("discovery: %s left (%s)", key, "its lease expired" if expired else "withdrawn")
                await self._notify(key, None, expired)
        else:
            known = self.records.get(key)
            if known != record:  # a lease refresh rewrites the same record
                self.version += 1
                if known is None:
                    log.info("discovery: %s joined", key)
            self.records[key] = record
            await self._notify(key, record, False)

    def _lapsed(self, entry: KeyValue.Entry, record: InstanceRecord) -> bool:
        """Whether a record that arrives is past its lease (not admitted). Judged on arrival only: a
        known instance's copy re-read after an outage (when nobody could renew) keeps it, as the
        last view is kept during the outage, until the server expires it or it is renewed."""
        # nats-py annotates ``created`` as int; it holds the stream's timestamp, a datetime.
        written = cast("datetime.datetime | None", entry.created)
        past = lease_lapsed(record, written, datetime.datetime.now(datetime.timezone.utc))
        if past and (entry.key, entry.revision) not in self._refused:
            self._refused.add((entry.key, entry.revision))
            log.warning(
                "discovery: not admitting %s: its record (revision %s) is %.1f s past its %d s lease "
                "(%.0f s allowed for clock skew): a copy the store should have expired (a restarted "
                "replica's), or this host's clock runs ahead of the NATS servers'; purging it in %d s "
                "unless its instance rewrites it meanwhile",
                entry.key,
                entry.revision,
                past,
                record.lease_ttl,
                CLOCK_SKEW_ALLOWANCE,
                record.lease_ttl,
            )
        if past and entry.revision and (entry.key, entry.revision) not in self._purges:
            self._purges[(entry.key, entry.revision)] = asyncio.create_task(
                self._purge_later(entry.key, entry.revision, record.lease_ttl), name=f"purge-{entry.key}"
            )
        return bool(past)

    async def _purge_later(self, key: str, revision: int, wait: float) -> None:
        """Purge a lapsed copy once its instance has had a whole lease to rewrite it.

        Right after a JetStream outage a live instance's record is as old as a dead one's: a live
        instance rewrites it within a third of its lease once JetStream answers, which moves the
        revision on, and the purge (guarded by the revision read) then leaves it alone.
        """
        try:
            await asyncio.sleep(wait)
            if await self.discovery.purge_lapsed(key, revision):
                log.info("discovery: purged %s (revision %s), past its lease and not rewritten", key, revision)
                return
            try:
                await (await self.discovery.bucket()).get(key)
            except KeyNotFoundError:  # a deletion marker (or none): another watcher purged it, or the server expired it
                log.debug("discovery: %s (revision %s) is gone already", key, revision)
            else:
                log.info(
                    "discovery: %s was rewritten since revision %s (its instance is back); not purged", key, revision
                )
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            # No quorum again, or no connection: the copy stays; the next read of it tries again.
            log.info("discovery: could not purge %s (revision %s) yet: %s", key, revision, type(exc).__name__)
        finally:
            self._purges.pop((key, revision), None)

    def _outage(self, what: str) -> None:
        if self._failing:
            log.debug("discovery watch %s (still)", what)
            return
        self._failing = True
        log.warning(
            "discovery watch %s: JetStream is unreachable or has no quorum; routing on the last view "
            "(%d records) until it answers again: instances that join or die meanwhile are not seen",
            what,
            len(self.records),
        )

    async def _jetstream_answers(self, kv: KeyValue, timeout: float) -> bool:
        """Whether the bucket's stream has a quorum now. Its info alone does not tell: a leader that
        lost its peers goes on answering (and a leaderless stream answers late, or times out), so
        count the replicas the leader has heard from lately."""
        try:
            status = await asyncio.wait_for(kv.status(), timeout)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            self._outage(f"stalled ({type(exc).__name__}: {str(exc) or 'no answer in time'})")
            return False
        cluster = status.stream_info.cluster
        if cluster is None:  # not clustered: the one server answered
            return True
        if not cluster.leader:
            self._outage("stalled (the discovery bucket has no leader)")
            return False
        replicas = cluster.replicas or []
        heard = sum(1 for r in replicas if r.current and not r.offline and (r.active or 0) < PEER_SILENCE_NS)
        if 1 + heard <= (1 + len(replicas)) // 2:
            self._outage(
                f"stalled (the discovery bucket's leader {cluster.leader} has heard from {heard} of its "
                f"{len(replicas)} replicas in {PEER_SILENCE_NS / 1e9:g} s)"
            )
            return False
        return True

    async def _run(self) -> None:
        # A live instance rewrites its record three times per lease, so a watch quiet for a whole
        # lease either has nobody to hear from or has stalled (without JetStream quorum no write
        # lands, and the watch just goes quiet, with no error): ask the stream then, so that a stall
        # is said, and re-read the bucket when it answers again (or at once if it answers but
        # records are known: then the watch itself stalled).
        quiet = max(float(self.discovery.lease_ttl), 1.0)
        while True:
            watcher = None
            try:
                kv = await self.discovery.bucket()
                creating = asyncio.ensure_future(kv.watch(f"{self.prefix}>"))
                try:
                    watcher = await asyncio.shield(creating)
                except asyncio.CancelledError:  # a restart mid-creation: finish, to let it go below
                    with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                        watcher = await creating
                    raise
                seen: set[str] = set()
                initial = True
                while True:
                    try:
                        entry = await watcher.updates(timeout=quiet)
                    except nats.errors.TimeoutError:
                        if not await self._jetstream_answers(kv, quiet):
                            continue
                        if self._failing:
                            break  # it answers again: watch anew (this one may have missed expiries)
                        if self.records:
                            # JetStream has quorum, yet instances we know sent nothing for a lease:
                            # this watch stalled (its consumer was lost with a server, no error):
                            # watch anew, so that expiries it missed are seen.
                            log.info(
                                "discovery watch heard nothing for %.0f s with %d records known and "
                                "JetStream answering; re-reading the bucket",
                                quiet,
                                len(self.records),
                            )
                            break
                        continue
                    if isinstance(entry, StopIterSentinel):  # the watcher was stopped
                        break
                    if self._failing and not initial:
                        # This watch went on after the outage (same consumer: it missed nothing).
                        log.warning("discovery watch works again: JetStream answers; the watch goes on")
                        self._failing = False
                    if entry is None:  # end of the initial snapshot
                        if initial:
                            if self._failing:
                                log.warning(
                                    "discovery watch works again: JetStream answers; the view is re-read "
                                    "from the bucket (%d records)",
                                    len(seen),
                                )
                                self._failing = False
                            for gone in set(self.records) - seen:
                                await self._apply(gone, None, expired=True)
                            initial = False
                            self.ready.set()
                        continue
                    if initial:
                        seen.add(entry.key)
                    if entry.operation in (KV_DEL, KV_PURGE) or not entry.value:
                        # The server marks a lease expiry as a PURGE; we withdraw with DEL.
                        await self._apply(entry.key, None, expired=entry.operation == KV_PURGE)
                    else:
                        try:
                            record = _record_decoder.decode(entry.value)
                        except msgspec.DecodeError:
                            log.warning("ignoring a malformed discovery record at %s", entry.key)
                            continue
                        if entry.key not in self.records and self._lapsed(entry, record):
                            continue
                        await self._apply(entry.key, record)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # outage or lost bucket: keep the last view, try again
                self._outage(f"failed ({type(exc).__name__}: {exc})")
                self.discovery._kv = None
                await asyncio.sleep(0.5)
            finally:
                if watcher is not None:
                    await _stop_watch(watcher)


async def _stop_watch(watcher: Any) -> None:
    """Unsubscribe a KV watcher: its consumer and heartbeat tasks otherwise outlive it, one more
    set after every reconnect (watchers are recreated then)."""
    try:
        await watcher.stop()
    except nats.errors.Error as exc:  # the connection is closed or reconnecting: nothing to undo
        log.debug("discovery: could not stop a watcher (%s)", type(exc).__name__)
