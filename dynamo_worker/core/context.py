"""The per-process state handed to every hook."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import TYPE_CHECKING, Any

import attrs

from dynamo_worker.core.status_server import HealthState

if TYPE_CHECKING:
    from dynamo_worker.core.roles import RoleInfo
    from dynamo_worker.core.runtime import Runtime


@attrs.define
class WorkerContext:
    """What a role's hooks can see: its options, the runtime, its engine, its logger.

    ``options`` holds every parsed flag (core and role). ``runtime`` is connected from
    ``dynamo_worker_create_engine`` on. ``engine`` is what ``dynamo_worker_create_engine``
    returned. ``component`` is where the role's endpoints are addressed
    (``namespace.component.endpoint``): the core sets it from the role's ``component`` attribute
    (its ``name`` when it has none) right after ``dynamo_worker_configure``. ``resolved_config``
    is what the role decided at configure (defaults it applied, derived settings) for
    ``--dump-config-to``. ``health`` is what ``/health`` reports; a role that stops serving on
    purpose (an engine put to sleep) says why in ``health.paused[name]`` and removes it when it
    serves again.
    """

    role: RoleInfo
    options: argparse.Namespace
    runtime: Runtime
    log: logging.Logger
    engine: Any = None
    shutdown_requested: asyncio.Event = attrs.field(factory=asyncio.Event)
    component: str = ""
    resolved_config: dict[str, Any] = attrs.field(factory=dict)
    health: HealthState = attrs.field(factory=HealthState)

    @property
    def namespace(self) -> str:
        return str(self.options.namespace)

    @property
    def instance_id(self) -> str:
        return self.runtime.instance_id
