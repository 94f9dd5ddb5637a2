"""Every hook a role (or a core plugin) can implement, in one module.

Rules that keep third-party roles working across releases:

* Hooks are only ever given *new* arguments, never renamed ones. pluggy lets an implementation
  accept fewer arguments than the spec, so take only what you use.
* Every hook may return a plain value or an awaitable; the core awaits it
  (see :class:`dynamo_worker.core.plugins.HookRelay`).
* All hooks run in the role's own worker process, on its asyncio event loop, except
  ``dynamo_worker_add_arguments`` which runs before the loop exists.
* Registration order (written down in :data:`dynamo_worker.core.plugins.CORE_PLUGINS`): core
  plugins first, the selected role last. pluggy calls implementations last-in first-out, so the
  role's implementation runs before the core's for every hook.
* The core calls every hook by argument name. Hook wrappers (``hookwrapper=True`` or
  ``wrapper=True``) are refused when the role is loaded: hooks may return awaitables that the
  core awaits after pluggy returns, so a wrapper would only ever see un-awaited coroutines.
* If start-up fails after the runtime is connected (an engine that does not load, an endpoint
  that raises while registering), ``dynamo_worker_shutdown`` still runs, with whatever exists
  (``ctx.engine`` may be ``None``).

docs/hooks.md documents each hook with its exact signature; a test keeps the two in step.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from dynamo_worker.core.context import WorkerContext
    from dynamo_worker.core.health import HealthCheck
    from dynamo_worker.core.registrar import Registrar

PROJECT_NAME = "dynamo_worker"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def dynamo_worker_add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add this plugin's command-line options.

    Called once per process while the parser is built, before parsing, for the core plugins
    and the selected role only (``--role NAME --help`` shows both). Add options to an argument
    group named after the role. Must be synchronous and must not import heavy libraries
    (``--help`` stays fast): no ``vllm`` or ``torch`` here.

    Merge rule: all implementations run; return values are ignored.
    """


@hookspec
def dynamo_worker_configure(ctx: WorkerContext) -> None:
    """Validate the parsed options and apply defaults.

    Called after parsing, before logging, metrics or the runtime are set up; ``ctx.options``
    is the parsed :class:`argparse.Namespace`, ``ctx.runtime`` is not connected yet. Raise
    :class:`dynamo_worker.core.errors.UsageError` with a one-line message naming the flag and
    the fix for a bad combination: the CLI prints it and exits 2. A role whose component
    depends on its options sets ``self.component`` here (the core reads it afterwards into
    ``ctx.component``); what the role resolved goes into ``ctx.resolved_config``.

    Merge rule: all implementations run (role first, then core).
    """


@hookspec(firstresult=True)
def dynamo_worker_create_engine(ctx: WorkerContext) -> Any:
    """Create and return the role's engine (for example a vLLM ``AsyncLLM``).

    Called once, after the runtime is connected and signal handlers are installed. Import
    ``vllm``/``torch`` here, not at module top. The result is stored as ``ctx.engine``.
    Roles without an engine need not implement it (``ctx.engine`` stays ``None``).

    Merge rule: first non-None result wins.
    """


@hookspec
def dynamo_worker_register_metrics(registry: CollectorRegistry, ctx: WorkerContext) -> None:
    """Register Prometheus collectors served on this process's ``/metrics``.

    Called once, after the engine is created. Create the role's metrics in ``registry``; the
    system status server's ``/metrics`` serves them (with ``PROMETHEUS_MULTIPROC_DIR`` set,
    through ``MultiProcessCollector``, so values written by other processes appear too).

    Merge rule: all implementations run.
    """


@hookspec
def dynamo_worker_register_endpoints(registrar: Registrar, ctx: WorkerContext) -> None:
    """Declare what this role serves. **Required**: every role implements it.

    Called once, after the engine and metrics. Use ``registrar.endpoint(name, handler)`` for
    request-plane endpoints (``async def handler(request, context)`` yielding responses),
    ``registrar.route(method, path, handler)`` for HTTP routes on the system status server,
    and ``registrar.background(name, coro_fn)`` for long-running tasks (an HTTP listener, a
    watcher). The registrar is bound to the role: registering a name twice is an error.
    Nothing is reachable until every implementation has returned.

    Merge rule: all implementations run.
    """


@hookspec(firstresult=True)
def dynamo_worker_health_payload(ctx: WorkerContext) -> HealthCheck | dict[str, Any] | None:
    """Return the health canary: the request sent to one of this role's endpoints when idle.

    Return ``HealthCheck(payload, endpoint="name")`` to probe any endpoint; a bare dict goes to
    ``generate``. Called once after endpoints are registered. ``DYN_HEALTH_CHECK_PAYLOAD`` (JSON)
    overrides the payload, sent to the same endpoint. Return ``None`` for a role with no
    canary; a role that serves endpoints but gets no canary is warned about at start-up. The
    handler sees ``context.is_health_check`` true for a canary.

    Merge rule: first non-None result wins.
    """


@hookspec(firstresult=True)
def dynamo_worker_check_engine(ctx: WorkerContext) -> bool | None:
    """Check that the engine is alive; called by the engine monitor every interval.

    Raise :class:`dynamo_worker.core.errors.EngineDead` when the engine is gone for good: the
    worker withdraws from discovery, shuts down and exits 1. Return ``True`` when the check ran
    and the engine is alive; roles without an engine need not implement it.

    Merge rule: first non-None result wins.
    """


@hookspec
def dynamo_worker_shutdown(ctx: WorkerContext) -> None:
    """Release the role's resources (stop the engine, close clients).

    Called once at shutdown, after the worker is withdrawn from discovery and in-flight
    requests finished or hit ``--graceful-shutdown-timeout``, before the runtime closes.
    Also called after a fatal engine error. Must not raise for an engine that is already dead.

    Merge rule: all implementations run; an exception in one is logged and the others still run.
    """
