"""The streaming request plane, what both planes share: one request, many response frames, a
clear end.

A request travels over NATS (:mod:`.nats_plane`) or TCP (:mod:`.tcp_plane`); this module is
what is the same on both. Worker side: an :class:`EndpointServer` runs the role's handler (an
async generator) per request, each yielded item becoming a numbered frame to the caller, then an
end frame; a raised :class:`RequestError` becomes a structured error frame and the worker keeps
serving. A plane hands it decoded requests (:meth:`EndpointServer.accept`) with a sink for their
frames, and registers as an :class:`Ingress` to be closed when the server stops accepting.

Caller side: a :class:`Caller` (one per runtime, chosen at connect by its request plane) sends a
request, and the :class:`StreamRouter` yields the frames' data until the end, as lists of the
items that arrived together. If the caller stops early (it is cancelled, or breaks out of the
loop) a :class:`wire.Cancel` goes to the instance, which cancels the handler task (a vLLM handler
then aborts the engine request).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import attrs

from dynamo_worker.core import wire
from dynamo_worker.core.errors import EngineDead

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
        raise RequestError(
            wire.TOO_LARGE,
            f"the request is {size} bytes on the request plane, over its "
            f"{limit}-byte limit (the NATS server's max_payload); send a smaller request, or "
            "have the operator raise max_payload",
        )


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


class Ingress(Protocol):
    """One way requests reach an :class:`EndpointServer` that is shut when the server stops
    accepting (the NATS subscription; the TCP listener instead asks :attr:`EndpointServer.accepting`)."""

    async def stop(self) -> None:
        """Take no new requests."""

    async def flush(self) -> None:
        """Send the frames still waiting to leave."""

    async def close(self) -> None:
        """Flush, and release what it holds (the process is closing)."""


class EndpointServer:
    """Serves one endpoint of one instance, over either plane; tracks in-flight requests so
    shutdown can drain."""

    def __init__(
        self,
        endpoint: str,
        instance_id: str,
        handler: Handler,
        on_engine_dead: Callable[[EngineDead], None],
        observer: RequestObserver | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.instance_id = instance_id
        self.handler = handler
        self.on_engine_dead = on_engine_dead
        self.observer = observer or RequestObserver()
        self.ingresses: list[Ingress] = []
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.last_activity = time.monotonic()  # when a request last started or ended (idle canary)
        self.health_check_ids: set[str] = set()  # request ids of this process's own canaries
        self._accepting = True
        self._shutting_down = False
        self._answers: set[asyncio.Task[None]] = set()

    async def stop_accepting(self) -> None:
        """Take no new requests: NATS callers get 'no responders' at once, TCP callers
        ``no_responders``, and go elsewhere."""
        if self._accepting:
            self._accepting = False
            for ingress in self.ingresses:
                await ingress.stop()

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
        for ingress in self.ingresses:
            await ingress.flush()
        return len(cut)

    async def close(self) -> None:
        """Send what is pending on every ingress and release them (the runtime is closing)."""
        for ingress in self.ingresses:
            await ingress.close()

    def cancel(self, request_id: str) -> bool:
        task = self.inflight.get(request_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    @property
    def accepting(self) -> bool:
        return self._accepting

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
        ctx = RequestContext(
            envelope.id, self.endpoint, self.instance_id, is_health_check=envelope.id in self.health_check_ids
        )
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
    """The caller's side, on either plane: one queue per open stream, keyed by a token the plane
    puts on the stream's frames (a NATS reply subject's last part, a TCP call's ``s``).

    Idle streams are found by one watchdog task for all of them (rather than a timer per
    frame): a stream that received nothing for ``idle_timeout`` gets a retryable error.
    """

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self._streams: dict[str, _OpenStream] = {}
        # Told when nobody answers for an instance (NATS "no responders", a refused or lost TCP
        # connection): its process is gone (or it stopped listening), usually well before its
        # discovery lease expires.
        self.on_no_responders: Callable[[str], None] = lambda instance_id: None
        self._counter = 0
        self._watchdog: asyncio.Task[None] | None = None

    def start(self) -> None:
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

    def put(self, token: str, item: wire.Frame | RequestError) -> None:
        """Hand one frame (or the error that took its place) to its open stream, if still open."""
        stream = self._streams.get(token)
        if stream is not None:
            stream.last_frame = time.monotonic()
            stream.queue.put_nowait(item)

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

    async def stream(
        self,
        instance_id: str,
        request_id: str,
        what: str,
        send: Callable[[str], Awaitable[object]],
        cancel: Callable[[], Awaitable[None]],
    ) -> AsyncGenerator[list[Any], None]:
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
                    # Alive if a frame arrives within the grace, whatever its lease said. A second
                    # suspicion (its heartbeats and its lease both lapse) does not end the grace:
                    # it once did, and the stream then waited out the 60 s idle timeout.
                    try:
                        async with asyncio.timeout(GONE_GRACE):
                            while item is _SUSPECT:
                                item = await queue.get()
                    except TimeoutError:
                        raise InstanceGone(instance_id) from None
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
                        error = RequestError(
                            "unavailable",
                            f"no response from instance {instance_id} for {self.idle_timeout}s",
                            retryable=True,
                        )
                    elif isinstance(item, RequestError):
                        error = item
                    elif item is not _SUSPECT:  # a frame (a late suspicion is moot: it answered)
                        if item.n != expected:
                            error = RequestError(
                                "unavailable", f"response stream lost frames {expected}..{item.n - 1}", retryable=True
                            )
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


class Caller(Protocol):
    """How this process sends requests: one per runtime, chosen when it connects by its request
    plane (:class:`.nats_plane.NatsCaller` or :class:`.tcp_plane.TcpCaller`), so no call asks
    which plane it is on."""

    def stream(
        self, component: str, endpoint: str, instance_id: str, request_id: str, payload: Any
    ) -> AsyncGenerator[list[Any], None]:
        """Send one request to ``endpoint`` of instance ``instance_id`` and yield its response
        items, as lists of the items that arrived together (see :meth:`StreamRouter.stream`:
        the errors, and the cancel sent when the reader stops early)."""
        ...

    async def cancel(self, instance_id: str, request_id: str) -> None:
        """Stop request ``request_id`` on ``instance_id`` (a stream does this itself when its
        reader stops early; this is for a request sent some other way)."""

    async def close(self) -> None:
        """Take no more responses and release the plane's connections (the runtime is closing)."""
