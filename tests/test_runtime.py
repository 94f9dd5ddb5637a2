"""The runtime: request plane, discovery, event plane, cancellation and reconnect.

Every test runs over each request plane (TCP, the default, and NATS): the same behaviour is
owed on both. What only one plane has is tested in tests/test_tcp_plane.py.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import msgspec
import nats.js.errors
import pytest

from dynamo_worker.core import discovery, wire
from dynamo_worker.core.discovery import InstanceRecord
from dynamo_worker.core.errors import RuntimeUnavailable
from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.core.runtime import Client, Runtime
from tests.helpers import NatsServer, WorkerProcess, slow_counter

PLANE = {"name": "tcp"}


@pytest.fixture(params=["tcp", "nats"], autouse=True)
def plane(request: pytest.FixtureRequest) -> str:
    PLANE["name"] = request.param
    return str(request.param)


async def connect(server: NatsServer, namespace: str, **kw: Any) -> Runtime:
    return await Runtime.connect(server.url, namespace, request_plane=PLANE["name"], **kw)


async def counting(request: Any, context: RequestContext) -> AsyncIterator[dict[str, int]]:
    if not isinstance(request, dict) or not isinstance(request.get("n"), int):
        raise RequestError("bad_request", "n must be an integer")
    for i in range(request["n"]):
        yield {"i": i}
        if request.get("delay"):
            await asyncio.sleep(request["delay"])


async def serve(rt: Runtime, handler: Any = counting, component: str = "math", endpoint: str = "count") -> None:
    await rt.serve_endpoint(component, endpoint, handler)
    await rt.publish(component, endpoint, "test", {"model": "m"})


async def test_a_request_streams_many_responses_then_ends(nats_server: NatsServer, namespace: str) -> None:
    worker, caller = await connect(nats_server, namespace), await connect(nats_server, namespace)
    try:
        await serve(worker)
        client = caller.client("math", "count")
        assert [r.instance_id for r in await client.wait_for_instances(5)] == [worker.instance_id]
        items = [x async for x in client.generate({"n": 500})]
        assert items == [{"i": i} for i in range(500)]
    finally:
        await caller.close()
        await worker.close()


async def test_concurrent_streams_share_messages_and_keep_their_order(nats_server: NatsServer, namespace: str) -> None:
    """Frames that many streams produce in one loop turn travel as one batch, each in order."""
    worker, caller = await connect(nats_server, namespace), await connect(nats_server, namespace)

    async def stepping(request: Any, context: RequestContext) -> AsyncIterator[dict[str, int]]:
        for i in range(request["n"]):
            if i == request.get("fail_at"):
                raise RequestError("bad_request", f"failed at {i}")
            yield {"i": i}
            await asyncio.sleep(0)  # one frame per stream per loop turn, like an engine step

    try:
        await serve(worker, stepping)
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        before = caller.nc.stats["in_msgs"]

        async def one() -> list[Any]:
            return [x async for x in client.generate({"n": 200})]

        results = await asyncio.gather(*(one() for _ in range(32)))
        assert results == [[{"i": i} for i in range(200)]] * 32
        frames = 32 * 201  # 200 data frames and an end frame per stream
        received = caller.nc.stats["in_msgs"] - before
        assert received < frames / 4, f"{received} NATS messages carried {frames} frames"
        # An error after data still reaches the caller after the data, in order.
        got: list[Any] = []
        with pytest.raises(RequestError, match="failed at 150"):
            async for x in client.generate({"n": 200, "fail_at": 150}):
                got.append(x)
        assert got == [{"i": i} for i in range(150)]
    finally:
        await caller.close()
        await worker.close()


async def test_errors_are_structured_and_the_worker_keeps_serving(nats_server: NatsServer, namespace: str) -> None:
    worker, caller = await connect(nats_server, namespace), await connect(nats_server, namespace)

    async def buggy(request: Any, context: RequestContext) -> AsyncIterator[int]:
        yield 1
        raise KeyError("oops")

    try:
        await serve(worker)
        await serve(worker, buggy, endpoint="buggy")
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        with pytest.raises(RequestError) as bad:
            [x async for x in client.generate({"n": "three"})]
        assert (bad.value.code, bad.value.retryable) == ("bad_request", False)
        assert "n must be an integer" in bad.value.message
        # A malformed envelope (not our JSON at all) also gets a structured answer.
        reply = await caller.nc.request(caller.subject("math", "count", worker.instance_id), b"{not json", timeout=2)
        assert b"bad_request" in reply.data and b"malformed request" in reply.data
        got: list[int] = []
        with pytest.raises(RequestError) as internal:
            async for x in caller.client("math", "buggy").generate({}):
                got.append(x)
        assert got == [1] and internal.value.code == "internal" and "KeyError" in internal.value.message
        assert [x async for x in client.generate({"n": 2})] == [{"i": 0}, {"i": 1}]
    finally:
        await caller.close()
        await worker.close()


async def test_a_request_to_a_gone_instance_fails_fast_and_retryable(nats_server: NatsServer, namespace: str) -> None:
    caller = await connect(nats_server, namespace)
    try:
        start = time.monotonic()
        with pytest.raises(RequestError) as err:
            [x async for x in caller.client("math", "count").direct({"n": 1}, "feedfacefeedface")]
        assert err.value.code == "unavailable" and err.value.retryable
        assert time.monotonic() - start < 1.0
        with pytest.raises(RequestError, match="no instance serves math.count"):
            caller.client("math", "count").pick()
    finally:
        await caller.close()


async def test_an_instance_nobody_answers_for_leaves_routing_at_once(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """ "No responders" takes an instance out of routing long before its lease expires; a
    keep-alive from a live instance brings it back."""
    caplog.set_level(logging.INFO)
    # A lease long enough not to run out during the test on a loaded machine (its expiry would
    # also take the instance out of routing, and clear the mark this test looks for).
    live, dying, caller = [await connect(nats_server, namespace, lease_ttl=6) for _ in range(3)]
    try:
        await serve(live)
        await serve(dying)
        client = caller.client("math", "count")
        await client.wait_for_instances(5, count=2)
        # Its subscriptions and listener go at once; its record stays until the lease ends.
        await dying.nc.close()
        if dying.listener is not None:
            await dying.listener.close()
        # nats-server drops a closed connection's subscriptions when it notices the close: a
        # request racing that meets silence (a retryable timeout, no mark) instead of "no
        # responders". The next one cannot.
        for _ in range(5):
            with pytest.raises(RequestError) as err:
                [x async for x in client.direct({"n": 1}, dying.instance_id)]
            assert err.value.retryable
            if dying.instance_id in caller.unreachable:
                break
        assert [r.instance_id for r in client.instances()] == [live.instance_id]
        assert dying.instance_id in caller.unreachable, err.value  # marked by a failed request, not by a lease
        assert f"instance {dying.instance_id} is out of routing" in caplog.text  # operators see why
        # A live instance wrongly marked (say, mid-reconnect) returns with its next keep-alive.
        caller.unreachable.add(live.instance_id)
        assert not client.instances()
        assert await client.watcher.wait_for(lambda: len(client.instances()) == 1, 5)
        assert [r.instance_id for r in client.instances()] == [live.instance_id]
        assert f"instance {live.instance_id} is back in routing" in caplog.text
    finally:
        await caller.close()
        await live.close()
        await dying.close()


async def open_silent_stream(worker: Runtime, caller: Runtime) -> tuple[Client, asyncio.Task[list[Any]]]:
    """``worker`` serves a handler that never answers (a stream cut off with its host: nothing more
    arrives); the caller opens one stream to it. Returns the client and the stream's task, once
    the handler runs."""
    started = asyncio.Event()

    async def silent(request: Any, context: RequestContext) -> AsyncIterator[dict[str, int]]:
        started.set()
        await asyncio.sleep(3600)
        yield {}

    await serve(worker, silent)
    client = caller.client("math", "count")
    await client.wait_for_instances(5)

    async def call() -> list[Any]:
        return [x async for x in client.direct({}, worker.instance_id)]

    open_stream = asyncio.create_task(call())
    await asyncio.wait_for(started.wait(), 5)
    return client, open_stream


async def test_an_instance_whose_heartbeats_stop_leaves_routing_though_its_record_stays(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While JetStream elects a leader no lease expires (docs/architecture.md, Liveness): a cut-off
    instance's record stays. Its missing core-NATS heartbeats take it out of routing after its
    lease, and fail its open streams that hear nothing; its next heartbeat brings it back."""
    caplog.set_level(logging.INFO)
    worker, caller = await connect(nats_server, namespace, lease_ttl=1), await connect(nats_server, namespace)
    try:
        client, open_stream = await open_silent_stream(worker, caller)
        # The worker goes silent, but its record stays: no keep-alive, no heartbeat, and the record
        # written again without a TTL (as if JetStream could not expire it).
        assert worker.discovery._keepalive is not None
        worker.discovery._keepalive.cancel()
        await worker.heartbeat.stop()
        [record] = [r for r in client.watcher.records.values() if r.instance_id == worker.instance_id]
        await (await worker.discovery.bucket()).put(record.key, wire.encode(record))
        silenced = time.monotonic()
        with pytest.raises(RequestError) as err:
            await asyncio.wait_for(open_stream, 5)
        failed_after = time.monotonic() - silenced
        assert err.value.retryable, err.value
        assert 1.0 <= failed_after < 3.0, failed_after  # its 1 s lease, the 0.5 s grace, a sweep
        assert not client.instances() and worker.instance_id in caller.unreachable
        assert list(client.watcher.records.values()) == [record]  # discovery still lists it
        assert f"instance {worker.instance_id}: no heartbeat for" in caplog.text
        # It beats again: back in routing, with no word from discovery.
        worker.heartbeat.start()
        for _ in range(30):
            if client.instances():
                break
            await asyncio.sleep(0.1)
        assert [r.instance_id for r in client.instances()] == [worker.instance_id]
        assert f"instance {worker.instance_id} is heard again; back in routing" in caplog.text
    finally:
        await caller.close()
        await worker.close()


