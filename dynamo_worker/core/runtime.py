"""The distributed runtime: addressing, discovery, request plane, event plane.

Addressing is ``namespace.component.endpoint`` plus an instance id per process. Every request
goes to one chosen instance (the caller picks it from discovery), so routing policy lives in
the caller (round-robin, random, or a router of its own).

NATS carries discovery, events and control. Requests and their response frames go through NATS
(the default, :mod:`.nats_plane`) or, with ``request_plane="tcp"``, over the TCP request plane
(:mod:`.tcp_plane`) to instances that publish a TCP address. The runtime picks its
:class:`~.request_plane.Caller` once, at connect; every call goes through it. A worker always
answers on NATS too, so a caller of either kind reaches it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import socket
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from dynamo_worker.core import wire
from dynamo_worker.core.discovery import BUCKET, Discovery, InstanceRecord, InstanceWatcher
from dynamo_worker.core.errors import EngineDead, RuntimeUnavailable, UsageError
from dynamo_worker.core.liveness import Heartbeat, LivenessWatch
from dynamo_worker.core.nats_auth import redact
from dynamo_worker.core.nats_plane import NatsCaller, NatsEndpoint, endpoint_subject, serve_cancels
from dynamo_worker.core.request_plane import (
    Caller,
    EndpointServer,
    Handler,
    RequestError,
    RequestObserver,
    StreamRouter,
)
from dynamo_worker.core.tcp_plane import DEFAULT_LIMITS, WILDCARDS, ListenerLimits, TcpCaller, TcpListener

#: The request planes a runtime can call (and serve) requests over.
REQUEST_PLANES = ("tcp", "nats")

log = logging.getLogger(__name__)


def new_instance_id() -> str:
    return uuid.uuid4().hex[:16]


class Runtime:
    """One process's connection to the deployment. Create with :meth:`connect`."""

    def __init__(
        self,
        nc: NATS,
        namespace: str,
        lease_ttl: int,
        idle_timeout: float,
        request_plane: str = "nats",
        tcp_host: str = "127.0.0.1",
        tcp_port: int = 0,
        request_plane_secret: bytes | None = None,
        tcp_limits: ListenerLimits = DEFAULT_LIMITS,
        discovery_replicas: int = 1,
        tcp_advertise_host: str | None = None,
    ) -> None:
        if request_plane not in REQUEST_PLANES:
            raise ValueError(f"request plane {request_plane!r}: choose one of {', '.join(REQUEST_PLANES)}")
        self.nc = nc
        self.request_plane = request_plane
        self.tcp_host, self.tcp_port = tcp_host, tcp_port
        self.tcp_advertise_host = tcp_advertise_host  # None: derived (see advertise_host())
        self.last_server = ""  # the server last connected to (nats-py forgets it while reconnecting)
        self.request_plane_secret = request_plane_secret
        self.tcp_limits = tcp_limits
        self.namespace = namespace
        self.instance_id = new_instance_id()
        self.discovery = Discovery(nc.jetstream(), lease_ttl, discovery_replicas)
        self.streams = StreamRouter(idle_timeout)
        self.servers: dict[str, EndpointServer] = {}
        self.watchers: dict[str, InstanceWatcher] = {}
        # Instances nobody answered for (NATS "no responders", a refused or lost TCP connection):
        # out of routing until discovery hears from them again (a keep-alive) or their lease expires.
        self.unreachable: set[str] = set()
        self.streams.on_no_responders = self._mark_unreachable
        # Heartbeats over core NATS (no JetStream needed): sent once discoverable, heard once calling.
        self.heartbeat = Heartbeat(nc, namespace, self.instance_id, lease_ttl)
        self.liveness = LivenessWatch(nc, namespace, self._on_silent, self.unreachable.discard)
        self._nats = NatsCaller(nc, self.streams, namespace, f"_DW.{self.instance_id}")
        # The plane every call of this process goes over, chosen once (a TCP caller reaches a
        # worker without a TCP address over NATS).
        self.caller: Caller = (
            self._nats
            if request_plane == "nats"
            else TcpCaller(
                self.streams,
                self._nats,
                self._address_of,
                secret=request_plane_secret,
                max_message_bytes=self.max_message_bytes,
            )
        )
        self.listener: TcpListener | None = None  # started with the first endpoint served over TCP
        self.on_engine_dead: Callable[[EngineDead], None] = lambda exc: None
        self._control_sub: Any = None
        self._request_ids = itertools.count()
        self._closing = False

    @classmethod
    async def connect(
        cls,
        url: str,
        namespace: str,
        *,
        timeout: float = 5.0,
        lease_ttl: int = 3,
        idle_timeout: float = 60.0,
        name: str = "dynamo-worker",
        request_plane: str = "nats",
        tcp_host: str = "127.0.0.1",
        tcp_port: int = 0,
        request_plane_secret: bytes | None = None,
        tcp_limits: ListenerLimits = DEFAULT_LIMITS,
        discovery_replicas: int = 1,
        tcp_advertise_host: str | None = None,
        randomize_servers: bool = False,
        **nats_options: Any,
    ) -> Runtime:
        """Connect to NATS; a :class:`RuntimeUnavailable` naming the URL if it cannot.

        ``url`` may list several servers of a cluster, comma-separated. The first one that answers
        is used (list the host's own server first), unless ``randomize_servers``; when it dies the
        client moves on to the next (the cluster's other servers, learnt from it, included) and keeps
        trying all of them forever.

        ``request_plane_secret``: the deployment's TCP-plane secret (:mod:`.request_plane_auth`);
        None only for a deployment without one. ``discovery_replicas``: the discovery bucket's
        replicas, checked here when above 1 (:class:`UsageError` if the cluster is too small).
        """
        holder: dict[str, Runtime] = {}

        async def reconnected() -> None:
            if "rt" in holder:
                holder["rt"].last_server = holder["rt"].connected_url()
                log.warning("reconnected to NATS at %s", redact(holder["rt"].last_server))
                await holder["rt"]._on_reconnect()

        async def disconnected() -> None:
            rt = holder.get("rt")
            if rt is not None and not rt._closing:
                log.warning(
                    "lost the NATS connection to %s; reconnecting (to any server of %s)",
                    redact(rt.last_server or url),
                    redact(url),
                )

        async def error(exc: Exception) -> None:
            log.debug("NATS client error: %s", exc)

        try:
            nc = await asyncio.wait_for(
                nats.connect(
                    servers=[u.strip() for u in url.split(",")],
                    name=name,
                    connect_timeout=min(timeout, 2.0),
                    # Reconnect fast and forever: the process should outlive a NATS restart, and
                    # move to another server of the cluster when its own dies (a dead server is
                    # tried again only after the others).
                    reconnect_time_wait=0.25,
                    max_reconnect_attempts=-1,
                    dont_randomize=not randomize_servers,
                    reconnected_cb=reconnected,
                    disconnected_cb=disconnected,
                    error_cb=error,
                    **nats_options,
                ),
                timeout,
            )
        except (asyncio.TimeoutError, OSError, nats.errors.Error) as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise RuntimeUnavailable(
                f"cannot reach the NATS server at {redact(url)} within {timeout:g}s "
                f"({why}); start nats-server or pass --nats-url / NATS_SERVER "
                "(and its credentials: --nats-token, --nats-user, --nats-creds)"
            ) from exc
        rt = cls(
            nc,
            namespace,
            lease_ttl,
            idle_timeout,
            request_plane,
            tcp_host,
            tcp_port,
            request_plane_secret,
            tcp_limits,
            discovery_replicas,
            tcp_advertise_host,
        )
        holder["rt"] = rt
        rt.last_server = rt.connected_url()
        log.info("connected to NATS at %s", redact(rt.last_server))
        if discovery_replicas > 1:
            try:
                await asyncio.wait_for(rt.discovery.check_replicas(), timeout)
            except UsageError:
                rt._closing = True
                await nc.close()
                raise
            except (asyncio.TimeoutError, nats.errors.Error) as exc:  # no quorum now: it is retried on use
                log.warning(
                    "could not check the discovery bucket now (%s); JetStream may have no quorum yet",
                    type(exc).__name__,
                )
        rt.streams.start()
        await rt._nats.start()
        rt._control_sub = await serve_cancels(nc, namespace, rt.instance_id, rt.servers)
        # A KV watcher is a consumer on the bucket's stream leader: when a server dies the leader
        # moves and the watcher stalls without an error (so it would miss lease expiries, and
        # streams to a dead instance would wait for their idle timeout). Restart watchers then.
        await nc.subscribe(f"$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.KV_{BUCKET}", cb=rt._on_leader_elected)
        return rt

    def connected_url(self) -> str:
        """The URL of the NATS server this process is attached to now ("" while it is not)."""
        url = self.nc.connected_url
        return url.geturl() if url is not None else ""

    def nats_local_host(self) -> str | None:
        """This host's address on the NATS connection: the interface that reaches the server,
        so an address the server's other clients (on other hosts) can reach too."""
        transport = getattr(self.nc, "_transport", None)
        writer = getattr(transport, "_io_writer", None)
        sockname = writer.get_extra_info("sockname") if writer is not None else None
        return str(sockname[0]) if sockname else None

    def advertise_host(self) -> str:
        """The host other processes reach this process's TCP listener at: ``--tcp-rpc-advertise-host``,
        else the bind address, else (a wildcard bind) this host's address on the NATS connection."""
        if self.tcp_advertise_host:
            return self.tcp_advertise_host
        if self.tcp_host not in WILDCARDS:
            return self.tcp_host
        local = self.nats_local_host()
        if local is None:
            raise UsageError(
                f"--tcp-rpc-host {self.tcp_host}: cannot tell which address other hosts reach "
                "this one at; pass --tcp-rpc-advertise-host ADDRESS"
            )
        return local

    def max_message_bytes(self) -> int:
        """The request plane's size limit, on either plane: the NATS server's ``max_payload``
        (one setting for the deployment; learned from the server at connect)."""
        return int(self.nc.max_payload)

    # ---- addressing --------------------------------------------------------------------------

    def subject(self, component: str, endpoint: str, instance_id: str) -> str:
        return endpoint_subject(self.namespace, component, endpoint, instance_id)

    # ---- serving ------------------------------------------------------------------------------

    async def serve_endpoint(
        self, component: str, endpoint: str, handler: Handler, observer: RequestObserver | None = None
    ) -> EndpointServer:
        """Start serving ``handler``; not discoverable until :meth:`publish` is called."""
        server = EndpointServer(endpoint, self.instance_id, handler, self.on_engine_dead, observer)
        if self.request_plane == "tcp" and self.listener is None:
            listener = TcpListener(
                self.servers,
                secret=self.request_plane_secret,
                max_message_bytes=self.max_message_bytes,
                limits=self.tcp_limits,
            )
            await listener.start(self.tcp_host, self.tcp_port, self.advertise_host())
            self.listener = listener
        await NatsEndpoint(self.nc, self.subject(component, endpoint, self.instance_id), server).start()
        self.servers[endpoint] = server
        return server

    async def publish(self, component: str, endpoint: str, role: str, data: dict[str, Any]) -> InstanceRecord:
        """Make an endpoint of this instance discoverable (kept alive until withdrawn)."""
        record = InstanceRecord(
            self.namespace,
            component,
            endpoint,
            self.instance_id,
            role,
            os.getpid(),
            socket.gethostname(),
            data,
            address=self.listener.address if self.listener is not None else "",
        )
        registered = await self.discovery.register(record)
        self.heartbeat.start()  # until close, not withdraw: a draining instance's streams go on
        return registered

    async def withdraw(self) -> None:
        """Leave discovery: peers stop routing new work here."""
        await self.discovery.withdraw()

    def inflight(self) -> int:
        return sum(len(s.inflight) for s in self.servers.values())

    async def drain(self, timeout: float) -> int:
        """Stop accepting, wait for in-flight requests up to ``timeout``; return how many were cut."""
        results = await asyncio.gather(*(s.drain(timeout) for s in self.servers.values()))
        return sum(results)

    async def _on_leader_elected(self, msg: Msg) -> None:
        if self.watchers:
            log.info("the discovery bucket has a new leader; recreating discovery watchers")
            for w in list(self.watchers.values()):
                await w.restart()

    # ---- calling --------------------------------------------------------------------------------

    def watcher(self, prefix: str | None = None) -> InstanceWatcher:
        """The shared live view of instances under ``prefix`` (default: this namespace)."""
        prefix = prefix or f"{self.namespace}."
        if prefix not in self.watchers:
            w = InstanceWatcher(self.discovery, prefix)
            w.add_listener(self._on_discovery_change)
            w.start()
            if not self.watchers:
                self.liveness.start()
            self.watchers[prefix] = w
        return self.watchers[prefix]

    def _mark_unreachable(self, instance_id: str) -> None:
        if instance_id not in self.unreachable:
            log.warning(
                "instance %s is out of routing until discovery hears from it again (nobody answered there)", instance_id
            )
            self.unreachable.add(instance_id)

    def _on_silent(self, instance_id: str) -> None:
        self.unreachable.add(instance_id)
        self.streams.instance_gone(instance_id)

    def _on_discovery_change(self, key: str, record: InstanceRecord | None, expired: bool) -> None:
        instance_id = record.instance_id if record is not None else key.rpartition(".")[2]
        if instance_id in self.unreachable:
            self.unreachable.discard(instance_id)
            if record is not None:
                log.info("instance %s is back in routing (discovery heard from it)", instance_id)
        if record is not None:
            self.liveness.track(instance_id, record.lease_ttl)
        # Only forget it, and fail its streams, once the instance has no endpoint left anywhere.
        elif not any(r.instance_id == instance_id for w in self.watchers.values() for r in w.records.values()):
            self.liveness.forget(instance_id)
            if expired:
                self.streams.instance_gone(instance_id)

    def client(self, component: str, endpoint: str) -> Client:
        return Client(self, component, endpoint)

    def _address_of(self, component: str, endpoint: str, instance_id: str) -> str:
        """The TCP address an instance published for an endpoint ("": none, or not discovered)."""
        watcher = self.watchers.get(f"{self.namespace}.")
        record = watcher.records.get(self.subject(component, endpoint, instance_id)) if watcher else None
        return record.address if record is not None else ""

    def new_request_id(self) -> str:
        return f"{self.instance_id}-{next(self._request_ids)}"

    # ---- event plane -----------------------------------------------------------------------------

    def event_subject(self, topic: str) -> str:
        return f"{self.namespace}.events.{topic}"

    async def publish_event(self, topic: str, payload: Any) -> None:
        """Publish an event (at most once) to every subscriber of ``topic`` in this namespace."""
        await self.nc.publish(self.event_subject(topic), wire.encode(payload))

    async def subscribe_events(self, topic: str, callback: Callable[[Any], Awaitable[None]]) -> Any:
        """Call ``callback(payload)`` for every event on ``topic``; returns the subscription."""

        async def on_msg(msg: Msg) -> None:
            try:
                payload = wire.decode_json(msg.data)
            except wire.DecodeError:
                log.warning("ignoring a malformed event on %s", msg.subject)
                return
            await callback(payload)

        return await self.nc.subscribe(self.event_subject(topic), cb=on_msg)

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def _on_reconnect(self) -> None:
        log.info("reconnected to NATS; refreshing discovery records and watchers")
        try:
            await self.discovery.refresh()
        except Exception as exc:  # the keep-alive loop retries shortly
            log.warning("could not refresh discovery after reconnect: %s", exc)
        for w in self.watchers.values():
            await w.restart()

    async def close(self) -> None:
        self._closing = True
        self.streams.stop()
        for server in self.servers.values():
            await server.close()
        if self.listener is not None:
            await self.listener.close()
        await self.caller.close()
        for w in self.watchers.values():
            await w.stop()
        await self.liveness.stop()
        await self.heartbeat.stop()
        await self.discovery.close()
        if self.nc.is_closed:
            return

        async def close_undrained() -> None:
            try:
                await self.nc.close()
            except RuntimeError as exc:
                # nats-py writes what it buffered during the outage into the dead socket on close
                # (uvloop: "the handler is closed"); those messages were for a server that is gone.
                log.debug("closing the NATS connection: %s", exc)

        # With the server unreachable there is nothing to drain to: stop reconnecting and close,
        # so a role stopped during an outage still exits 0 (its lease expires on the server).
        if self.nc.is_reconnecting or self.nc.is_connecting:
            log.warning("NATS is unreachable; closing the connection without draining it")
            await close_undrained()
            return
        try:
            await self.nc.drain()
        except nats.errors.Error as exc:  # the connection dropped while it drained
            log.warning("could not drain the NATS connection (%s); closing it", exc or type(exc).__name__)
            await close_undrained()


