"""The TCP request plane (``--request-plane tcp``, Dynamo's default): requests and their response
frames go straight between caller and worker, so NATS is no longer on every token's path.

A worker listens on one TCP port for all its endpoints and publishes ``host:port`` in its
discovery records. A caller keeps one connection per worker address, shared by all its streams
to that worker. Each message is a 4-byte big-endian length and a JSON body (:mod:`.wire`):

* caller to worker: :class:`wire.Call` (stream token, endpoint, request envelope) or
  :class:`wire.Cancel` (request id);
* worker to caller: a :data:`wire.Batch` of ``[token, frame]`` pairs.

What one side writes in one event-loop turn leaves in one ``write`` (at concurrency 64 an engine
step is one message, as on the NATS plane). The connection itself tells both sides about
failure: a caller whose worker dies sees the connection close and fails that worker's streams at
once (retryable); a worker whose caller goes away cancels the requests that caller sent. An
endpoint the worker does not (or no longer) serve is answered with ``no_responders``, NATS's
"no responders" on this plane.

Only the deployment is served: a connection proves the deployment's secret in a handshake
before anything else is read from it (:mod:`.request_plane_auth`), and the worker proves it back.
A listener also bounds what a peer can hold: connections (``--tcp-max-connections``), the time a
handshake or any one message may take to arrive (``--tcp-read-timeout``: no slow-loris), idle
connections (``--tcp-idle-timeout``), and the size of a message, checked on its length prefix
before its body is read (the request plane's limit: the NATS server's ``max_payload``, so both
planes carry the same sizes). A cancel reaches only requests sent on the same connection.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any

import attrs

from dynamo_worker.core import request_plane_auth, wire
from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.request_plane import Caller, RequestError, StreamRouter, check_size

if TYPE_CHECKING:
    from dynamo_worker.core.request_plane import EndpointServer

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
#: Before the handshake only its own small messages are accepted.
HANDSHAKE_MESSAGE_BYTES = 1024
#: A peer that lets this much output pile up unread is dropped (NATS calls it a slow consumer).
MAX_UNSENT_BYTES = 256 * 1024 * 1024
CONNECT_TIMEOUT = 2.0
DEFAULT_MAX_CONNECTIONS = 512
DEFAULT_READ_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 600.0


@attrs.frozen
class ListenerLimits:
    """What one TCP listener lets its peers hold (``--tcp-max-connections`` and the timeouts)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    read_timeout: float = DEFAULT_READ_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT


DEFAULT_LIMITS = ListenerLimits()


class FramedConnection(asyncio.Protocol):
    """Length-prefixed messages both ways; what is sent in one loop turn leaves in one write.

    ``limit`` is the largest message accepted now; a longer length prefix closes the connection
    before any of that message is buffered.
    """

    def __init__(self, limit: int) -> None:
        self.transport: Any = None  # asyncio's or uvloop's TCP transport
        self.limit = limit
        self._inbuf = bytearray()
        self._out: list[bytes] = []
        self._flush_pending = False
        self.peer = "?"
        now = time.monotonic()
        self.opened = self.last_activity = now
        self.partial_since: float | None = None  # when the message still arriving began to

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a lone frame must not wait for an ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = (transport.get_extra_info("peername") or ("?", "?"))[:2]
        self.peer = f"{host}:{port}"

    def data_received(self, data: bytes) -> None:
        now = self.last_activity = time.monotonic()
        buf = self._inbuf
        buf += data
        pos, size = 0, len(buf)
        while size - pos >= 4:
            (length,) = _HEADER.unpack_from(buf, pos)
            if length > self.limit:
                self.fail(f"a {length}-byte message (over {self.limit})")
                return
            end = pos + 4 + length
            if end > size:
                break
            self.on_message(bytes(buf[pos + 4 : end]))
            if not self.open:  # the message closed the connection
                return
            pos = end
        if pos:
            del buf[:pos]
        if not buf:
            self.partial_since = None
        elif pos or self.partial_since is None:
            self.partial_since = now

    def on_message(self, data: bytes) -> None:
        raise NotImplementedError

    def fail(self, why: str) -> None:
        """Close a connection whose peer broke the protocol."""
        log.warning("closing the request-plane connection with %s: %s", self.peer, why)
        if self.transport is not None:
            self.transport.abort()

    def send(self, payload: bytes) -> None:
        self._out += (_HEADER.pack(len(payload)), payload)
        self.schedule_flush()

    def schedule_flush(self) -> None:
        """Write what was queued once the current event-loop turn is over."""
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._flush_pending = False
        out, self._out = self._out, []
        if out and self.open:
            self.transport.write(b"".join(out))
            if self.transport.get_write_buffer_size() > MAX_UNSENT_BYTES:
                self.fail(f"it left over {MAX_UNSENT_BYTES} bytes unread")