async def test_two_suspicions_of_one_instance_fail_its_silent_stream_after_one_grace(
    nats_server: NatsServer, namespace: str
) -> None:
    """Its heartbeats and its lease lapse together: two suspicions. The second once ended the
    first's grace and the stream then waited out the 60 s idle timeout (a CI-style run of
    test_a_killed_process_leaves_discovery_within_its_lease)."""
    worker, caller = await connect(nats_server, namespace), await connect(nats_server, namespace)
    try:
        _, open_stream = await open_silent_stream(worker, caller)
        caller.streams.instance_gone(worker.instance_id)
        caller.streams.instance_gone(worker.instance_id)
        suspected = time.monotonic()
        with pytest.raises(RequestError) as err:
            await asyncio.wait_for(open_stream, 5)
        assert err.value.retryable and "went away" in err.value.message, err.value
        assert time.monotonic() - suspected < 1.5
    finally:
        await caller.close()
        await worker.close()


async def test_a_caller_whose_event_loop_was_held_up_judges_no_instance_silent(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A frontend whose loop stalls past its workers' leases (a starved machine) has their beats
    unread in its socket: it must read them before judging, not take every worker out at once."""
    caplog.set_level(logging.INFO)
    worker, caller = await connect(nats_server, namespace, lease_ttl=1), await connect(nats_server, namespace)
    try:
        await serve(worker)
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        await asyncio.sleep(0.5)  # the watch is subscribed and has heard a beat
        for _ in range(3):
            time.sleep(1.6)  # held up past the 1 s lease (the worker's beats too: one process)
            await asyncio.sleep(1.0)
            assert [r.instance_id for r in client.instances()] == [worker.instance_id]
        assert "no heartbeat" not in caplog.text
        assert [x async for x in client.direct({"n": 2}, worker.instance_id)] == [{"i": 0}, {"i": 1}]
    finally:
        await caller.close()
        await worker.close()


async def test_a_caller_that_goes_away_cancels_the_request_on_the_worker(
    nats_server: NatsServer, namespace: str
) -> None:
    worker, caller = await connect(nats_server, namespace), await connect(nats_server, namespace)
    cancelled = asyncio.Event()

    slow = slow_counter(cancelled)
    try:
        await serve(worker, slow)
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        async with aclosing(client.generate({})) as stream:
            async for i in stream:
                if i == 3:
                    break
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert worker.inflight() == 0
    finally:
        await caller.close()
        await worker.close()


async def test_a_request_is_cancelled_on_the_worker_by_its_id(nats_server: NatsServer, namespace: str) -> None:
    """The caller's ``cancel(instance, request id)`` stops a request still being streamed (the one
    cancel message, over NATS to the instance, on either plane)."""
    worker, caller = await connect(nats_server, namespace), await connect(nats_server, namespace)
    cancelled = asyncio.Event()
    try:
        await serve(worker, slow_counter(cancelled))
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        async with aclosing(client.direct({}, worker.instance_id, request_id="cancel-me")) as stream:
            assert await stream.__anext__() == 0
            await caller.caller.cancel(worker.instance_id, "cancel-me")
            await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert worker.inflight() == 0
    finally:
        await caller.close()
        await worker.close()


async def test_watchers_see_arrivals_and_withdrawals(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    worker, caller = await connect(nats_server, namespace), await connect(nats_server, namespace)
    events: list[tuple[str, bool]] = []
    try:
        watcher = caller.watcher()
        watcher.add_listener(lambda key, rec, expired: events.append((key.rpartition(".")[2], rec is not None)))
        await serve(worker)
        client = caller.client("math", "count")
        assert await client.wait_for_instances(5)
        await worker.withdraw()
        assert await watcher.wait_for(lambda: not client.instances(), 5)
        assert events == [(worker.instance_id, True), (worker.instance_id, False)]
        assert f"math.count.{worker.instance_id} joined" in caplog.text
        assert f"math.count.{worker.instance_id} left (withdrawn)" in caplog.text
    finally:
        await caller.close()
        await worker.close()


async def test_a_killed_process_leaves_discovery_within_its_lease(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    caller = await connect(nats_server, namespace)
    worker = WorkerProcess(
        ["--role", "echo", "--nats-url", nats_server.url, "--namespace", namespace, "--lease-ttl", "2"]
    )
    try:
        client = caller.client("echo", "generate")
        assert await client.wait_for_instances(20)
        # A stream in flight when the process dies fails (retryable) instead of hanging.
        stream = client.generate({"token_ids": list(range(100)), "delay": 0.05})
        assert await stream.__anext__() == {"token_ids": [0]}
        worker.signal(signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(RequestError) as gone:
            async for _ in stream:
                pass
        assert gone.value.retryable and "went away" in gone.value.message
        assert not client.instances()
        elapsed = time.monotonic() - killed
        # Lease 2 s, refreshed every 2/3 s: gone 1.3-2.1 s after the kill.
        assert elapsed < 3.0, elapsed
        assert "left (its lease expired)" in caplog.text
    finally:
        worker.stop()
        await caller.close()


def test_a_record_is_judged_lapsed_only_past_its_lease_and_the_clock_skew_allowance() -> None:
    now = datetime.datetime(2026, 12, 5, 12, 0, 0, tzinfo=datetime.timezone.utc)
    record = InstanceRecord("ns", "c", "e", "i", "test", 1, "h", lease_ttl=2)
    allowed = 2 + discovery.CLOCK_SKEW_ALLOWANCE

    def ago(seconds: float) -> datetime.datetime:
        return now - datetime.timedelta(seconds=seconds)

    assert discovery.lease_lapsed(record, ago(0.7), now) == 0  # a live instance's newest copy
    assert discovery.lease_lapsed(record, ago(-3), now) == 0  # the server's clock ahead of ours
    assert discovery.lease_lapsed(record, ago(allowed), now) == 0  # skew forgiven
    assert discovery.lease_lapsed(record, ago(allowed + 1), now) == pytest.approx(discovery.CLOCK_SKEW_ALLOWANCE + 1)
    assert discovery.lease_lapsed(record, ago(60), now) == pytest.approx(58)
    # A record from a writer that did not say its lease, or without a timestamp: not judged.
    assert discovery.lease_lapsed(msgspec.structs.replace(record, lease_ttl=0), ago(60), now) == 0
    assert discovery.lease_lapsed(record, None, now) == 0


async def test_a_watcher_does_not_admit_a_record_past_its_lease_whatever_the_store_holds(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy the store should have expired (issue 18: a restarted replica's file store brought one
    back) is not routed to: here one written without a TTL, so that it stays, and judged with no
    allowance for clock skew (one host: one clock)."""
    monkeypatch.setattr(discovery, "CLOCK_SKEW_ALLOWANCE", 0.0)
    caplog.set_level(logging.INFO)
    worker, caller = await connect(nats_server, namespace, lease_ttl=1), await connect(nats_server, namespace)
    try:
        await serve(worker)
        assert worker.discovery._records  # stamped with its lease
        assert {r.lease_ttl for r in worker.discovery._records.values()} == {1}
        dead = InstanceRecord(namespace, "math", "count", "dead", "test", 1, "h", lease_ttl=1)
        await caller.discovery.bucket()
        await caller.discovery.js.publish(f"$KV.{discovery.BUCKET}.{dead.key}", wire.encode(dead))
        await asyncio.sleep(1.5)  # past the dead one's lease; the live one renews every 1/3 s
        client = caller.client("math", "count")
        assert await client.wait_for_instances(5)
        await asyncio.sleep(0.5)  # a few renewals of the live one: the dead copy had its chance too
        assert [r.instance_id for r in client.instances()] == [worker.instance_id]
        assert f"not admitting {dead.key}: its record (revision" in caplog.text
        assert caplog.text.count(f"not admitting {dead.key}") == 1  # said once, not per watch
    finally:
        await caller.close()
        await worker.close()


