"""The NATS request plane (``--request-plane nats``): requests and their response frames as NATS
messages. Every worker answers on it whatever its plane, so a caller of either kind reaches it
(a TCP caller uses it for workers that publish no TCP address).

Worker side: a :class:`NatsEndpoint` subscribes an :class:`~.request_plane.EndpointServer` to
``{ns}.{component}.{endpoint}.{instance}`` and publishes each frame to the request's reply
subject. Frames are sent at the end of the event-loop turn that produced them, and the frames of
all the streams going to one caller in that turn travel as one message (a *batch*): at
concurrency 64 a vLLM engine step then costs one NATS message per caller instead of 64
(docs/performance.md). Callers that did not ask for batches (``RequestEnvelope.b``) get one
message per frame. :func:`serve_cancels` takes the :class:`wire.Cancel` messages sent to this
instance's control subject.

Caller side: :class:`NatsCaller` publishes the request with a reply subject on the caller's
single wildcard inbox subscription; the :class:`~.request_plane.StreamRouter` turns the frames
into the stream. A stream that ends early sends a :class:`wire.Cancel` to the instance's control
subject. The server's "no responders" status fails a stream at once, retryably.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from nats import errors as nats_errors

from dynamo_worker.core import wire
from dynamo_worker.core.request_plane import EndpointServer, RequestError, StreamRouter, check_size

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

#: A batch is sent as soon as it holds this many frames (bounds message size and latency when a
#: handler yields many items without awaiting anything).
MAX_BATCH_FRAMES = 256


def endpoint_subject(namespace: str, component: str, endpoint: str, instance_id: str) -> str:
    """The subject an instance's endpoint takes requests on (also its discovery key)."""
    return f"{namespace}.{component}.{endpoint}.{instance_id}"


def control_subject(namespace: str, instance_id: str) -> str:
    """The subject an instance takes cancels on (:class:`wire.Cancel`), for every endpoint."""
    return f"_DWCTL.{namespace}.{instance_id}"


# ---- worker side --------------------------------------------------------------------------------


