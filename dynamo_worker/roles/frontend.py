"""The ``frontend`` role: hooks only; the server is :mod:`dynamo_worker.frontend`."""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
from typing import TYPE_CHECKING, Any

from dynamo_worker.frontend import options
from dynamo_worker.plugin import Registrar, UsageError, WorkerContext, hookimpl

if TYPE_CHECKING:
    from dynamo_worker.frontend.app import FrontendServer


class FrontendRole:
    """OpenAI-compatible HTTP frontend that routes to workers found through discovery.

    Serves no request-plane endpoint: its HTTP listener runs as a background task, tokenizes,
    sends ``backend.generate`` requests to decode workers and detokenizes their tokens.
    """

    name = "frontend"
    serves_endpoints = False  # so the core does not check the TCP address it would publish

    def __init__(self) -> None:
        self.ctx: WorkerContext | None = None
        self.server: FrontendServer | None = None
        self.sock: socket.socket | None = None

    @hookimpl
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        options.add_arguments(parser)

    @hookimpl
    def dynamo_worker_configure(self, ctx: WorkerContext) -> None:
        options.configure(ctx.options)

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Registrar, ctx: WorkerContext) -> None:
        # Imported here: aiohttp routes and the model table are only needed by a serving process.
        from dynamo_worker.frontend.app import FrontendServer

        o = ctx.options
        try:
            self.sock = FrontendServer.bind(o.http_host, o.http_port)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
            raise UsageError(
                f"cannot listen on --http-host {o.http_host} --http-port {o.http_port} "
                f"({reason}); choose a free port or another address"
            ) from exc
        plane_limit = ctx.runtime.max_message_bytes()
        if o.max_request_bytes > plane_limit:
            # Checked at send time too (413): say at start-up which bodies cannot be served.
            ctx.log.warning(
                "--max-request-bytes %d is above the request plane's %d-byte limit (the NATS "
                "server's max_payload): a request whose message to a worker is larger gets 413; "
                "raise max_payload in nats-server's configuration or lower --max-request-bytes",
                o.max_request_bytes,
                plane_limit,
            )
        self.ctx = ctx
        self.server = FrontendServer.for_runtime(ctx.runtime, o)
        registrar.background("http", self.serve_http)

    async def serve_http(self) -> None:
        """Listen on --http-host/--http-port and serve until shutdown (which stops the server)."""
        assert self.ctx is not None and self.server is not None
        o = self.ctx.options
        url = await self.server.start(
            sock=self.sock, shutdown_timeout=o.graceful_shutdown_timeout, discovery_timeout=o.model_wait_timeout
        )
        self.ctx.log.info("frontend listening on %s (OpenAI API at %s/v1)", url, url)
        # Wait forever; cancelling this task does not stop the listener: dynamo_worker_shutdown
        # does, gracefully, after the core has cancelled background tasks.
        await asyncio.Event().wait()

    @hookimpl
    async def dynamo_worker_shutdown(self, ctx: WorkerContext) -> Any:
        if self.server is not None:
            await self.server.stop()
        elif self.sock is not None:
            self.sock.close()
