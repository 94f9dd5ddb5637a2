"""Heartbeats over core NATS: a caller finds a silent instance without waiting for JetStream.

Discovery leases are kept and expired by JetStream. While the discovery bucket's stream elects a
leader (4-9 s in nats-server's Raft, after its leader's host was cut off) no lease expires, so an
instance cut off with that host stayed in routing and its open streams waited (CI: out of routing
7.43 s after the cut, with a 2 s lease). Core NATS needs no quorum: every discoverable process
publishes an empty message on ``_DWALIVE.{namespace}.{instance}`` every third of its lease, and a
caller that hears nothing from an instance in its view for that instance's lease takes it out of
routing and fails its open streams that receive no frames either (:meth:`StreamRouter.instance_gone`).
It is back in routing at its next heartbeat.

Only instances in the caller's discovery view with a lease (records of older writers say 0) are
judged, and none while this process's own NATS connection is down or just back (a lease of grace).
Silence is measured up to what this process has read, not up to its clock: each sweep publishes a
probe on the same subscription's subjects, and an instance is judged against the send time of the
newest probe read back. A process whose event loop or subscription lags (a starved machine, a
frontend stalled 1.6 s) has every beat the server held before that probe read already, so lag
alone never makes an instance silent.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS

from dynamo_worker.core.discovery import cancel_and_wait

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "_DWALIVE"
SWEEP_INTERVAL = 0.1


def heartbeat_subject(namespace: str, instance_id: str) -> str:
    return f"{SUBJECT_PREFIX}.{namespace}.{instance_id}"


class Heartbeat:
    """Publishes this instance's heartbeat every third of its lease until stopped."""

    def __init__(self, nc: NATS, namespace: str, instance_id: str, lease_ttl: float) -> None:
        self.nc = nc
        self.subject = heartbeat_subject(namespace, instance_id)
        self.interval = max(lease_ttl / 3, 0.2)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._beat(), name="liveness-heartbeat")

    async def _beat(self) -> None:
        while True:
            if self.nc.is_connected:  # while reconnecting nats-py would buffer beats that say nothing later
                await self.nc.publish(self.subject, b"")
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None


class LivenessWatch:
    """Hears the heartbeats of the instances in a namespace; calls ``on_silent(instance_id)`` when
    a tracked one has been silent for its lease and ``on_heard(instance_id)`` when it beats again."""

    def __init__(
        self,
        nc: NATS,
        namespace: str,
        on_silent: Callable[[str], None],
        on_heard: Callable[[str], None],
    ) -> None:
        self.nc = nc
        self.namespace = namespace
        self.on_silent = on_silent
        self.on_heard = on_heard
        self.leases: dict[str, float] = {}  # tracked instance -> its lease (s)
        self.last_heard: dict[str, float] = {}
        self.silent: set[str] = set()
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        self._judging_from = 0.0  # no verdicts before this (monotonic): this process's own connection
        self._probe_subject = heartbeat_subject(namespace, f"_probe{uuid.uuid4().hex}")
        self._read_up_to = 0.0  # send time (monotonic) of the newest probe read back

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="liveness-sweep")

    def track(self, instance_id: str, lease_ttl: float) -> None:
        """``instance_id`` is in the view (discovery just heard from it: that counts as a beat)."""
        if lease_ttl <= 0:
            return
        self.leases[instance_id] = lease_ttl
        self._heard(instance_id)

    def forget(self, instance_id: str) -> None:
        """``instance_id`` left the view."""
        self.leases.pop(instance_id, None)
        self.last_heard.pop(instance_id, None)
        self.silent.discard(instance_id)

    async def _on_beat(self, msg: Any) -> None:
        if msg.subject == self._probe_subject:
            self._read_up_to = max(self._read_up_to, float(msg.data))
            return
        instance_id = msg.subject.rpartition(".")[2]
        if instance_id in self.leases:
            self._heard(instance_id)

    def _heard(self, instance_id: str) -> None:
        self.last_heard[instance_id] = time.monotonic()
        if instance_id in self.silent:
            self.silent.discard(instance_id)
            log.info("instance %s is heard again; back in routing", instance_id)
            self.on_heard(instance_id)

    async def _sweep(self) -> None:
        self._sub = await self.nc.subscribe(f"{SUBJECT_PREFIX}.{self.namespace}.*", cb=self._on_beat)
        was_connected = True
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            now = time.monotonic()
            connected = self.nc.is_connected
            if connected:
                await self.nc.publish(self._probe_subject, repr(now).encode())
            if connected and not was_connected:  # beats were lost on our side: a lease of grace
                self._judging_from = now + max(self.leases.values(), default=0.0)
            was_connected = connected
            if not connected or now < self._judging_from:
                continue
            for instance_id, lease in self.leases.items():
                quiet = self._read_up_to - self.last_heard[instance_id]
                if quiet > lease and instance_id not in self.silent:
                    self.silent.add(instance_id)
                    log.warning(
                        "instance %s: no heartbeat for %.1f s (its lease is %g s): its host is cut off or the "
                        "process stalled; out of routing, and its open streams that receive nothing fail",
                        instance_id,
                        quiet,
                        lease,
                    )
                    self.on_silent(instance_id)

    async def stop(self) -> None:
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
            self._sweeper = None
        if self._sub is not None and not self.nc.is_closed:
            await self._sub.unsubscribe()
        self._sub = None