# ---- worker side --------------------------------------------------------------------------------


class _WorkerConnection(FramedConnection):
    """One caller's connection to this worker: the handshake, then its calls, its frames batched
    per turn."""

    def __init__(self, listener: TcpListener) -> None:
        super().__init__(HANDSHAKE_MESSAGE_BYTES)
        self.listener = listener
        self.servers = listener.servers
        self.authenticated = False
        self._nonce = request_plane_auth.new_nonce()
        self._frames: wire.Batch = []
        self._requests: dict[str, tuple[EndpointServer, str]] = {}  # token -> (server, request id)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        connections = self.listener.connections
        if len(connections) >= self.listener.max_connections:
            log.warning(
                "refusing a request-plane connection from %s: %d connections already open (--tcp-max-connections)",
                self.peer,
                len(connections),
            )
            transport.abort()
            return
        connections.add(self)
        self.send(wire.encode(wire.Hello(self._nonce)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        for server, request_id in self._requests.values():  # nobody is left to read the answers
            server.cancel(request_id)
        self._requests.clear()

    @property
    def idle(self) -> bool:
        return not self._requests

    def on_message(self, data: bytes) -> None:
        if not self.authenticated:
            self._authenticate(data)
            return
        try:
            msg = wire.decode_tcp(data)
        except wire.DecodeError as exc:
            self.fail(f"malformed message ({exc})")
            return
        if isinstance(msg, wire.Cancel):
            for server, request_id in list(self._requests.values()):  # this connection's requests only
                if request_id == msg.id:
                    server.cancel(request_id)
            return
        token = msg.s
        server = self.servers.get(msg.e)
        if server is None or not server.accepting:
            err = wire.ErrorInfo(wire.NO_RESPONDERS, f"this instance does not serve {msg.e!r}", retryable=True)
            self.put(token, wire.Frame(wire.ERROR, 0, err=err))
            return
        self._requests[token] = (server, msg.r.id)

        async def sink(frame: wire.Frame) -> None:
            self.put(token, frame)

        server.accept(msg.r, sink)

    def _authenticate(self, data: bytes) -> None:
        try:
            auth = wire.decode_auth(data)
        except wire.DecodeError:
            self.refuse("expected the request-plane handshake first")
            return
        secret = self.listener.secret or b""
        if not request_plane_auth.matches(request_plane_auth.caller_proof(secret, self._nonce, auth.n), auth.m):
            self.refuse("it did not prove the deployment's request-plane secret")
            return
        self.authenticated = True
        self.limit = self.listener.max_message_bytes()
        proof = request_plane_auth.worker_proof(secret, self._nonce, auth.n)
        self.send(wire.encode(wire.Welcome(proof, self.listener.idle_timeout)))

    def refuse(self, why: str) -> None:
        """Tell a caller that is not of this deployment why, and close; it gets nothing else."""
        log.warning("refused a request-plane connection from %s: %s", self.peer, why)
        self.flush()
        payload = wire.encode(wire.Refused(f"this worker serves only its deployment: {why}"))
        self.transport.write(_HEADER.pack(len(payload)) + payload)
        self.transport.close()

    def put(self, token: str, frame: wire.Frame) -> None:
        if frame.k != wire.DATA:
            self._requests.pop(token, None)
        self._frames.append((token, frame))
        self.schedule_flush()

    def flush(self) -> None:
        if self._frames:
            frames, self._frames = self._frames, []
            for payload in wire.encode_batches(frames, self.listener.max_message_bytes()):
                self._out += (_HEADER.pack(len(payload)), payload)
            self.last_activity = time.monotonic()
        super().flush()


class TcpListener:
    """This process's request-plane port: every endpoint it serves, one listening socket.

    ``max_message_bytes()`` is the request plane's size limit (read on every use: after a
    reconnect the NATS server, and its ``max_payload``, may be another).
    """

    def __init__(
        self,
        servers: dict[str, EndpointServer],
        *,
        secret: bytes | None = None,
        max_message_bytes: Callable[[], int] = lambda: 1024 * 1024,
        limits: ListenerLimits = DEFAULT_LIMITS,
    ) -> None:
        self.servers = servers
        self.secret = secret
        self.max_message_bytes = max_message_bytes
        self.max_connections = limits.max_connections
        self.read_timeout = limits.read_timeout
        self.idle_timeout = limits.idle_timeout
        self.connections: set[_WorkerConnection] = set()
        self.address = ""
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, advertise_host: str | None = None) -> str:
        """Listen on ``host:port`` (0: any free port); returns the address callers should use
        (``advertise_host``, default ``host``, with the bound port)."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(lambda: _WorkerConnection(self), host, port, reuse_address=True)
        except OSError as exc:
            raise UsageError(
                f"--tcp-rpc-host {host} --tcp-rpc-port {port}: cannot listen there "
                f"({exc.strerror or exc}); pass another port (0 picks a free one) or host"
            ) from exc
        if self.secret is None:
            log.warning(
                "the TCP request plane on %s has no secret: any process on this host can call this "
                "worker; set DYN_REQUEST_PLANE_TOKEN (or --nats-token) to close it",
                host,
            )
        bound_port = self._server.sockets[0].getsockname()[1]
        advertised = advertise_host or host
        if advertised in WILDCARDS:
            raise UsageError(
                f"--tcp-rpc-host {host}: a wildcard is no address to publish; pass --tcp-rpc-advertise-host ADDRESS"
            )
        self.address = f"[{advertised}]:{bound_port}" if ":" in advertised else f"{advertised}:{bound_port}"
        self._sweeper = asyncio.create_task(self._sweep(), name="tcp-plane-timeouts")
        return self.address

    async def _sweep(self) -> None:
        """Close connections that hold the listener without using it: no handshake, a message
        that takes too long to arrive (slow-loris), or nothing to do for the idle timeout."""
        interval = max(0.05, min(1.0, self.read_timeout / 4, self.idle_timeout / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in list(self.connections):
                if not conn.authenticated and now - conn.opened > self.read_timeout:
                    conn.fail(f"no handshake within {self.read_timeout:g}s (--tcp-read-timeout)")
                elif conn.partial_since is not None and now - conn.partial_since > self.read_timeout:
                    conn.fail(f"a message took over {self.read_timeout:g}s to arrive (--tcp-read-timeout)")
                elif conn.idle and now - conn.last_activity > self.idle_timeout:
                    log.info(
                        "closing the request-plane connection with %s: idle for %.0fs (--tcp-idle-timeout)",
                        conn.peer,
                        now - conn.last_activity,
                    )
                    conn.transport.close()

    async def close(self, grace: float = 2.0) -> None:
        """Stop listening; send what is pending and close every connection (a peer that does not
        take its last frames within ``grace`` seconds is cut off: shutdown must not hang on it)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.flush()
            if conn.transport is not None:
                conn.transport.close()
        deadline = asyncio.get_running_loop().time() + grace
        while self.connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            log.warning("closing the request-plane connection with %s without its last frames", conn.peer)
            conn.transport.abort()
        # Not Server.wait_closed(): it waits for every connection ever accepted, and a connection
        # whose close is still in flight would hold shutdown forever.


#: Bind addresses that mean "every interface": callers need another address to reach the listener.
WILDCARDS = ("", "0.0.0.0", "::")


# ---- caller side --------------------------------------------------------------------------------


class HandshakeFailed(Exception):
    """The worker at an address is not (or does not accept us as) part of this deployment."""


class _CallerConnection(FramedConnection):
    """This process's connection to one worker: the handshake, then frames go to the streams
    waiting for them."""

    def __init__(self, caller: TcpCaller) -> None:
        super().__init__(HANDSHAKE_MESSAGE_BYTES)
        self.caller = caller
        self.router = caller.router
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._nonce = request_plane_auth.new_nonce()
        self._worker_nonce = ""
        # Close this connection when it has been idle this long (0: never), well before the worker
        # would: a call sent just as the worker closes it would fail.
        self.idle_close = 0.0

    def send(self, payload: bytes) -> None:
        self.last_activity = time.monotonic()
        super().send(payload)

    def on_message(self, data: bytes) -> None:
        if not self.ready.done():
            self._handshake(data)
            return
        try:
            batch = wire.decode_batch(data)
        except wire.DecodeError as exc:
            self.fail(f"malformed response frames ({exc})")
            return
        self.router.deliver(batch)

    def _handshake(self, data: bytes) -> None:
        secret = self.caller.secret or b""
        try:
            msg = wire.decode_greeting(data)
        except wire.DecodeError:
            self._give_up("it does not speak the request-plane handshake")
            return
        if isinstance(msg, wire.Refused):
            self._give_up(
                f"it refused this process ({msg.why}); give every process of the deployment "
                "the same DYN_REQUEST_PLANE_TOKEN (or --nats-token)"
            )
        elif isinstance(msg, wire.Hello) and not self._worker_nonce:
            self._worker_nonce = msg.n
            self.send(wire.encode(wire.Auth(self._nonce, request_plane_auth.caller_proof(secret, msg.n, self._nonce))))
        elif isinstance(msg, wire.Welcome) and self._worker_nonce:
            expected = request_plane_auth.worker_proof(secret, self._worker_nonce, self._nonce)
            if not request_plane_auth.matches(expected, msg.m):
                self._give_up("it did not prove the deployment's request-plane secret")
                return
            self.limit = self.caller.max_message_bytes()
            self.idle_close = msg.i / 2
            self.ready.set_result(None)
        else:
            self._give_up(f"an out-of-order handshake message ({type(msg).__name__})")

    def _give_up(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(HandshakeFailed(why))
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(HandshakeFailed("it closed the connection during the handshake"))
        self.caller.lost(self)
        self.router.connection_lost(self)


class TcpCaller:
    """Requests over TCP (a :class:`~.request_plane.Caller`): connections to workers' listeners,
    one per address, opened (and authenticated) on first use.

    ``address_of(component, endpoint, instance_id)`` is the TCP address the instance published
    for that endpoint, or "": a worker on the NATS plane (or one discovery does not know) is
    called through ``fallback``, since every worker answers on NATS.
    """

    def __init__(
        self,
        router: StreamRouter,
        fallback: Caller,
        address_of: Callable[[str, str, str], str],
        *,
        secret: bytes | None = None,
        max_message_bytes: Callable[[], int] = lambda: 1024 * 1024,
    ) -> None:
        self.router = router
        self.fallback = fallback
        self.address_of = address_of
        self.secret = secret
        self.max_message_bytes = max_message_bytes
        self._connections: dict[str, _CallerConnection] = {}
        self._opening: dict[str, asyncio.Future[_CallerConnection]] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def _close_idle(self) -> None:
        """Close connections that carried nothing for half the worker's idle timeout."""
        while self._connections:
            await asyncio.sleep(
                max(0.05, min([c.idle_close / 4 for c in self._connections.values() if c.idle_close] or [5.0]))
            )
            now = time.monotonic()
            for address, conn in list(self._connections.items()):
                if conn.idle_close and now - conn.last_activity > conn.idle_close and not self.router.uses(conn):
                    del self._connections[address]
                    conn.transport.close()

    async def connection(self, address: str) -> _CallerConnection:
        conn = self._connections.get(address)
        if conn is not None and conn.open:
            return conn
        opening = self._opening.get(address)
        if opening is None:  # one connect for every stream that wants this worker now
            opening = self._opening[address] = asyncio.ensure_future(self._open(address))
            opening.add_done_callback(lambda _f: self._opening.pop(address, None))
        return await asyncio.shield(opening)

    async def _open(self, address: str) -> _CallerConnection:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()

        async def connect_and_prove() -> _CallerConnection:
            _, conn = await loop.create_connection(lambda: _CallerConnection(self), host.strip("[]"), int(port))
            try:
                await conn.ready
            except HandshakeFailed:
                conn.transport.abort()
                raise
            return conn

        try:
            conn = await asyncio.wait_for(connect_and_prove(), CONNECT_TIMEOUT)
        except asyncio.TimeoutError:
            raise HandshakeFailed(f"no handshake within {CONNECT_TIMEOUT:g}s") from None
        self._connections[address] = conn
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._close_idle(), name="tcp-plane-idle-connections")
        return conn

    def lost(self, conn: _CallerConnection) -> None:
        for address, known in list(self._connections.items()):
            if known is conn:
                del self._connections[address]

    def stream(
        self, component: str, endpoint: str, instance_id: str, request_id: str, payload: Any
    ) -> AsyncGenerator[list[Any], None]:
        """Stream one request to the instance's listener (see :meth:`StreamRouter.stream`)."""
        address = self.address_of(component, endpoint, instance_id)
        if not address:
            return self.fallback.stream(component, endpoint, instance_id, request_id, payload)
        envelope = wire.RequestEnvelope(request_id, payload, b=True)
        conn: _CallerConnection | None = None

        async def send(token: str) -> _CallerConnection:
            nonlocal conn
            call = wire.encode(wire.Call(token, endpoint, envelope))
            check_size(len(call), self.max_message_bytes())
            try:
                conn = await self.connection(address)
            except (OSError, asyncio.TimeoutError, HandshakeFailed) as exc:
                self.router.on_no_responders(instance_id)
                if isinstance(exc, HandshakeFailed):
                    log.warning("instance %s at %s: %s", instance_id, address, exc)
                raise RequestError(
                    "unavailable",
                    f"cannot connect to instance {instance_id} at {address} ({type(exc).__name__}: {exc})",
                    retryable=True,
                ) from None
            if not conn.open:
                raise RequestError("unavailable", f"the connection to instance {instance_id} closed", retryable=True)
            conn.send(call)
            return conn

        async def cancel() -> None:
            if conn is not None and conn.open:
                conn.send(wire.encode(wire.Cancel(request_id)))

        return self.router.stream(instance_id, request_id, f"{endpoint} of instance {instance_id}", send, cancel)

    async def cancel(self, instance_id: str, request_id: str) -> None:
        """Over NATS, which every worker also takes cancels on: a request this process no longer
        streams has no connection of its own (a stream's own cancel goes over its connection)."""
        await self.fallback.cancel(instance_id, request_id)

    async def close(self) -> None:
        """Close every connection (each worker then cancels what it still serves for this
        process), and the NATS fallback."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        self._connections.clear()
        await self.fallback.close()
