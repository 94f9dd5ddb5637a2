"""The object a role declares its endpoints, HTTP routes and background tasks through."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
from aiohttp import web

from dynamo_worker.core.errors import RoleError
from dynamo_worker.core.request_plane import RequestContext

EndpointHandler = Callable[[Any, RequestContext], AsyncIterator[Any]]
RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BackgroundTask = Callable[[], Awaitable[None]]


#: Methods that must not change a worker; a role route with any other method is an admin route.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@attrs.frozen
class Route:
    method: str
    path: str
    handler: RouteHandler

    @property
    def admin(self) -> bool:
        """It changes the worker (``POST /engine/sleep``): the status server guards it (a token
        beyond loopback, no cross-site browser requests)."""
        return self.method.upper() not in SAFE_METHODS


@attrs.define
class Registrar:
    """Collects what one role serves; bound to the role's name so duplicates name their owner.

    ``component`` is the component the role's endpoints are addressed under
    (``namespace.component.endpoint``): the role class's ``component`` attribute (which
    ``dynamo_worker_configure`` may change on the instance), else the role name.
    """

    role: str
    component: str
    endpoints: dict[str, EndpointHandler] = attrs.field(factory=dict)
    routes: list[Route] = attrs.field(factory=list)
    tasks: dict[str, BackgroundTask] = attrs.field(factory=dict)
    endpoint_data: dict[str, dict[str, Any]] = attrs.field(factory=dict)

    def endpoint(self, name: str, handler: EndpointHandler, **data: Any) -> None:
        """Serve ``handler`` as request-plane endpoint ``name``.

        ``handler(request, context)`` is an async generator yielding response messages.
        Keyword ``data`` (for example ``model="tiny"``) is published in this instance's
        discovery record so clients can filter on it.
        """
        if name in self.endpoints:
            raise RoleError(f"role {self.role!r} registered endpoint {name!r} twice")
        self.endpoints[name] = handler
        self.endpoint_data[name] = data

    def route(self, method: str, path: str, handler: RouteHandler) -> None:
        """Serve ``handler`` at ``method path`` on the system status server (``--system-port``).

        Any method but GET/HEAD/OPTIONS makes it an admin route: it needs
        ``--system-admin-token`` when one is set or the server binds beyond loopback, and refuses
        cross-site browser requests (docs/operations.md). A GET route must change nothing.
        """
        if any(r.method == method and r.path == path for r in self.routes):
            raise RoleError(f"role {self.role!r} registered route {method} {path} twice")
        self.routes.append(Route(method, path, handler))

    def background(self, name: str, task: BackgroundTask) -> None:
        """Run ``task()`` once endpoints are published; it is cancelled at shutdown.

        If it returns or raises while the worker is serving, the worker shuts down (exit 1 on
        an exception): a role's listener dying must not leave a half-alive process.
        """
        if name in self.tasks:
            raise RoleError(f"role {self.role!r} registered background task {name!r} twice")
        self.tasks[name] = task
