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

from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.core.runtime import Runtime
from tests.helpers import NatsServer, free_port, run_cli, slow_counter


async def counting(request: Any, context: RequestContext) -> AsyncIterator[dict[str, int]]:
    for i in range(request["n"]):
        yield {"i": i}
        if request.get("delay"):
            await asyncio.sleep(request["delay"])


async def worker_and_caller(server: NatsServer, namespace: str, handler: Any = counting,
                            caller_plane: str = "tcp") -> tuple[Runtime, Runtime]:
    worker = await Runtime.connect(server.url, namespace, request_plane="tcp")
    await worker.serve_endpoint("math", "count", handler)
    await worker.publish("math", "count", "test", {})
    caller = await Runtime.connect(server.url, namespace, request_plane=caller_plane)
    await caller.client("math", "count").wait_for_instances(5)
    return worker, caller


async def test_frames_travel_over_tcp_and_a_nats_caller_reaches_the_same_worker(nats_server: NatsServer,
                                                                                 namespace: str) -> None:
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


async def test_a_worker_whose_connection_drops_fails_its_streams_at_once(nats_server: NatsServer,
                                                                         namespace: str) -> None:
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


async def test_a_caller_whose_connection_drops_has_its_requests_cancelled(nats_server: NatsServer,
                                                                          namespace: str) -> None:
    cancelled = asyncio.Event()

    slow = slow_counter(cancelled)
    worker, caller = await worker_and_caller(nats_server, namespace, slow)
    try:
        stream = caller.client("math", "count").generate({})
        assert await stream.__anext__() == 0
        assert worker.inflight() == 1
        caller.tcp.close()  # the caller's process died, say: nobody reads the answers
        await asyncio.wait_for(cancelled.wait(), 5)
        await asyncio.sleep(0.05)
        assert worker.inflight() == 0
        await stream.aclose()
    finally:
        await caller.close()
        await worker.close()


def _raw(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _message(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize("garbage", [
    _message(b"{not json"),
    _message(b'{"type":"r","s":"1","e":"count"}'),  # a call without its request
    struct.pack(">I", 0xFFFFFFF0),  # a length over the limit
], ids=["not-json", "incomplete-call", "huge-length"])
async def test_a_peer_that_breaks_the_protocol_is_dropped_and_others_are_served(
        nats_server: NatsServer, namespace: str, garbage: bytes) -> None:
    worker, caller = await worker_and_caller(nats_server, namespace)
    try:
        assert worker.listener is not None
        sock = await asyncio.to_thread(_raw, worker.listener.address)
        with sock:
            await asyncio.to_thread(sock.sendall, garbage)
            assert await asyncio.to_thread(_closed_by_peer, sock)
        assert [x async for x in caller.client("math", "count").generate({"n": 2})] == [{"i": 0}, {"i": 1}]
    finally:
        await caller.close()
        await worker.close()


async def test_a_draining_worker_answers_no_responders_and_callers_route_around_it(
        nats_server: NatsServer, namespace: str) -> None:
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
    assert bad_port.stderr.strip().splitlines()[-1].endswith("--tcp-rpc-port 70000 is out of range; use a port "
                                                             "between 0 and 65535")


def test_a_port_in_use_is_a_one_line_error(nats_server: NatsServer, namespace: str) -> None:
    with socket.socket() as taken:
        port = free_port()
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = run_cli("--role", "echo", "--nats-url", nats_server.url, "--namespace", namespace,
                      "--request-plane", "tcp", "--tcp-rpc-port", str(port))
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert f"--tcp-rpc-port {port}: cannot listen there" in last and "Traceback" not in out.stderr
