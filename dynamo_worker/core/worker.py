"""The life of one role process, start-up to exit, in the order docs/architecture.md gives.

Start-up: configure (validate, apply defaults) -> dump config -> connect the runtime -> install
signal handlers -> status server -> create engine -> register metrics -> register endpoints ->
health payload -> serve and publish in discovery -> background tasks and engine monitor.

Shutdown (SIGTERM/SIGINT): withdraw from discovery -> drain in-flight requests up to
``--graceful-shutdown-timeout`` -> stop background tasks -> role shutdown hook -> close the
runtime -> exit 0. A second signal exits at once. A dead engine does the same with no drain
and exits 1. The steps after the drain have ``--shutdown-cleanup-timeout`` seconds: a step that hangs
(a stuck engine shutdown, a peer that never lets go) gets every thread's stack logged and the
process exits 1, rather than waiting for an orchestrator's SIGKILL.
"""

from __future__ import annotations

import asyncio
import faulthandler
import gc
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from prometheus_client import REGISTRY

from dynamo_worker.core import nats_auth, request_plane_auth
from dynamo_worker.core.context import WorkerContext
from dynamo_worker.core.errors import EngineDead, UsageError
from dynamo_worker.core.files import write_private_file
from dynamo_worker.core.health import HealthCanary, HealthCheck
from dynamo_worker.core.metrics import WorkerMetrics, exposition_registry
from dynamo_worker.core.plugins import HookRelay
from dynamo_worker.core.registrar import Registrar
from dynamo_worker.core.roles import RoleInfo
from dynamo_worker.core.runtime import Runtime
from dynamo_worker.core.status_server import HealthState, StatusServer
from dynamo_worker.core.tcp_plane import ListenerLimits

EXIT_OK = 0
EXIT_FATAL = 1


def health_payload_override() -> dict[str, Any] | None:
    """``DYN_HEALTH_CHECK_PAYLOAD``: a JSON object, or ``@path`` to a file holding one."""
    raw = os.environ.get("DYN_HEALTH_CHECK_PAYLOAD")
    if not raw:
        return None
    source = "DYN_HEALTH_CHECK_PAYLOAD"
    if raw.startswith("@"):
        source = raw[1:]
        try:
            raw = Path(source).read_text(encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"DYN_HEALTH_CHECK_PAYLOAD file {source!r} cannot be read: {exc.strerror}") from exc
    try:
        payload = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{source} is not valid JSON ({exc}); give a JSON object or @path") from exc
    if not isinstance(payload, dict):
        raise UsageError(f"{source} must be a JSON object, got {type(payload).__name__}")
    return payload