class Outbox:
    """Response frames on their way out, batched per caller within one event-loop turn.

    The first frame of a turn leaves at once (a lone stream pays no batching delay); the
    frames that other streams produce in the same turn wait in ``_pending``, grouped by the
    caller's reply prefix, for one sender task that runs after them and sends each group as one
    batch. A frame never overtakes an earlier one: nothing leaves directly while any is pending.
    """

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self._pending: dict[str, list[tuple[str, wire.Frame]]] = {}
        self._in_turn = False
        self._wake = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    async def put(self, reply: str, frame: wire.Frame, batching: bool) -> None:
        if not batching:
            await self._publish_frame(reply, frame)
            return
        if not self._in_turn and not self._pending:
            self._in_turn = True
            asyncio.get_running_loop().call_soon(self._end_turn)
            await self._publish_frame(reply, frame)
            return
        prefix, _, token = reply.rpartition(".")
        frames = self._pending.get(prefix)
        if frames is None:
            frames = self._pending[prefix] = []
        frames.append((token, frame))
        if len(frames) >= MAX_BATCH_FRAMES:
            await self._send(prefix)
        else:
            self._wake.set()
            if self._sender is None or self._sender.done():
                self._sender = asyncio.create_task(self._run(), name="response-frame-sender")

    async def _publish_frame(self, reply: str, frame: wire.Frame) -> None:
        data = wire.encode(frame)
        if len(data) > self.nc.max_payload:  # the caller learns why instead of waiting for a frame
            data = wire.encode(wire.too_large_frame(frame, len(data), self.nc.max_payload))
        await self.nc.publish(reply, data)

    def _end_turn(self) -> None:
        self._in_turn = False

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send everything pending (also called before the connection closes)."""
        for prefix in list(self._pending):
            await self._send(prefix)

    async def close(self) -> None:
        await self.flush()
        if self._sender is not None:
            self._sender.cancel()

    async def _send(self, prefix: str) -> None:
        frames = self._pending.pop(prefix, None)
        if not frames:
            return
        try:
            if len(frames) == 1:
                token, frame = frames[0]
                await self._publish_frame(f"{prefix}.{token}", frame)
            else:
                for batch in wire.encode_batches(frames, self.nc.max_payload):
                    await self.nc.publish(f"{prefix}.{wire.BATCH_SUBJECT}", batch)
        except nats_errors.Error as exc:  # the caller's stream then times out or fails over
            log.warning("could not send %d response frame(s) to %s: %s", len(frames), prefix, exc)


class NatsEndpoint:
    """An endpoint server's requests over NATS: its subscription and its outbox (an
    :class:`~.request_plane.Ingress` of the server)."""

    def __init__(self, nc: NATS, subject: str, server: EndpointServer) -> None:
        self.nc = nc
        self.subject = subject
        self.server = server
        self.outbox = Outbox(nc)
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_message)
        self.server.ingresses.append(self)

    async def stop(self) -> None:
        """Unsubscribe: new requests get 'no responders' at once and callers go elsewhere."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def flush(self) -> None:
        await self.outbox.flush()

    async def close(self) -> None:
        await self.outbox.close()

    async def _on_message(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("dropping a request on %s without a reply subject", self.subject)
            return
        reply, outbox = msg.reply, self.outbox

        try:
            envelope = wire.decode_request(msg.data)
        except wire.DecodeError as exc:
            await self.server.refuse(lambda f: outbox.put(reply, f, False), f"malformed request: {exc}")
            return
        batching = envelope.b
        self.server.accept(envelope, lambda frame: outbox.put(reply, frame, batching))


async def serve_cancels(nc: NATS, namespace: str, instance_id: str, servers: dict[str, EndpointServer]) -> Subscription:
    """Cancel the requests named by :class:`wire.Cancel` messages to this instance's control
    subject, whichever plane brought them; returns the subscription."""

    async def on_cancel(msg: Msg) -> None:
        try:
            cancel = wire.decode_cancel(msg.data)
        except wire.DecodeError:
            log.warning("ignoring a malformed control message")
            return
        for server in servers.values():
            if server.cancel(cancel.id):
                log.debug("request %s cancelled by its caller", cancel.id)

    return await nc.subscribe(control_subject(namespace, instance_id), cb=on_cancel)


# ---- caller side --------------------------------------------------------------------------------


class NatsCaller:
    """Requests over NATS (a :class:`~.request_plane.Caller`): one wildcard inbox subscription,
    ``{inbox_prefix}.*``, takes every stream's frames."""

    def __init__(self, nc: NATS, router: StreamRouter, namespace: str, inbox_prefix: str) -> None:
        self.nc = nc
        self.router = router
        self.namespace = namespace
        self.inbox_prefix = inbox_prefix
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self.inbox_prefix}.*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        if token == wire.BATCH_SUBJECT:
            try:
                batch = wire.decode_batch(msg.data)
            except wire.DecodeError as exc:
                log.warning("dropping a malformed batch of response frames: %s", exc)
                return
            self.router.deliver(batch)
            return
        if msg.headers and msg.headers.get("Status") == "503":
            self.router.no_responders(token)
            return
        try:
            self.router.put(token, wire.decode_frame(msg.data))
        except wire.DecodeError as exc:
            self.router.put(token, RequestError("internal", f"malformed response frame: {exc}"))

    def stream(
        self, component: str, endpoint: str, instance_id: str, request_id: str, payload: Any
    ) -> AsyncGenerator[list[Any], None]:
        """Stream one request over NATS (see :meth:`~.request_plane.StreamRouter.stream`)."""
        subject = endpoint_subject(self.namespace, component, endpoint, instance_id)
        request = wire.encode(wire.RequestEnvelope(request_id, payload, b=True))
        inbox = self.inbox_prefix

        async def send(token: str) -> None:
            check_size(len(request), self.nc.max_payload)  # else nats-py raises MaxPayloadError
            await self.nc.publish(subject, request, reply=f"{inbox}.{token}")

        async def cancel() -> None:
            await self.cancel(instance_id, request_id)

        return self.router.stream(instance_id, request_id, subject, send, cancel)

    async def cancel(self, instance_id: str, request_id: str) -> None:
        if self.nc.is_closed:
            return
        await self.nc.publish(control_subject(self.namespace, instance_id), wire.encode(wire.Cancel(request_id)))

    async def close(self) -> None:
        """Stop taking responses: the runtime is closing, nobody reads them any more (while NATS
        is unreachable there is nothing to tell the server; the subscription goes with the
        connection)."""
        if self._sub is not None and self.nc.is_connected:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except nats_errors.Error as exc:  # the connection went meanwhile: the inbox went with it
                log.debug("could not unsubscribe the response inbox: %s", exc)
