"""What only the TCP request plane has: its listener, its connections, their failures.

The behaviour both planes owe (streaming, errors, cancellation, routing around a dead instance)
is tested on each plane in tests/test_runtime.py.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest

from dynamo_worker.core import wire
from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.core.runtime import Runtime
from dynamo_worker.core.tcp_plane import ListenerLimits, TcpCaller
from tests.helpers import NatsServer, free_port, run_cli, slow_counter, worker_env
from tests.raw_tcp import count_call, handshake, message, raw, read_message, read_until_closed


async def counting(request: Any, context: RequestContext) -> AsyncIterator[dict[str, int]]:
    for i in range(request["n"]):
        yield {"i": i}
        if request.get("delay"):
            await asyncio.sleep(request["delay"])


SECRET = b"the deployment's secret"


async def worker_and_caller(
    server: NatsServer, namespace: str, handler: Any = counting, caller_plane: str = "tcp", **worker_options: Any
) -> tuple[Runtime, Runtime]:
    """A TCP worker serving ``math.count`` and a caller, both holding :data:`SECRET`."""
    worker = await Runtime.connect(
        server.url, namespace, request_plane="tcp", request_plane_secret=SECRET, **worker_options
    )
    await worker.serve_endpoint("math", "count", handler)
    await worker.publish("math", "count", "test", {})
    caller = await Runtime.connect(server.url, namespace, request_plane=caller_plane, request_plane_secret=SECRET)
    await caller.client("math", "count").wait_for_instances(5)
    return worker, caller


async def test_frames_travel_over_tcp_and_a_nats_caller_reaches_the_same_worker(
    nats_server: NatsServer, namespace: str
) -> None:
    worker, caller = await worker_and_caller(nats_server, namespace)
    nats_caller = await Runtime.connect(nats_server.url, namespace, request_plane="nats")
    try:
        [record] = caller.client("math", "count").instances()
        assert worker.listener is not None and record.address == worker.listener.address
        assert record.address.startswith("127.0.0.1:")
        before = caller.nc.stats["in_msgs"]
        assert [x async for x in caller.client("math", "count").generate({"n": 300})] == [{"i": i} for i in range(300)]
        assert caller.nc.stats["in_msgs"] - before < 5  # the frames did not come through NATS
        nats_client = nats_caller.client("math", "count")
        await nats_client.wait_for_instances(5)
        assert [x async for x in nats_client.generate({"n": 3})] == [{"i": 0}, {"i": 1}, {"i": 2}]
    finally:
        for rt in (nats_caller, caller, worker):
            await rt.close()


async def test_a_worker_whose_connection_drops_fails_its_streams_at_once(
    nats_server: NatsServer, namespace: str
) -> None:
    """A dead worker process closes its sockets: its callers fail over in milliseconds, not after
    the discovery lease, and route around it until it is heard from again."""
    worker, caller = await worker_and_caller(nats_server, namespace)
    try:
        client = caller.client("math", "count")
        stream = client.generate({"n": 1000, "delay": 0.01})
        assert await stream.__anext__() == {"i": 0}
        assert worker.listener is not None
        dropped = time.monotonic()
        for conn in list(worker.listener.connections):
            conn.transport.abort()
        with pytest.raises(RequestError) as gone:
            async for _ in stream:
                pass
        assert gone.value.retryable and "went away" in gone.value.message
        assert time.monotonic() - dropped < 0.5
        assert worker.instance_id in caller.unreachable and not client.instances()
    finally:
        await caller.close()
        await worker.close()


async def test_a_caller_whose_connection_drops_has_its_requests_cancelled(
    nats_server: NatsServer, namespace: str
) -> None:
    cancelled = asyncio.Event()

    slow = slow_counter(cancelled)
    worker, caller = await worker_and_caller(nats_server, namespace, slow)
    try:
        stream = caller.client("math", "count").generate({})
        assert await stream.__anext__() == 0
        assert worker.inflight() == 1
        await caller.caller.close()  # the caller's process died, say: nobody reads the answers
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert worker.inflight() == 0
        await stream.aclose()
    finally:
        await caller.close()
        await worker.close()


def recording(calls: list[Any]) -> Any:
    """A ``math.count`` handler that records every request it is given."""

    async def handler(request: Any, context: RequestContext) -> AsyncIterator[dict[str, int]]:
        calls.append(request)
        async for item in counting(request, context):
            yield item

    return handler


async def test_a_caller_without_the_secret_is_refused_and_its_call_never_reaches_the_handler(
    nats_server: NatsServer, namespace: str
) -> None:
    calls: list[Any] = []
    worker, caller = await worker_and_caller(nats_server, namespace, recording(calls))
    try:
        assert worker.listener is not None
        address = worker.listener.address

        def call_without_handshake() -> list[bytes]:
            with raw(address) as sock:
                sock.sendall(count_call(3))  # a well-formed call, sent straight away
                return read_until_closed(sock)

        def call_with(secret: bytes) -> list[bytes]:
            with raw(address) as sock:
                answer = handshake(sock, secret)  # after the worker's Hello
                try:
                    sock.sendall(count_call(3))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # already closed: the point
                return [answer, *read_until_closed(sock)]

        hello, refused = await asyncio.to_thread(call_without_handshake)
        assert isinstance(wire.decode_greeting(hello), wire.Hello)
        why = wire.decode_greeting(refused)
        assert isinstance(why, wire.Refused) and "expected the request-plane handshake first" in why.why
        [refused] = await asyncio.to_thread(call_with, b"a guess")
        why = wire.decode_greeting(refused)
        assert isinstance(why, wire.Refused) and "did not prove the deployment's request-plane secret" in why.why
        assert calls == []  # nothing the strangers sent was served

        # A caller of the deployment over the same raw protocol is served.
        def served() -> list[Any]:
            with raw(address) as sock:
                welcome = wire.decode_greeting(handshake(sock, SECRET))
                assert isinstance(welcome, wire.Welcome)
                sock.sendall(count_call(3))
                frames: list[Any] = []
                while not frames or frames[-1].k == wire.DATA:
                    frames += [f for _, f in wire.decode_batch(read_message(sock) or b"")]
                return [f.d for f in frames if f.k == wire.DATA]

        assert await asyncio.to_thread(served) == [{"i": 0}, {"i": 1}, {"i": 2}]
        assert len(calls) == 1
        assert [x async for x in caller.client("math", "count").generate({"n": 2})] == [{"i": 0}, {"i": 1}]
    finally:
        await caller.close()
        await worker.close()


async def test_a_worker_that_cannot_prove_the_secret_gets_no_request(nats_server: NatsServer, namespace: str) -> None:
    """The caller checks the worker too: a stranger's listener published in discovery (or a
    worker given another secret) gets no request, and is routed around."""
    calls: list[Any] = []
    stranger = await Runtime.connect(
        nats_server.url, namespace, request_plane="tcp", request_plane_secret=b"another deployment"
    )
    caller = await Runtime.connect(nats_server.url, namespace, request_plane="tcp", request_plane_secret=SECRET)
    try:
        await stranger.serve_endpoint("math", "count", recording(calls))
        await stranger.publish("math", "count", "test", {})
        client = caller.client("math", "count")
        await client.wait_for_instances(5)
        with pytest.raises(RequestError) as refused:
            [x async for x in client.generate({"n": 2})]
        assert refused.value.code == "unavailable" and "refused this process" in refused.value.message
        assert calls == [] and stranger.instance_id in caller.unreachable
    finally:
        await caller.close()
        await stranger.close()


@pytest.mark.parametrize(
    "garbage",
    [
        message(b"{not json"),
        message(b'{"type":"r","s":"1","e":"count"}'),  # a call without its request
        struct.pack(">I", 0xFFFFFFF0),  # a length over the limit
    ],
    ids=["not-json", "incomplete-call", "huge-length"],
)
@pytest.mark.parametrize("authenticated", [False, True], ids=["before-handshake", "after-handshake"])
async def test_a_peer_that_breaks_the_protocol_is_dropped_and_others_are_served(
    nats_server: NatsServer, namespace: str, garbage: bytes, authenticated: bool
) -> None:
    worker, caller = await worker_and_caller(nats_server, namespace)
    try:
        assert worker.listener is not None
        address = worker.listener.address

        def send_garbage() -> list[bytes]:
            with raw(address) as sock:
                if authenticated:
                    assert isinstance(wire.decode_greeting(handshake(sock, SECRET)), wire.Welcome)
                sock.sendall(garbage)
                return read_until_closed(sock)  # returns once the worker closed the connection

        await asyncio.to_thread(send_garbage)
        assert [x async for x in caller.client("math", "count").generate({"n": 2})] == [{"i": 0}, {"i": 1}]
    finally:
        await caller.close()
        await worker.close()


async def test_an_oversized_message_is_cut_off_on_its_length_prefix(nats_server: NatsServer, namespace: str) -> None:
    """The limit is checked on the 4-byte length prefix, before any of the body is read: the
    peer is dropped although it never sends the body."""
    worker, caller = await worker_and_caller(nats_server, namespace)
    try:
        assert worker.listener is not None
        address, limit = worker.listener.address, worker.max_message_bytes()

        def announce(length: int, authenticated: bool) -> float:
            with raw(address) as sock:
                if authenticated:
                    handshake(sock, SECRET)
                started = time.monotonic()
                sock.sendall(struct.pack(">I", length))
                read_until_closed(sock)
                return time.monotonic() - started

        # Before the handshake anything beyond its own small messages is too large.
        assert await asyncio.to_thread(announce, 64 * 1024, False) < 1.0
        assert await asyncio.to_thread(announce, limit + 1, True) < 1.0
        assert [x async for x in caller.client("math", "count").generate({"n": 2})] == [{"i": 0}, {"i": 1}]
    finally:
        await caller.close()
        await worker.close()


async def test_slow_loris_peers_are_cut_off_and_the_listener_keeps_serving(
    nats_server: NatsServer, namespace: str
) -> None:
    """A peer that never completes the handshake, or trickles a message, is closed after the read
    timeout; an idle one after the idle timeout; the worker serves others meanwhile."""
    limits = ListenerLimits(read_timeout=0.5, idle_timeout=1.5)
    worker, caller = await worker_and_caller(nats_server, namespace, tcp_limits=limits)
    try:
        assert worker.listener is not None
        address = worker.listener.address

        def silent() -> float:
            with raw(address) as sock:
                started = time.monotonic()
                read_until_closed(sock)  # the Hello, then nothing: we never answer it
                return time.monotonic() - started

        def trickling() -> float:
            with raw(address) as sock:
                handshake(sock, SECRET)
                message = count_call(2)
                started = time.monotonic()
                for i in range(len(message)):  # one byte every 0.2 s: never a whole message in time
                    try:
                        sock.sendall(message[i : i + 1])
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    time.sleep(0.2)
                read_until_closed(sock)
                return time.monotonic() - started

        def idle() -> float:
            with raw(address) as sock:
                handshake(sock, SECRET)
                started = time.monotonic()
                read_until_closed(sock)
                return time.monotonic() - started

        silent_for, trickled_for, idle_for = (
            await asyncio.gather(
                asyncio.to_thread(silent),
                asyncio.to_thread(trickling),
                asyncio.to_thread(idle),
                *(collect(caller, 3) for _ in range(5)),
            )
        )[:3]
        assert 0.5 <= silent_for < 2.5
        assert 0.5 <= trickled_for < 2.5  # the message is 80+ bytes: 16 s at this pace
        assert 1.5 <= idle_for < 3.5
        # The caller closed its own idle connection first (at half the idle timeout), and opens
        # another when it has a request again.
        assert isinstance(caller.caller, TcpCaller)
        assert worker.listener.connections == set() and caller.caller._connections == {}
        assert await collect(caller, 2) == [{"i": 0}, {"i": 1}]
    finally:
        await caller.close()
        await worker.close()


async def collect(caller: Runtime, n: int) -> list[Any]:
    return [x async for x in caller.client("math", "count").generate({"n": n})]


async def test_connections_beyond_the_cap_are_closed_and_the_held_ones_still_serve(
    nats_server: NatsServer, namespace: str
) -> None:
    worker, caller = await worker_and_caller(nats_server, namespace, tcp_limits=ListenerLimits(max_connections=3))
    try:
        assert await collect(caller, 1) == [{"i": 0}]  # the caller holds connection 1 of 3
        assert worker.listener is not None
        address = worker.listener.address
        held = [await asyncio.to_thread(raw, address) for _ in range(2)]
        try:
            for sock in held:  # each got its Hello: they count
                assert isinstance(wire.decode_greeting(await asyncio.to_thread(read_message, sock) or b""), wire.Hello)
            with raw(address) as extra:
                assert await asyncio.to_thread(read_until_closed, extra) == []  # closed, no Hello
            assert await collect(caller, 2) == [{"i": 0}, {"i": 1}]
        finally:
            for sock in held:
                sock.close()
    finally:
        await caller.close()
        await worker.close()


async def test_a_cancel_reaches_only_requests_sent_on_its_own_connection(
    nats_server: NatsServer, namespace: str
) -> None:
    cancelled = asyncio.Event()
    worker, caller = await worker_and_caller(nats_server, namespace, slow_counter(cancelled))
    try:
        stream = caller.client("math", "count").generate({})
        assert await stream.__anext__() == 0
        [request_id] = list(worker.servers["count"].inflight)
        assert worker.listener is not None
        address = worker.listener.address

        def cancel_from_elsewhere() -> None:
            with raw(address) as sock:
                handshake(sock, SECRET)
                sock.sendall(message(wire.encode(wire.Cancel(request_id))))
                time.sleep(0.3)

        await asyncio.to_thread(cancel_from_elsewhere)
        assert not cancelled.is_set() and worker.inflight() == 1
        assert await stream.__anext__() > 0  # still streaming
        await stream.aclose()  # its own caller's cancel does reach it
        await asyncio.wait_for(cancelled.wait(), 5)
    finally:
        await caller.close()
        await worker.close()


async def test_a_draining_worker_answers_no_responders_and_callers_route_around_it(
    nats_server: NatsServer, namespace: str
) -> None:
    worker, caller = await worker_and_caller(nats_server, namespace)
    try:
        client = caller.client("math", "count")
        assert [x async for x in client.generate({"n": 1})] == [{"i": 0}]  # connection open
        await worker.servers["count"].stop_accepting()
        with pytest.raises(RequestError) as err:
            async with aclosing(client.direct({"n": 1}, worker.instance_id)) as stream:
                [x async for x in stream]
        assert err.value.code == "unavailable" and err.value.retryable
        assert worker.instance_id in caller.unreachable
    finally:
        await caller.close()
        await worker.close()


def test_bad_request_plane_flags_are_one_line_errors() -> None:
    bad_plane = run_cli("--role", "echo", "--request-plane", "carrier-pigeon")
    assert bad_plane.returncode != 0 and "--request-plane" in bad_plane.stderr and "tcp" in bad_plane.stderr
    bad_port = run_cli("--role", "echo", "--tcp-rpc-port", "70000")
    assert bad_port.returncode != 0
    assert (
        bad_port.stderr.strip()
        .splitlines()[-1]
        .endswith("--tcp-rpc-port 70000 is out of range; use a port between 0 and 65535")
    )


def test_a_port_in_use_is_a_one_line_error(nats_server: NatsServer, namespace: str) -> None:
    with socket.socket() as taken:
        port = free_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = run_cli(
            "--role",
            "echo",
            "--nats-url",
            nats_server.url,
            "--namespace",
            namespace,
            "--request-plane",
            "tcp",
            "--tcp-rpc-port",
            str(port),
        )
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert f"--tcp-rpc-port {port}: cannot listen there" in last and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--tcp-rpc-host", "0.0.0.0"],
            {},
            "--tcp-rpc-host 0.0.0.0: a TCP request plane reachable from other hosts needs a secret; set "
            "DYN_REQUEST_PLANE_TOKEN",
        ),
        (
            ["--nats-user", "u"],
            {"NATS_AUTH_PASSWORD": "p"},
            "--request-plane tcp with NATS user credentials needs a shared secret for the TCP plane",
        ),
        (["--request-plane-token", " "], {}, "--request-plane-token is blank"),
        (["--tcp-max-connections", "0"], {}, "--tcp-max-connections must be at least 1 (got 0)"),
        (["--tcp-read-timeout", "0"], {}, "--tcp-read-timeout must be greater than 0"),
    ],
    ids=["routable-without-secret", "nats-user-without-secret", "blank-token", "no-connections", "no-read-time"],
)
def test_a_tcp_plane_without_the_secret_it_needs_is_a_one_line_error(
    args: list[str], env: dict[str, str], message: str
) -> None:
    out = run_cli("--role", "echo", "--request-plane", "tcp", *args, env=worker_env(**env))
    assert out.returncode == 2, out.stderr
    assert message in out.stderr.strip().splitlines()[-1] and "Traceback" not in out.stderr


def test_a_routable_listener_starts_with_a_secret_from_the_env_or_the_nats_token() -> None:
    """Checked before connecting: with a secret the same flags pass validation (and fail later,
    on the unreachable NATS URL, not on the secret)."""
    for env in ({"DYN_REQUEST_PLANE_TOKEN": "s3cret"}, {"NATS_AUTH_TOKEN": "t0ken"}):
        out = run_cli(
            "--role",
            "echo",
            "--request-plane",
            "tcp",
            "--tcp-rpc-host",
            "0.0.0.0",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--nats-connect-timeout",
            "0.5",
            env=worker_env(**env),
        )
        assert out.returncode != 0 and "cannot reach the NATS server" in out.stderr, out.stderr