class Worker:
    """Runs one role in this process. ``await Worker(...).run()`` returns the exit status."""

    def __init__(self, info: RoleInfo, hooks: HookRelay, options: Any) -> None:
        self.info = info
        self.hooks = hooks
        self.options = options
        self.log = logging.getLogger(f"dynamo_worker.role.{info.name}")
        self.health = HealthState()
        self.status: StatusServer | None = None
        self.ctx: WorkerContext | None = None
        self._fatal: asyncio.Future[BaseException] | None = None
        self._signals = 0
        self._tasks: list[asyncio.Task[Any]] = []

    # ---- start-up -----------------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._fatal = loop.create_future()
        ctx = self.ctx = WorkerContext(
            role=self.info, options=self.options, runtime=None, log=self.log, health=self.health
        )  # type: ignore[arg-type]
        await self.hooks.configure(ctx)
        override = health_payload_override()  # bad JSON fails before any work
        # Read after configure: a role may choose its component from its options there.
        component = ctx.component = getattr(self.hooks.role, "component", None) or self.info.name
        self._dump_config(ctx)
        registry = exposition_registry()
        observer = WorkerMetrics(self.options.namespace, component)

        ctx.runtime = await Runtime.connect(
            self.options.nats_url,
            self.options.namespace,
            timeout=self.options.nats_connect_timeout,
            lease_ttl=self.options.lease_ttl,
            name=f"dynamo-worker/{self.info.name}",
            request_plane=self.options.request_plane,
            tcp_host=self.options.tcp_rpc_host,
            tcp_port=self.options.tcp_rpc_port,
            tcp_advertise_host=self.options.tcp_rpc_advertise_host,
            discovery_replicas=self.options.discovery_replicas,
            randomize_servers=self.options.nats_randomize,
            request_plane_secret=request_plane_auth.secret_from(self.options),
            tcp_limits=ListenerLimits(
                self.options.tcp_max_connections, self.options.tcp_read_timeout, self.options.tcp_idle_timeout
            ),
            **nats_auth.connect_options(self.options),
        )
        ctx.runtime.on_engine_dead = self._engine_dead
        self._install_signal_handlers(loop)
        try:
            if self.options.system_port is not None:
                self.status = StatusServer(self.health, registry, admin_token=self.options.system_admin_token)
                await self.status.start(self.options.system_host, self.options.system_port)
            return await self._serve(ctx, registry, component, observer, override)
        except BaseException:
            # A start-up failure (bad engine argument, model not found): release what exists.
            await self._shutdown(ctx, EXIT_FATAL, 0.0)
            raise
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def _serve(
        self,
        ctx: WorkerContext,
        registry: Any,
        component: str,
        observer: WorkerMetrics,
        override: dict[str, Any] | None,
    ) -> int:
        assert self._fatal is not None
        try:
            ctx.engine = await self._until_fatal(self.hooks.create_engine(ctx))
            await self.hooks.register_metrics(REGISTRY, ctx)
            registrar = Registrar(role=self.info.name, component=component)
            await self.hooks.register_endpoints(registrar, ctx)
            check = await self.hooks.health_payload(ctx)
            if override is not None:  # the operator's payload, to the endpoint the role probes
                check = HealthCheck(override) if check is None else HealthCheck(override, check.endpoint)
            if self.status is not None:
                self.status.add_routes(registrar.routes)
            for name, handler in registrar.endpoints.items():
                await ctx.runtime.serve_endpoint(component, name, handler, observer)
            # Start-up objects (the engine, torch, tokenizers: millions) never die: move them out
            # of the collector's sight, as vllm serve does, so a full collection while serving
            # does not walk them all.
            gc.collect()
            gc.freeze()
            for name in registrar.endpoints:
                await ctx.runtime.publish(component, name, self.info.name, registrar.endpoint_data[name])
            for name, task in registrar.tasks.items():
                self._tasks.append(asyncio.create_task(self._background(name, task), name=name))
            self._tasks.append(asyncio.create_task(self._engine_monitor(ctx), name="engine-monitor"))
            if self._canary_checks(check, registrar) and check is not None:
                canary = HealthCanary(
                    ctx.runtime,
                    component,
                    check.endpoint,
                    check.payload,
                    self.health,
                    idle=self.options.health_check_idle,
                    timeout=self.options.health_check_timeout,
                )
                self._tasks.append(asyncio.create_task(canary.run(), name="health-canary"))
            self.health.endpoints = sorted(registrar.endpoints)
            self.health.phase = "serving"
            listener = ctx.runtime.listener
            self.log.info(
                "role %s serving %s as instance %s in namespace %s%s",
                self.info.name,
                ", ".join(f"{component}.{e}" for e in registrar.endpoints) or "no endpoints",
                ctx.instance_id,
                self.options.namespace,
                f" (TCP request plane at {listener.address})" if listener is not None else "",
            )
            await self._until_fatal(ctx.shutdown_requested.wait())
            return await self._shutdown(ctx, EXIT_OK, self.options.graceful_shutdown_timeout)
        except _Fatal as fatal:
            self.log.error("fatal: %s; shutting down", fatal.cause)
            self.health.phase = "failed"
            return await self._shutdown(ctx, EXIT_FATAL, 0.0)

    def _canary_checks(self, check: HealthCheck | None, registrar: Registrar) -> bool:
        """Whether a canary will probe the endpoints; if not (and there are some), say so once."""
        if not registrar.endpoints or not self.options.health_check:
            return False  # nothing to probe, or the operator turned canaries off
        if check is None:
            reason = "the role returns no health payload (dynamo_worker_health_payload)"
        elif check.endpoint not in registrar.endpoints:
            reason = (
                f"its health payload goes to endpoint {check.endpoint!r}, which it does not serve "
                f"(it serves {', '.join(sorted(registrar.endpoints))})"
            )
        else:
            return True
        self.log.warning(
            "no health canary for role %s: %s; /health reports only liveness. Return "
            "HealthCheck(payload, endpoint=...) from dynamo_worker_health_payload, or set "
            "DYN_HEALTH_CHECK_PAYLOAD",
            self.info.name,
            reason,
        )
        return False

    async def _until_fatal(self, aw: Any) -> Any:
        """Await ``aw`` unless a fatal error (dead engine, dead listener) comes first."""
        assert self._fatal is not None
        task = asyncio.ensure_future(aw)
        done, _ = await asyncio.wait({task, self._fatal}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise _Fatal(self._fatal.result())

    def _raise_fatal(self, exc: BaseException) -> None:
        if self._fatal is not None and not self._fatal.done():
            self._fatal.set_result(exc)

    def _engine_dead(self, exc: EngineDead) -> None:
        self._raise_fatal(exc)

    async def _background(self, name: str, task: Any) -> None:
        try:
            await task()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a role's listener died: the process must not stay half-alive
            self.log.exception("background task %s failed", name)
            self._raise_fatal(RuntimeError(f"background task {name} failed: {exc}"))
            return
        assert self.ctx is not None
        if not self.ctx.shutdown_requested.is_set():
            self._raise_fatal(RuntimeError(f"background task {name} stopped unexpectedly"))

    async def _engine_monitor(self, ctx: WorkerContext) -> None:
        interval = self.options.engine_check_interval
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self.hooks.check_engine(ctx), timeout=max(interval * 5, 10))
            except EngineDead as exc:
                self._raise_fatal(exc)
                return
            except asyncio.TimeoutError:
                self.log.warning("engine health check took longer than %.0fs", max(interval * 5, 10))

    def _dump_config(self, ctx: WorkerContext) -> None:
        path = self.options.dump_config_to
        if not path:
            return
        dump = {
            "role": self.info.as_dict(),
            "options": {k: v for k, v in vars(self.options).items() if _jsonable(v)},
            "resolved": ctx.resolved_config,
        }
        # Secrets go at every depth (vLLM's hf_token, a connector's extra config); the file is
        # 0600 and written atomically, so no reader ever sees it half-written or world-readable.
        text = json.dumps(nats_auth.without_secrets(dump), indent=2, sort_keys=True, default=str) + "\n"
        try:
            write_private_file(Path(path), text)
        except OSError as exc:
            raise UsageError(f"--dump-config-to {path}: {exc.strerror}") from exc
        self.log.info("wrote the resolved configuration to %s", path)

    # ---- signals and shutdown ----------------------------------------------------------------

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals > 1:
            self.log.warning("second %s: exiting at once", signal.Signals(sig).name)
            os._exit(128 + int(sig))
        self.log.info("%s received: draining (send again to exit at once)", signal.Signals(sig).name)
        assert self.ctx is not None
        self.ctx.shutdown_requested.set()

    async def _shutdown(self, ctx: WorkerContext, status: int, drain_timeout: float) -> int:
        self.health.phase = "shutting_down" if status == EXIT_OK else "failed"
        ctx.shutdown_requested.set()
        runtime = ctx.runtime
        try:
            await runtime.withdraw()
        except Exception as exc:  # NATS down: the lease expires on its own within --lease-ttl
            self.log.warning("could not withdraw from discovery (%s); the lease will expire", exc)
        cut = await runtime.drain(drain_timeout)
        if cut:
            self.log.warning("%d request(s) did not finish in time and were cancelled", cut)
        # Each step is logged so that a shutdown that hangs shows where; the watchdog ends it.
        watchdog = _cleanup_watchdog(self.log, self.options.shutdown_cleanup_timeout)
        self.log.info("shutdown: requests drained; stopping background tasks")
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.log.info("shutdown: background tasks stopped; running the role's shutdown hooks")
        for exc in await self.hooks.shutdown(ctx):
            self.log.error("role shutdown hook failed: %s: %s", type(exc).__name__, exc)
            status = status or EXIT_FATAL
        self.log.info("shutdown: role stopped; closing the runtime")
        if self.status is not None:
            await self.status.stop()
        await runtime.close()
        watchdog.cancel()
        self.log.info("stopped (exit %d)", status)
        return status


def _cleanup_watchdog(log: logging.Logger, seconds: float) -> threading.Timer:
    """A thread that ends the process (exit 1) if shutdown is still going after ``seconds``.

    A thread, not an asyncio timeout: a step can block the event loop itself.
    """

    def fire() -> None:
        log.error("shutdown did not finish within %gs of the drain; exiting 1 (every thread's stack follows)", seconds)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(EXIT_FATAL)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


class _Fatal(Exception):
    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict, tuple))
