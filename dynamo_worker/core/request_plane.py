"""The streaming request plane: one request, many response frames, a clear end.

Worker side: an :class:`EndpointServer` subscribes to ``{ns}.{component}.{endpoint}.{instance}``
and runs the role's handler (an async generator) per request, publishing each yielded item as a
frame to the request's reply subject, then an end frame. A raised :class:`RequestError` becomes
a structured error frame; the worker keeps serving.

Frames are sent at the end of the event-loop turn that produced them, and the frames of all the
streams going to one caller in that turn travel as one message (a *batch*): at concurrency 64 a
vLLM engine step then costs one NATS message per caller instead of 64 (docs/performance.md).
Callers that did not ask for batches (``RequestEnvelope.b``) get one message per frame.

Caller side: :meth:`StreamRouter.stream` publishes the request with a reply subject on the
caller's single wildcard inbox subscription and yields the frames' data until the end, as lists
of the items that arrived together. If the caller stops
early (it is cancelled, or breaks out of the loop) a ``cancel`` control message goes to the
instance, which cancels the handler task (a vLLM handler then aborts the engine request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import attrs
from nats import errors as nats_errors

from dynamo_worker.core import wire
from dynamo_worker.core.errors import EngineDead

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from nats.aio.msg import Msg

log = logging.getLogger(__name__)


class RequestError(Exception):
    """Raise from a handler to answer the caller with a structured error; the worker goes on.

    ``code``: ``bad_request`` (the caller's fault, maps to HTTP 400), ``not_found`` (404),
    ``unavailable`` (503, retryable), ``internal`` (500).
    """

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable

    @classmethod
    def from_info(cls, info: wire.ErrorInfo) -> RequestError:
        return cls(info.code, info.message, retryable=info.retryable)

    def info(self) -> wire.ErrorInfo:
        return wire.ErrorInfo(self.code, self.message, self.retryable)

    def __repr__(self) -> str:
        return f"RequestError({self.code!r}, {self.message!r}, retryable={self.retryable})"


def check_size(size: int, limit: int) -> None:
    """A ``too_large`` :class:`RequestError` (HTTP 413) for a request over the plane's limit."""
    if size > limit:
        raise RequestError(wire.TOO_LARGE, f"the request is {size} bytes on the request plane, over its "
                           f"{limit}-byte limit (the NATS server's max_payload); send a smaller request, or "
                           "have the operator raise max_payload")


@attrs.define
class RequestContext:
    """What a handler knows about the request it serves.

    ``is_health_check`` is true for the health canary this process sends itself (the role's
    health payload, after the endpoint has been idle): a handler may answer it more cheaply, or
    leave it out of its own accounting. A caller cannot set it: the worker marks the ids of the
    canaries it sent, in its own memory.
    """

    request_id: str
    endpoint: str
    instance_id: str
    started: float = attrs.field(factory=time.monotonic)
    is_health_check: bool = False


Handler = Callable[[Any, RequestContext], AsyncIterator[Any]]

#: Where a served request's frames go: the NATS outbox (reply subject) or a TCP connection.
FrameSink = Callable[[wire.Frame], Awaitable[None]]

#: A batch is sent as soon as it holds this many frames (bounds message size and latency when a
#: handler yields many items without awaiting anything).
MAX_BATCH_FRAMES = 256


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


class EndpointServer:
    """Serves one endpoint of one instance; tracks in-flight requests so shutdown can drain."""

    def __init__(
        self,
        nc: NATS,
        subject: str,
        endpoint: str,
        instance_id: str,
        handler: Handler,
        on_engine_dead: Callable[[EngineDead], None],
        observer: RequestObserver | None = None,
    ) -> None:
        self.nc = nc
        self.subject = subject
        self.endpoint = endpoint
        self.instance_id = instance_id
        self.handler = handler
        self.on_engine_dead = on_engine_dead
        self.observer = observer or RequestObserver()
        self.outbox = Outbox(nc)
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.last_activity = time.monotonic()  # when a request last started or ended (idle canary)
        self.health_check_ids: set[str] = set()  # request ids of this process's own canaries
        self._sub: Any = None
        self._shutting_down = False
        self._answers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(self.subject, cb=self._on_message)

    async def stop_accepting(self) -> None:
        """Unsubscribe: new requests get 'no responders' at once and callers go elsewhere."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            await sub.unsubscribe()

    async def drain(self, timeout: float) -> int:
        """Wait up to ``timeout`` for in-flight requests; cancel the rest. Returns how many were cut."""
        await self.stop_accepting()
        pending = [t for t in self.inflight.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        cut = [t for t in self.inflight.values() if not t.done()]
        self._shutting_down = True
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.wait(cut, timeout=5)
        await self.outbox.flush()
        return len(cut)

    def cancel(self, request_id: str) -> bool:
        task = self.inflight.get(request_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    @property
    def accepting(self) -> bool:
        return self._sub is not None

    async def _on_message(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("dropping a request on %s without a reply subject", self.subject)
            return
        reply, outbox = msg.reply, self.outbox

        try:
            envelope = wire.decode_request(msg.data)
        except wire.DecodeError as exc:
            await self.refuse(lambda f: outbox.put(reply, f, False), f"malformed request: {exc}")
            return
        batching = envelope.b
        self.accept(envelope, lambda frame: outbox.put(reply, frame, batching))

    async def refuse(self, put: FrameSink, message: str) -> None:
        """Answer a request that could not be decoded with a ``bad_request`` (counted, not served)."""
        self.observer.started(self.endpoint)
        await put(wire.Frame(wire.ERROR, 0, err=wire.ErrorInfo("bad_request", message)))
        self.observer.finished(self.endpoint, 0.0, "bad_request")

    def accept(self, envelope: wire.RequestEnvelope, put: FrameSink) -> None:
        """Serve one decoded request in its own task, its frames going to ``put`` (either plane)."""
        if envelope.id in self.inflight:
            err = wire.ErrorInfo("bad_request", f"request id {envelope.id!r} is already in flight")
            answer = asyncio.create_task(put(wire.Frame(wire.ERROR, 0, err=err)))
            self._answers.add(answer)  # keep a reference until it is sent
            answer.add_done_callback(self._answers.discard)
            return
        self.last_activity = time.monotonic()
        task = asyncio.create_task(self._serve(envelope, put))
        self.inflight[envelope.id] = task
        task.add_done_callback(lambda _t, rid=envelope.id: self.inflight.pop(rid, None))

    async def _serve(self, envelope: wire.RequestEnvelope, put: FrameSink) -> None:
        ctx = RequestContext(envelope.id, self.endpoint, self.instance_id,
                             is_health_check=envelope.id in self.health_check_ids)
        seq = 0
        outcome = "ok"
        err: wire.ErrorInfo | None = None
        self.observer.started(self.endpoint)
        try:
            async for item in self.handler(envelope.p, ctx):
                await put(wire.Frame(wire.DATA, seq, d=item))
                seq += 1
        except RequestError as exc:
            outcome, err = exc.code, exc.info()
        except EngineDead as exc:
            outcome, err = "engine_dead", wire.ErrorInfo("engine_dead", str(exc), retryable=True)
            self.on_engine_dead(exc)
        except asyncio.CancelledError:
            outcome = "cancelled"
            if self._shutting_down:
                # Tell the caller to retry elsewhere rather than leave it waiting.
                err = wire.ErrorInfo("unavailable", "worker shut down before the request finished", retryable=True)
                await put(wire.Frame(wire.ERROR, seq, err=err))
            raise
        except Exception as exc:  # a handler bug: answer the caller, keep serving, log it loudly
            outcome = "internal"
            log.exception("endpoint %s failed on request %s", self.endpoint, envelope.id)
            err = wire.ErrorInfo("internal", f"{type(exc).__name__}: {exc}")
        finally:
            self.last_activity = time.monotonic()
            self.observer.finished(self.endpoint, self.last_activity - ctx.started, outcome)
        await put(wire.Frame(wire.END, seq) if err is None else wire.Frame(wire.ERROR, seq, err=err))


class RequestObserver:
    """Hooks the metrics module fills in; the request plane itself knows no Prometheus."""

    def started(self, endpoint: str) -> None:
        pass

    def finished(self, endpoint: str, seconds: float, outcome: str) -> None:
        pass


# After an instance's lease expires, how long its open streams wait for a frame before failing.
GONE_GRACE = 0.5
# Queued for an open stream: its instance's lease expired / no instance listened / it was idle.
_SUSPECT = object()
_NO_RESPONDERS = object()
_IDLE = object()
_CONNECTION_LOST = object()


class InstanceGone(RequestError):
    """The instance serving a stream left discovery (died or withdrew) before the end."""

    def __init__(self, instance_id: str) -> None:
        super().__init__("unavailable", f"instance {instance_id} went away mid-request", retryable=True)


class _OpenStream:
    """One request's receiving end: frames (or markers) queue here until its reader takes them."""

    __slots__ = ("instance_id", "queue", "last_frame", "connection")

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.last_frame = time.monotonic()
        self.connection: object = None  # the TCP connection it went over (None: NATS)


class StreamRouter:
    """The caller's side: one wildcard inbox subscription, one queue per open stream.

    Idle streams are found by one watchdog task for all of them (rather than a timer per
    frame): a stream that received nothing for ``idle_timeout`` gets a retryable error.
    """

    def __init__(self, nc: NATS, namespace: str, inbox_prefix: str, idle_timeout: float) -> None:
        self.nc = nc
        self.namespace = namespace
        self.inbox_prefix = inbox_prefix
        self.idle_timeout = idle_timeout
        self._streams: dict[str, _OpenStream] = {}
        # Told when NATS answers "no responders" for an instance: its process is gone (or it
        # stopped listening), usually well before its discovery lease expires.
        self.on_no_responders: Callable[[str], None] = lambda instance_id: None
        self._counter = 0
        self._sub: Any = None
        self._watchdog: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self.inbox_prefix}.*", cb=self._on_reply)
        self._watchdog = asyncio.create_task(self._watch_idle(), name="stream-idle-watchdog")

    def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    async def _watch_idle(self) -> None:
        interval = min(1.0, self.idle_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            stale = time.monotonic() - self.idle_timeout
            for stream in self._streams.values():
                if stream.last_frame < stale:
                    stream.last_frame = float("inf")  # reported once
                    stream.queue.put_nowait(_IDLE)

    async def _on_reply(self, msg: Msg) -> None:
        token = msg.subject.rpartition(".")[2]
        if token == wire.BATCH_SUBJECT:
            try:
                batch = wire.decode_batch(msg.data)
            except wire.DecodeError as exc:
                log.warning("dropping a malformed batch of response frames: %s", exc)
                return
            self.deliver(batch)
            return
        stream = self._streams.get(token)
        if stream is None:
            return
        stream.last_frame = time.monotonic()
        if msg.headers and msg.headers.get("Status") == "503":
            stream.queue.put_nowait(_NO_RESPONDERS)
            return
        try:
            stream.queue.put_nowait(wire.decode_frame(msg.data))
        except wire.DecodeError as exc:
            stream.queue.put_nowait(RequestError("internal", f"malformed response frame: {exc}"))

    def deliver(self, batch: wire.Batch) -> None:
        """Hand frames to their open streams (frames of a stream that ended are dropped)."""
        now = time.monotonic()
        streams = self._streams
        for token, frame in batch:
            stream = streams.get(token)
            if stream is not None:
                stream.last_frame = now
                stream.queue.put_nowait(frame)

    def no_responders(self, token: str) -> None:
        """Nobody serves the request of stream ``token`` (the instance is gone or not listening)."""
        stream = self._streams.get(token)
        if stream is not None:
            stream.queue.put_nowait(_NO_RESPONDERS)

    def connection_lost(self, connection: object) -> None:
        """Open streams over this TCP connection fail at once, retryably: their instance is gone."""
        for stream in self._streams.values():
            if stream.connection is connection:
                stream.queue.put_nowait(_CONNECTION_LOST)

    def uses(self, connection: object) -> bool:
        """Whether an open stream goes over this TCP connection."""
        return any(stream.connection is connection for stream in self._streams.values())

    def instance_gone(self, instance_id: str) -> None:
        """Open streams to ``instance_id`` fail unless a frame arrives within ``GONE_GRACE``.

        Called when the instance's lease expired. A live but starved worker (its keep-alive late
        on a loaded machine) is still streaming, so a stream that keeps receiving frames goes on;
        one to a dead process hears nothing and fails with a retryable error.
        """
        for stream in self._streams.values():
            if stream.instance_id == instance_id:
                stream.queue.put_nowait(_SUSPECT)

    def open_streams(self) -> int:
        return len(self._streams)

    def new_token(self) -> str:
        self._counter += 1
        return str(self._counter)

    async def stream(self, instance_id: str, request_id: str, what: str,
                     send: Callable[[str], Awaitable[object]],
                     cancel: Callable[[], Awaitable[None]]) -> AsyncIterator[list[Any]]:
        """Send one request with ``send(token)`` (it returns the TCP connection it used, or None)
        and yield its response items, as lists of the
        items that arrived together, until the end frame. ``what`` names the endpoint in errors;
        ``cancel()`` stops the request on the worker if this stream ends early.

        Raises :class:`RequestError` for an error frame (``retryable`` as the worker said), for
        no responders (``unavailable``, retryable), for a lost frame or connection or an idle
        stream. Items that arrived before an error are yielded first.
        """
        token = self.new_token()
        stream = _OpenStream(instance_id)
        queue = stream.queue
        self._streams[token] = stream
        finished = False
        try:
            try:
                stream.connection = await send(token)
            except RequestError:
                finished = True  # it never reached the instance: nothing to cancel
                raise
            expected = 0
            while True:
                item = await queue.get()
                if item is _SUSPECT:
                    try:  # alive if anything arrives within the grace, whatever its lease said
                        item = await asyncio.wait_for(queue.get(), GONE_GRACE)
                    except asyncio.TimeoutError:
                        raise InstanceGone(instance_id) from None
                    if item is _SUSPECT:
                        continue
                items: list[Any] = []
                error: RequestError | None = None
                ended = False
                while True:  # everything that has arrived: one wake-up, one yield
                    if item is _NO_RESPONDERS:
                        finished = True  # nobody received it: nothing to cancel
                        self.on_no_responders(instance_id)
                        error = RequestError("unavailable", f"no instance listens on {what}", retryable=True)
                    elif item is _CONNECTION_LOST:
                        finished = True  # the worker cancels what its caller's connection carried
                        self.on_no_responders(instance_id)  # out of routing until it is heard again
                        error = InstanceGone(instance_id)
                    elif item is _IDLE:
                        error = RequestError("unavailable", f"no response from instance {instance_id} for "
                                             f"{self.idle_timeout}s", retryable=True)
                    elif isinstance(item, RequestError):
                        error = item
                    elif item is not _SUSPECT:  # a frame (a late suspicion is moot: it answered)
                        if item.n != expected:
                            error = RequestError("unavailable", f"response stream lost frames {expected}.."
                                                 f"{item.n - 1}", retryable=True)
                        elif item.k == wire.DATA:
                            expected += 1
                            items.append(item.d)
                        else:
                            finished = ended = True
                            if item.k != wire.END:
                                assert item.err is not None
                                # A frame too large to deliver: the handler still runs; stop it.
                                finished = item.err.code != wire.TOO_LARGE
                                if item.err.code == wire.NO_RESPONDERS:  # the TCP plane's "no responders"
                                    self.on_no_responders(instance_id)
                                    item.err = wire.ErrorInfo("unavailable", item.err.message, retryable=True)
                                error = RequestError.from_info(item.err)
                    if error is not None or ended or queue.empty():
                        break
                    item = queue.get_nowait()
                if items:
                    yield items
                if error is not None:
                    raise error
                if ended:
                    return
        finally:
            del self._streams[token]
            if not finished:
                # The caller went away (or the stream broke): stop the work on the worker.
                await cancel()
