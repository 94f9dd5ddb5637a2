"""The per-process system status server: ``/live``, ``/health``, ``/metrics`` and role routes.

Off unless ``--system-port`` is given; binds 127.0.0.1 unless ``--system-host`` says otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dynamo_worker.core.registrar import Route

log = logging.getLogger(__name__)


@attrs.define
class HealthState:
    """Why this process is or is not healthy; ``/health`` reports it as JSON."""

    phase: str = "starting"  # starting -> serving -> shutting_down | failed
    endpoints: list[str] = attrs.field(factory=list)
    canary_ok: bool | None = None  # None: no canary has run (or the role has none)
    canary_error: str | None = None
    # Why a role deliberately serves nothing for now, by who says so (decode: "engine" while its
    # engine sleeps). Unhealthy while any is set; the health canary waits meanwhile.
    paused: dict[str, str] = attrs.field(factory=dict)

    @property
    def healthy(self) -> bool:
        return self.phase == "serving" and self.canary_ok is not False and not self.paused

    def as_dict(self) -> dict[str, Any]:
        reasons: list[str] = []
        if self.phase != "serving":
            reasons.append(f"worker is {self.phase.replace('_', ' ')}")
        if self.canary_ok is False:
            reasons.append(f"health canary failed: {self.canary_error}")
        reasons.extend(self.paused.values())
        return {
            "status": "healthy" if self.healthy else "unhealthy",
            "phase": self.phase,
            "endpoints": self.endpoints,
            "canary": {"ok": self.canary_ok, "error": self.canary_error},
            "reasons": reasons,
        }


class StatusServer:
    """An aiohttp application on the system port."""

    def __init__(self, health: HealthState, registry: CollectorRegistry) -> None:
        self.health = health
        self.registry = registry
        self.app = web.Application()
        self.app.router.add_get("/live", self._live)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        # The server starts before roles register their routes, and aiohttp freezes its router
        # at start: role routes are looked up here instead, behind one catch-all route.
        self._role_routes: dict[tuple[str, str], Any] = {}
        self.app.router.add_route("*", "/{path:.*}", self._role_route)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def add_routes(self, routes: list[Route]) -> None:
        for r in routes:
            self._role_routes[(r.method.upper(), r.path)] = r.handler

    async def _role_route(self, request: web.Request) -> web.StreamResponse:
        handler = self._role_routes.get((request.method, request.path))
        if handler is None:
            if any(path == request.path for _, path in self._role_routes):
                raise web.HTTPMethodNotAllowed(request.method, sorted(
                    m for m, path in self._role_routes if path == request.path))
            raise web.HTTPNotFound()
        return await handler(request)

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # port 0 picks a free one
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("system status server on http://%s:%s (/live /health /metrics)", host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _live(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(self.health.as_dict(), status=200 if self.health.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