class Client:
    """Calls one endpoint (``component.endpoint``) on instances found through discovery."""

    def __init__(self, runtime: Runtime, component: str, endpoint: str) -> None:
        self.runtime = runtime
        self.component = component
        self.endpoint = endpoint
        self.watcher = runtime.watcher()
        self._rr = itertools.count()

    def instances(self, where: Callable[[InstanceRecord], bool] | None = None) -> list[InstanceRecord]:
        found = self.watcher.matching(self.component, self.endpoint)
        unreachable = self.runtime.unreachable
        found = [r for r in found if r.instance_id not in unreachable and (where is None or where(r))]
        return sorted(found, key=lambda r: r.instance_id)

    async def wait_for_instances(self, timeout: float, count: int = 1) -> list[InstanceRecord]:
        await self.watcher.wait_for(lambda: len(self.instances()) >= count, timeout)
        return self.instances()

    def pick(
        self, policy: str = "round_robin", where: Callable[[InstanceRecord], bool] | None = None
    ) -> InstanceRecord:
        candidates = self.instances(where)
        if not candidates:
            raise RequestError("unavailable", f"no instance serves {self.component}.{self.endpoint}", retryable=True)
        if policy == "random":
            return random.choice(candidates)
        return candidates[next(self._rr) % len(candidates)]

    def direct_batches(
        self, payload: Any, instance_id: str, request_id: str | None = None
    ) -> AsyncGenerator[list[Any], None]:
        """Stream the responses of one request sent to ``instance_id``, as lists of the items
        that arrived together (a reader that merges them saves work per item)."""
        rt = self.runtime
        return rt.caller.stream(self.component, self.endpoint, instance_id, request_id or rt.new_request_id(), payload)

    async def direct(self, payload: Any, instance_id: str, request_id: str | None = None) -> AsyncGenerator[Any, None]:
        """Stream the responses of one request sent to ``instance_id``, item by item."""
        async with aclosing(self.direct_batches(payload, instance_id, request_id)) as stream:
            async for items in stream:
                for item in items:
                    yield item

    async def generate(
        self, payload: Any, policy: str = "round_robin", where: Callable[[InstanceRecord], bool] | None = None
    ) -> AsyncGenerator[Any, None]:
        """Pick an instance by ``policy`` and stream its responses."""
        record = self.pick(policy, where)
        async with aclosing(self.direct(payload, record.instance_id)) as stream:
            async for item in stream:
                yield item
