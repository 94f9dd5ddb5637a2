"""Everything a role author or a caller needs, in one import.

A role (docs/writing-a-role.md)::

    from dynamo_worker.plugin import Registrar, RequestContext, RequestError, WorkerContext, hookimpl

A caller of an endpoint::

    from dynamo_worker.plugin import Runtime, RequestError

The messages of a ``generate`` endpoint that the frontend routes to (``token_ids`` in, token
chunks and usage out): :class:`GenerateRequest`, :class:`GenerateChunk`, :class:`Usage`.

What is exported here is the public interface: it only grows, as the hooks do. Modules under
``dynamo_worker.core`` are internals and may change between releases; a test fails if a
built-in role, the example plugin or the docs import from there something this module exports.
"""

from __future__ import annotations

from dynamo_worker.core.context import WorkerContext
from dynamo_worker.core.discovery import InstanceRecord
from dynamo_worker.core.errors import EngineDead, UsageError
from dynamo_worker.core.generate import GenerateChunk, GenerateRequest, Usage
from dynamo_worker.core.health import HealthCheck
from dynamo_worker.core.hookspecs import hookimpl
from dynamo_worker.core.options import env_default
from dynamo_worker.core.registrar import (
    BackgroundTask,
    EndpointHandler,
    Registrar,
    RouteHandler,
)
from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.core.runtime import Client, Runtime

#: The name vLLM (and Dynamo) give the same condition; raise either, they are one class.
EngineDeadError = EngineDead

__all__ = [
    "BackgroundTask",
    "Client",
    "EndpointHandler",
    "EngineDead",
    "EngineDeadError",
    "GenerateChunk",
    "GenerateRequest",
    "HealthCheck",
    "InstanceRecord",
    "Registrar",
    "RequestContext",
    "RequestError",
    "RouteHandler",
    "Runtime",
    "Usage",
    "UsageError",
    "WorkerContext",
    "env_default",
    "hookimpl",
]
