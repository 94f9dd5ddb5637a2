"""The streaming request plane: one request, many response frames, a clear end.

Worker side: an :class:`EndpointServer` subscribes to ``{ns}.{component}.{endpoint}.{instance}``
and runs the role's handler (an async generator) per request, publishing each yielded item as a
frame to the request's reply subject, then an end frame. A raised :class:`RequestError` becomes
a structured error frame; the worker keeps serving.

Caller side: :func:`stream` publishes the request with a reply subject on the caller's single
wildcard inbox subscription and yields the frames' data until the end. If the caller stops
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


@attrs.define
class RequestContext:
    """What a handler knows about the request it serves."""

    request_id: str
    endpoint: str
    instance_id: str
    started: float = attrs.field(factory=time.monotonic)


Handler = Callable[[Any, RequestContext], AsyncIterator[Any]]


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
        self.inflight: dict[str, asyncio.Task[None]] = {}
        self.last_activity = time.monotonic()  # when a request last started or ended (idle canary)
        self._sub: Any = None
        self._shutting_down = False

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
        return len(cut)

    def cancel(self, request_id: str) -> bool:
        task = self.inflight.get(request_id)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    async def _on_message(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("dropping a request on %s without a reply subject", self.subject)
            return
        try:
            envelope = wire.decode_request(msg.data)
        except wire.DecodeError as exc:
            self.observer.started(self.endpoint)
            await self._publish_error(msg.reply, 0, wire.ErrorInfo("bad_request", f"malformed request: {exc}"))
            self.observer.finished(self.endpoint, 0.0, "bad_request")
            return
        if envelope.id in self.inflight:
            err = wire.ErrorInfo("bad_request", f"request id {envelope.id!r} is already in flight")
            await self._publish_error(msg.reply, 0, err)
            return
        self.last_activity = time.monotonic()
        task = asyncio.create_task(self._serve(envelope, msg.reply))
        self.inflight[envelope.id] = task
        task.add_done_callback(lambda _t, rid=envelope.id: self.inflight.pop(rid, None))

    async def _publish_error(self, reply: str, seq: int, err: wire.ErrorInfo) -> None:
        await self.nc.publish(reply, wire.encode(wire.Frame(wire.ERROR, seq, err=err)))

    async def _serve(self, envelope: wire.RequestEnvelope, reply: str) -> None:
        ctx = RequestContext(envelope.id, self.endpoint, self.instance_id)
        seq = 0
        outcome = "ok"
        self.observer.started(self.endpoint)
        try:
            async for item in self.handler(envelope.p, ctx):
                await self.nc.publish(reply, wire.encode(wire.Frame(wire.DATA, seq, d=item)))
                seq += 1
            await self.nc.publish(reply, wire.encode(wire.Frame(wire.END, seq)))
        except RequestError as exc:
            outcome = exc.code
            await self._publish_error(reply, seq, exc.info())
        except EngineDead as exc:
            outcome = "engine_dead"
            await self._publish_error(reply, seq, wire.ErrorInfo("engine_dead", str(exc), retryable=True))
            self.on_engine_dead(exc)
        except asyncio.CancelledError:
            outcome = "cancelled"
            if self._shutting_down:
                # Tell the caller to retry elsewhere rather than leave it waiting.
                err = wire.ErrorInfo("unavailable", "worker shut down before the request finished", retryable=True)
                await self._publish_error(reply, seq, err)
            raise
        except Exception as exc:  # a handler bug: answer the caller, keep serving, log it loudly
            outcome = "internal"
            log.exception("endpoint %s failed on request %s", self.endpoint, envelope.id)
            await self._publish_error(reply, seq, wire.ErrorInfo("internal", f"{type(exc).__name__}: {exc}"))
        finally:
            self.last_activity = time.monotonic()
            self.observer.finished(self.endpoint, self.last_activity - ctx.started, outcome)


class RequestObserver:
    """Hooks the metrics module fills in; the request plane itself knows no Prometheus."""

    def started(self, endpoint: str) -> None:
        pass

    def finished(self, endpoint: str, seconds: float, outcome: str) -> None:
        pass


# After an instance's lease expires, how long its open streams wait for a frame before failing.
GONE_GRACE = 0.5
_SUSPECT = object()  # queued for each open stream to an instance whose lease expired


class InstanceGone(RequestError):
    """The instance serving a stream left discovery (died or withdrew) before the end."""

    def __init__(self, instance_id: str) -> None:
        super().__init__("unavailable", f"instance {instance_id} went away mid-request", retryable=True)


class StreamRouter:
    """The caller's side: one wildcard inbox subscription, one queue per open stream."""

    def __init__(self, nc: NATS, namespace: str, inbox_prefix: str, idle_timeout: float) -> None:
        self.nc = nc
        self.namespace = namespace
        self.inbox_prefix = inbox_prefix
        self.idle_timeout = idle_timeout
        self._streams: dict[str, tuple[str, asyncio.Queue[Any]]] = {}
        self._counter = 0
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{self.inbox_prefix}.*", cb=self._on_reply)

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._streams.get(msg.subject.rpartition(".")[2])
        if entry is not None:
            entry[1].put_nowait(msg)

    def instance_gone(self, instance_id: str) -> None:
        """Open streams to ``instance_id`` fail unless a frame arrives within ``GONE_GRACE``.

        Called when the instance's lease expired. A live but starved worker (its keep-alive late
        on a loaded machine) is still streaming, so a stream that keeps receiving frames goes on;
        one to a dead process hears nothing and fails with a retryable error.
        """
        for target, queue in self._streams.values():
            if target == instance_id:
                queue.put_nowait(_SUSPECT)

    def open_streams(self) -> int:
        return len(self._streams)

    async def stream(self, subject: str, instance_id: str, request_id: str, payload: Any,
                     send_cancel: Callable[[str, str], Awaitable[None]]) -> AsyncIterator[Any]:
        """Send one request and yield each response item until the end frame.

        Raises :class:`RequestError` for an error frame (``retryable`` as the worker said), for
        no responders (``unavailable``, retryable), for a lost frame or an idle stream.
        """
        self._counter += 1
        token = str(self._counter)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[token] = (instance_id, queue)
        finished = False
        try:
            await self.nc.publish(
                subject, wire.encode(wire.RequestEnvelope(request_id, payload)),
                reply=f"{self.inbox_prefix}.{token}",
            )
            expected = 0
            suspect = False
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), GONE_GRACE if suspect else self.idle_timeout)
                except asyncio.TimeoutError:
                    if suspect:
                        raise InstanceGone(instance_id) from None
                    raise RequestError(
                        "unavailable", f"no response from instance {instance_id} for {self.idle_timeout}s",
                        retryable=True) from None
                if item is _SUSPECT:
                    suspect = True
                    continue
                suspect = False  # it answered: alive, whatever its lease said
                if item.headers and item.headers.get("Status") == "503":
                    finished = True  # nobody received it: nothing to cancel
                    raise RequestError("unavailable", f"no instance listens on {subject}", retryable=True)
                frame = wire.decode_frame(item.data)
                if frame.n != expected:
                    raise RequestError("unavailable", f"response stream lost frames {expected}..{frame.n - 1}",
                                       retryable=True)
                expected += 1
                if frame.k == wire.DATA:
                    yield frame.d
                elif frame.k == wire.END:
                    finished = True
                    return
                else:
                    finished = True
                    assert frame.err is not None
                    raise RequestError.from_info(frame.err)
        finally:
            del self._streams[token]
            if not finished:
                # The caller went away (or the stream broke): stop the work on the worker.
                await send_cancel(instance_id, request_id)