async def _until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_a_watcher_purges_a_record_it_refused_unless_it_was_rewritten_meanwhile(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead worker's stale copy (issue 18) is purged from the bucket a lease after a watcher refused
    it, guarded by the revision read: a worker that registered again under the key meanwhile stays."""
    monkeypatch.setattr(discovery, "CLOCK_SKEW_ALLOWANCE", 0.0)
    caplog.set_level(logging.INFO)
    writer, caller = await connect(nats_server, namespace), await connect(nats_server, namespace)
    try:
        kv = await writer.discovery.bucket()  # made (if new) before the marker TTL is shortened below
        monkeypatch.setattr(discovery, "MARKER_TTL", 2)
        # Written without a TTL, so that the store keeps them, and 2.2 s old when read: past their 2 s lease.
        stale = InstanceRecord(namespace, "math", "count", "stale", "test", 1, "h", lease_ttl=2)
        back = InstanceRecord(namespace, "math", "count", "back", "test", 1, "h", lease_ttl=2)
        for record in (stale, back):
            await writer.discovery.js.publish(f"$KV.{discovery.BUCKET}.{record.key}", wire.encode(record))
        read = {r.key: (await kv.get(r.key)).revision for r in (stale, back)}
        await asyncio.sleep(2.2)
        client = caller.client("math", "count")
        refused = f"not admitting {back.key}: its record (revision {read[back.key]})"
        assert await _until(lambda: refused in caplog.text, 5), caplog.text
        # "back"'s worker registers again under its key before the purge (due a lease, 2 s, after the refusal).
        again = msgspec.structs.replace(back, lease_ttl=30)
        await writer.discovery.js.publish(f"$KV.{discovery.BUCKET}.{again.key}", wire.encode(again), msg_ttl=30)
        assert await client.wait_for_instances(5)
        assert [r.instance_id for r in client.instances()] == ["back"]  # the fresh copy is admitted

        purged = f"purged {stale.key} (revision {read[stale.key]})"
        kept = f"{back.key} was rewritten since revision {read[back.key]} (its instance is back); not purged"
        assert await _until(lambda: purged in caplog.text and kept in caplog.text, 5), caplog.text
        stream, subject = f"KV_{discovery.BUCKET}", f"$KV.{discovery.BUCKET}.{stale.key}"
        marker = await writer.discovery.js.get_last_msg(stream, subject)  # a PURGE, as a lease expiry is
        assert marker.headers and marker.headers["KV-Operation"] == "PURGE" and marker.headers["Nats-TTL"] == "2"
        with pytest.raises(nats.js.errors.KeyNotFoundError):  # kv.get reads a PURGE marker as not found
            await kv.get(stale.key)
        entry = await kv.get(back.key)
        assert entry.revision > read[back.key] and msgspec.json.decode(entry.value, type=InstanceRecord) == again
        await asyncio.sleep(0.3)
        assert [r.instance_id for r in client.instances()] == ["back"]  # the purge of "stale" changed nothing
        # The purge's marker expires too (after MARKER_TTL), as the server's lease-expiry markers do:
        # the bucket keeps nothing of the dead record.
        for _ in range(50):
            try:
                await writer.discovery.js.get_last_msg(stream, subject)
            except nats.js.errors.NotFoundError:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail(f"the purge marker of {stale.key} is still in the bucket 5 s after its 2 s TTL")
    finally:
        await caller.close()
        await writer.close()


async def test_a_restarted_watcher_leaves_no_consumer_behind(nats_server: NatsServer, namespace: str) -> None:
    """Watchers are recreated after every reconnect; the old one's JetStream consumer must be let
    go (unsubscribed), or it keeps receiving every keep-alive of every instance."""
    rt = await connect(nats_server, namespace)

    def consumer_tasks() -> int:  # nats-py runs heartbeat and flow-control tasks per KV watcher
        return sum(1 for t in asyncio.all_tasks() if "_JSI." in t.get_coro().__qualname__)

    try:
        watcher = rt.watcher()
        await asyncio.wait_for(watcher.ready.wait(), 5)
        one_watcher = consumer_tasks()
        assert one_watcher > 0
        for _ in range(3):
            await watcher.restart()  # back to back, as in a reconnect storm
        assert await settles(lambda: consumer_tasks() == one_watcher), consumer_tasks()
    finally:
        await rt.close()
    # None left pending at exit ("Task was destroyed but it is pending!").
    assert await settles(lambda: consumer_tasks() == 0), consumer_tasks()


async def settles(predicate: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_a_keep_alive_held_up_by_a_busy_event_loop_is_logged_and_the_lease_holds(
    nats_server: NatsServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    worker, caller = await connect(nats_server, namespace, lease_ttl=3), await connect(nats_server, namespace)
    try:
        await serve(worker)
        client = caller.client("math", "count")
        assert await client.wait_for_instances(5)
        # Keep-alives every 1 s; the worker's loop blocked for 2.2 s (a busy worker's can be)
        # puts one 1.2 s or more behind: two thirds of the lease had gone when it ran.
        time.sleep(2.2)
        await asyncio.sleep(0.5)
        assert "discovery keep-alive ran" in caplog.text
        assert [r.instance_id for r in client.instances()] == [worker.instance_id]
        assert "left (its lease expired)" not in caplog.text
    finally:
        await caller.close()
        await worker.close()


async def test_events_reach_every_subscriber_in_the_namespace(nats_server: NatsServer, namespace: str) -> None:
    a, b = await connect(nats_server, namespace), await connect(nats_server, namespace)
    other = await connect(nats_server, namespace + "x")
    got: list[Any] = []
    leaked: list[Any] = []

    async def on_event(payload: Any) -> None:
        got.append(payload)

    async def on_other(payload: Any) -> None:
        leaked.append(payload)

    try:
        await b.subscribe_events("kv", on_event)
        await other.subscribe_events("kv", on_other)
        await b.nc.flush()
        await other.nc.flush()
        await a.publish_event("kv", {"stored": [1, 2]})
        await a.nc.flush()
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.01)
        assert got == [{"stored": [1, 2]}] and leaked == []
    finally:
        for rt in (a, b, other):
            await rt.close()


async def test_endpoints_serve_again_after_a_nats_server_restart(namespace: str) -> None:
    server = NatsServer()
    server.start()
    try:
        worker, caller = await connect(server, namespace), await connect(server, namespace)
        await serve(worker)
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        server.stop()
        server.start()
        restarted = time.monotonic()
        while True:
            try:
                assert [x async for x in client.generate({"n": 2})] == [{"i": 0}, {"i": 1}]
                break
            except RequestError:
                assert time.monotonic() - restarted < 10, "no recovery within 10 s"
                await asyncio.sleep(0.1)
        # Discovery comes back too: a new caller sees the worker.
        late = await connect(server, namespace)
        assert await late.client("math", "count").wait_for_instances(5)
        await late.close()
        await caller.close()
        await worker.close()
    finally:
        server.cleanup()


async def test_an_unreachable_server_is_a_clear_error() -> None:
    with pytest.raises(RuntimeUnavailable, match="cannot reach the NATS server at nats://127.0.0.1:1"):
        await Runtime.connect("nats://127.0.0.1:1", "ns", timeout=1)


@pytest.fixture(scope="module")
def small_nats() -> Any:
    """A nats-server whose max_payload is 64 KiB: the request plane's limit on both planes."""
    server = NatsServer(max_payload=64 * 1024)
    server.start()
    yield server
    server.cleanup()


async def test_a_request_over_the_limit_is_refused_as_too_large_before_it_is_sent(
    small_nats: NatsServer, namespace: str
) -> None:
    seen: list[int] = []

    async def sizing(request: Any, context: RequestContext) -> AsyncIterator[int]:
        seen.append(len(request["blob"]))
        yield len(request["blob"])

    worker, caller = await connect(small_nats, namespace), await connect(small_nats, namespace)
    try:
        await serve(worker, sizing)
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        assert caller.max_message_bytes() == 64 * 1024  # learned from the server
        with pytest.raises(RequestError) as too_large:
            [x async for x in client.generate({"blob": "x" * 70_000})]
        assert too_large.value.code == "too_large" and not too_large.value.retryable
        assert "over its 65536-byte limit" in too_large.value.message
        assert seen == [] and worker.instance_id not in caller.unreachable
        assert [x async for x in client.generate({"blob": "x" * 60_000})] == [60_000]
    finally:
        await caller.close()
        await worker.close()


async def test_a_response_frame_over_the_limit_ends_its_stream_as_too_large_and_stops_the_handler(
    small_nats: NatsServer, namespace: str
) -> None:
    """Not a 60 s idle timeout (NATS would refuse to publish it) nor a dropped connection (TCP):
    the caller gets a too_large error in the frame's place and the handler is cancelled."""
    cancelled = asyncio.Event()

    async def growing(request: Any, context: RequestContext) -> AsyncIterator[str]:
        try:
            yield "small"
            yield "x" * request["size"]
            for _ in range(1000):  # a handler that would go on for 10 s
                yield "after"
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    worker, caller = await connect(small_nats, namespace), await connect(small_nats, namespace)
    try:
        await serve(worker, growing)
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        got: list[str] = []
        started = time.monotonic()
        with pytest.raises(RequestError) as too_large:
            async for item in client.generate({"size": 70_000}):
                got.append(item)
        assert got == ["small"] and too_large.value.code == "too_large"
        assert "over the request plane's 65536-byte limit" in too_large.value.message
        await asyncio.wait_for(cancelled.wait(), 5)
        assert time.monotonic() - started < 5
        # Frames that fit one by one but not together in one batch all arrive.
        many: list[str] = []
        async with aclosing(client.generate({"size": 40_000})) as stream:
            async for item in stream:
                many.append(item)
                if len(many) == 3:
                    break
        assert many == ["small", "x" * 40_000, "after"]
    finally:
        await caller.close()
        await worker.close()


async def test_many_frames_of_one_turn_over_the_limit_together_arrive_in_order(
    small_nats: NatsServer, namespace: str
) -> None:
    async def burst(request: Any, context: RequestContext) -> AsyncIterator[str]:
        for i in range(request["n"]):  # no await between yields: one batch, split to fit
            yield f"{i:06d}" + "y" * 10_000

    worker, caller = await connect(small_nats, namespace), await connect(small_nats, namespace)
    try:
        await serve(worker, burst)
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        items = [x async for x in client.generate({"n": 40})]
        assert [int(x[:6]) for x in items] == list(range(40))
    finally:
        await caller.close()
        await worker.close()
