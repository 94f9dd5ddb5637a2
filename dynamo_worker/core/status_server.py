"""The per-process system status server: ``/live``, ``/health``, ``/metrics`` and role routes.

Off unless ``--system-port`` is given; binds 127.0.0.1 unless ``--system-host`` says otherwise.

``/live``, ``/health``, ``/metrics`` and a role's GET routes are open: probes and scrapers carry
no credentials. A role route with any other method (decode's ``POST /engine/sleep``,
``/engine/wake_up``) changes the worker, so it is an *admin route*, guarded in this order:

1. beyond loopback with no ``--system-admin-token`` (env ``DYN_SYSTEM_ADMIN_TOKEN``): 403,
   whatever the request (the server still starts: binding 0.0.0.0 for Prometheus alone is
   legitimate; the start-up log says so once);
2. with a token, on any bind: ``Authorization: Bearer TOKEN`` or 401 (constant-time compare);
3. no cross-site browser request (CSRF): an ``Origin`` other than the server's own
   scheme://host:port, ``Origin: null``, or ``Sec-Fetch-Site`` ``cross-site``/``same-site``: 403.
   Applied with a token too, though there a web page cannot send the token anyway (a
   cross-origin ``Authorization`` header needs a CORS preflight this server never grants);
4. on loopback with no token, the ``Host`` must be a loopback name or address (403 otherwise):
   a DNS-rebinding page (evil.example re-resolved to 127.0.0.1) is same-origin to the browser,
   so steps 3 and 5 alone would let it through;
5. a form or text body (``application/x-www-form-urlencoded``, ``multipart/form-data``,
   ``text/plain``: what an HTML form or a preflight-free ``fetch`` can send) without an
   ``Authorization`` header: 415; send ``Content-Type: application/json`` (or no body). This
   catches a browser that sends no ``Origin``.

Errors are JSON: ``{"status": "error", "message": "..."}``.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any
from urllib.parse import urlsplit

import attrs
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dynamo_worker.core.registrar import Route
from dynamo_worker.core.request_plane_auth import is_loopback

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


#: Content types a page can POST cross-origin without a CORS preflight (the CORS "safelisted" ones).
FORM_CONTENT_TYPES = frozenset({"application/x-www-form-urlencoded", "multipart/form-data", "text/plain"})
TOKEN_ENV = "DYN_SYSTEM_ADMIN_TOKEN"


class StatusServer:
    """An aiohttp application on the system port.

    ``admin_token``: what admin routes require as ``Authorization: Bearer`` (None: none set).
    """

    def __init__(self, health: HealthState, registry: CollectorRegistry, *, admin_token: str | None = None) -> None:
        self.health = health
        self.registry = registry
        self.admin_token = admin_token
        self.host = "127.0.0.1"
        self.app = web.Application()
        self.app.router.add_get("/live", self._live)
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/metrics", self._metrics)
        # The server starts before roles register their routes, and aiohttp freezes its router
        # at start: role routes are looked up here instead, behind one catch-all route.
        self._role_routes: dict[tuple[str, str], Route] = {}
        self.app.router.add_route("*", "/{path:.*}", self._role_route)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    def add_routes(self, routes: list[Route]) -> None:
        for r in routes:
            self._role_routes[(r.method.upper(), r.path)] = r

    async def _role_route(self, request: web.Request) -> web.StreamResponse:
        route = self._role_routes.get((request.method, request.path))
        if route is None:
            if any(path == request.path for _, path in self._role_routes):
                raise web.HTTPMethodNotAllowed(
                    request.method, sorted(m for m, path in self._role_routes if path == request.path)
                )
            raise web.HTTPNotFound()
        if route.admin:
            refused = self._admin_refusal(request)
            if refused is not None:
                status, message = refused
                log.info(
                    "refused %s %s from %s (%d): %s", request.method, request.path, request.remote, status, message
                )
                headers = {"WWW-Authenticate": 'Bearer realm="dynamo-worker admin"'} if status == 401 else None
                return web.json_response({"status": "error", "message": message}, status=status, headers=headers)
        return await route.handler(request)

    @property
    def _loopback(self) -> bool:
        return is_loopback(self.host)

    def _admin_refusal(self, request: web.Request) -> tuple[int, str] | None:
        """Why this request may not use an admin route, as (HTTP status, message), or None."""
        what = f"{request.method} {request.path}"
        if self.admin_token is None and not self._loopback:
            return 403, (
                f"{what} changes this worker, and the status server binds {self.host} (beyond "
                f"loopback) with no admin token: set {TOKEN_ENV} (or --system-admin-token) on the "
                "worker and send Authorization: Bearer TOKEN"
            )
        if self.admin_token is not None and not _bearer_matches(request, self.admin_token):
            return 401, f"{what} needs Authorization: Bearer TOKEN, the worker's {TOKEN_ENV}"
        cross_site = _cross_site(request)
        if cross_site is not None:
            return 403, f"{cross_site}: admin routes refuse cross-site browser requests"
        if self.admin_token is None and not is_loopback(_hostname(request.host) or ""):
            # Only a DNS-rebinding page reaches a loopback-bound server under another name.
            return 403, f"Host {request.host!r} is not a loopback name, and this server binds {self.host}"
        content_type = request.headers.get("Content-Type")
        mime = (content_type or "").split(";", 1)[0].strip().lower()
        if mime in FORM_CONTENT_TYPES and "Authorization" not in request.headers:
            return 415, (
                f"{what} refuses Content-Type {mime} (a web page can post that from anywhere): "
                "send Content-Type: application/json"
            )
        return None

    async def start(self, host: str, port: int) -> None:
        self.host = host
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # port 0 picks a free one
        self.port = sockets[0].getsockname()[1] if sockets else port
        log.info("system status server on http://%s:%s (/live /health /metrics)", host, self.port)
        if self.admin_token is None and not self._loopback:
            log.warning(
                "the system status server binds %s with no admin token: routes that change the worker "
                "(POST /engine/sleep, ...) answer 403; set %s to use them",
                host,
                TOKEN_ENV,
            )

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


def _bearer_matches(request: web.Request, token: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Bytes: compare_digest refuses non-ASCII str, and a header may carry anything.
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode())


def _hostname(netloc: str) -> str | None:
    try:
        return urlsplit(f"http://{netloc}").hostname
    except ValueError:
        return None


def _origin(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of ``scheme://netloc``, the default port filled in; None if malformed."""
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return scheme.lower(), parts.hostname.lower(), port or (443 if scheme.lower() == "https" else 80)


def _cross_site(request: web.Request) -> str | None:
    """What shows ``request`` came from a browser page of another origin, or None.

    Browsers send ``Sec-Fetch-Site`` and, on every cross-origin POST, ``Origin``; other clients
    (curl, Python, an orchestrator) send neither and pass.
    """
    fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
    if fetch_site in ("cross-site", "same-site"):  # same-site: another port or subdomain
        return f"Sec-Fetch-Site: {fetch_site}"
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    scheme, sep, netloc = origin.strip().partition("://")
    own = _origin(request.scheme, request.host)
    if not sep or own is None or _origin(scheme, netloc) != own:
        return f"Origin {origin!r} is not this server's ({request.scheme}://{request.host})"
    return None
