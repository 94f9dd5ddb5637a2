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

There is no authentication on this plane: it binds 127.0.0.1 unless told otherwise
(``--tcp-rpc-host`` / ``DYN_TCP_RPC_HOST``); on a shared network use a private one, or
``--request-plane nats`` with NATS credentials (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dynamo_worker.core import wire
from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.request_plane import RequestError, StreamRouter

if TYPE_CHECKING:
    from dynamo_worker.core.request_plane import EndpointServer

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">I")
#: A message larger than this closes the connection (a broken or foreign peer, not a caller).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
#: A peer that lets this much output pile up unread is dropped (NATS calls it a slow consumer).
MAX_UNSENT_BYTES = 256 * 1024 * 1024
CONNECT_TIMEOUT = 2.0


class FramedConnection(asyncio.Protocol):
    """Length-prefixed messages both ways; what is sent in one loop turn leaves in one write."""

    def __init__(self) -> None:
        self.transport: Any = None  # asyncio's or uvloop's TCP transport
        self._inbuf = bytearray()
        self._out: list[bytes] = []
        self._flush_pending = False
        self.peer = "?"

    @property
    def open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # a lone frame must not wait for an ACK (Nagle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = "%s:%s" % (transport.get_extra_info("peername") or ("?", "?"))[:2]

    def data_received(self, data: bytes) -> None:
        buf = self._inbuf
        buf += data
        pos, size = 0, len(buf)
        while size - pos >= 4:
            (length,) = _HEADER.unpack_from(buf, pos)
            if length > MAX_MESSAGE_BYTES:
                self.fail(f"a {length}-byte message (over {MAX_MESSAGE_BYTES})")
                return
            end = pos + 4 + length
            if end > size:
                break
            self.on_message(bytes(buf[pos + 4:end]))
            pos = end
        if pos:
            del buf[:pos]

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
    """One caller's connection to this worker: serves its calls, batches its frames per turn."""

    def __init__(self, servers: dict[str, EndpointServer], connections: set[_WorkerConnection]) -> None:
        super().__init__()
        self.servers = servers
        self.connections = connections
        self._frames: wire.Batch = []
        self._requests: dict[str, tuple[EndpointServer, str]] = {}  # token -> (server, request id)

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        for server, request_id in self._requests.values():  # nobody is left to read the answers
            server.cancel(request_id)
        self._requests.clear()

    def on_message(self, data: bytes) -> None:
        try:
            msg = wire.decode_tcp(data)
        except wire.DecodeError as exc:
            self.fail(f"malformed message ({exc})")
            return
        if isinstance(msg, wire.Cancel):
            for server in self.servers.values():
                server.cancel(msg.id)
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

    def put(self, token: str, frame: wire.Frame) -> None:
        if frame.k != wire.DATA:
            self._requests.pop(token, None)
        self._frames.append((token, frame))
        self.schedule_flush()

    def flush(self) -> None:
        if self._frames:
            frames, self._frames = self._frames, []
            payload = wire.encode(frames)
            self._out += (_HEADER.pack(len(payload)), payload)
        super().flush()


class TcpListener:
    """This process's request-plane port: every endpoint it serves, one listening socket."""

    def __init__(self, servers: dict[str, EndpointServer]) -> None:
        self.servers = servers
        self.connections: set[_WorkerConnection] = set()
        self.address = ""
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port`` (0: any free port); returns the address callers should use."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _WorkerConnection(self.servers, self.connections), host, port, reuse_address=True)
        except OSError as exc:
            raise UsageError(f"--tcp-rpc-host {host} --tcp-rpc-port {port}: cannot listen there "
                             f"({exc.strerror or exc}); pass another port (0 picks a free one) or host") from exc
        bound_port = self._server.sockets[0].getsockname()[1]
        self.address = f"{advertised_host(host)}:{bound_port}"
        return self.address

    async def close(self, grace: float = 2.0) -> None:
        """Stop listening; send what is pending and close every connection (a peer that does not
        take its last frames within ``grace`` seconds is cut off: shutdown must not hang on it)."""
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


def advertised_host(bind_host: str) -> str:
    """The host callers reach a listener bound to ``bind_host`` at (a wildcard is not one)."""
    if bind_host in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return bind_host


# ---- caller side --------------------------------------------------------------------------------


class _CallerConnection(FramedConnection):
    """This process's connection to one worker: frames go to the streams waiting for them."""

    def __init__(self, router: StreamRouter, on_lost: Callable[[_CallerConnection], None]) -> None:
        super().__init__()
        self.router = router
        self.on_lost = on_lost

    def on_message(self, data: bytes) -> None:
        try:
            batch = wire.decode_batch(data)
        except wire.DecodeError as exc:
            self.fail(f"malformed response frames ({exc})")
            return
        self.router.deliver(batch)

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(self)
        self.router.connection_lost(self)


class TcpCaller:
    """Connections to workers' listeners, one per address, opened on first use."""

    def __init__(self, router: StreamRouter) -> None:
        self.router = router
        self._connections: dict[str, _CallerConnection] = {}
        self._opening: dict[str, asyncio.Future[_CallerConnection]] = {}

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
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _CallerConnection(self.router, self._lost), host.strip("[]"), int(port)),
            CONNECT_TIMEOUT)
        self._connections[address] = conn
        return conn

    def _lost(self, conn: _CallerConnection) -> None:
        for address, known in list(self._connections.items()):
            if known is conn:
                del self._connections[address]

    def call(self, address: str, instance_id: str, endpoint: str, request_id: str,
             payload: Any) -> Any:
        """Stream one request to the worker at ``address`` (see :meth:`StreamRouter.stream`)."""
        envelope = wire.RequestEnvelope(request_id, payload, b=True)
        conn: _CallerConnection | None = None

        async def send(token: str) -> _CallerConnection:
            nonlocal conn
            try:
                conn = await self.connection(address)
            except (OSError, asyncio.TimeoutError) as exc:
                self.router.on_no_responders(instance_id)
                raise RequestError("unavailable", f"cannot connect to instance {instance_id} at {address} "
                                   f"({type(exc).__name__}: {exc})", retryable=True) from None
            if not conn.open:
                raise RequestError("unavailable", f"the connection to instance {instance_id} closed",
                                   retryable=True)
            conn.send(wire.encode(wire.Call(token, endpoint, envelope)))
            return conn

        async def cancel() -> None:
            if conn is not None and conn.open:
                conn.send(wire.encode(wire.Cancel(request_id)))

        return self.router.stream(instance_id, request_id, f"{endpoint} of instance {instance_id}", send, cancel)

    def close(self) -> None:
        for conn in list(self._connections.values()):
            if conn.transport is not None:
                conn.transport.close()
        self._connections.clear()
