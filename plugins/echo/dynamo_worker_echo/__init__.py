"""An example third-party role: ``generate`` streams the request's token ids back, one per message.

It has no engine, so it shows the whole plugin surface (options, validation, endpoints, health
payload, metrics, shutdown) in a few lines. docs/writing-a-role.md walks through it.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter

from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.hookspecs import hookimpl
from dynamo_worker.core.request_plane import RequestContext, RequestError

MAX_TOKENS = 4096


class EchoRole:
    """Streams each request's token ids back, one per message (an example plugin, no engine)."""

    name = "echo"

    def __init__(self) -> None:
        self.delay = 0.0
        self.echoed: Counter | None = None
        self.stopped = False

    @hookimpl
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("echo role")
        group.add_argument("--echo-delay", type=float, default=0.0, metavar="SECONDS",
                           help="pause between streamed tokens (default %(default)s)")

    @hookimpl
    def dynamo_worker_configure(self, ctx: Any) -> None:
        if ctx.options.echo_delay < 0:
            raise UsageError(f"--echo-delay must be 0 or more (got {ctx.options.echo_delay})")
        self.delay = ctx.options.echo_delay

    @hookimpl
    def dynamo_worker_register_metrics(self, registry: CollectorRegistry, ctx: Any) -> None:
        self.echoed = Counter("echo_tokens", "Tokens echoed back", registry=registry)

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Any, ctx: Any) -> None:
        registrar.endpoint("generate", self.generate, model="echo")

    @hookimpl
    def dynamo_worker_health_payload(self, ctx: Any) -> dict[str, Any]:
        return {"token_ids": [1]}

    @hookimpl
    def dynamo_worker_shutdown(self, ctx: Any) -> None:
        self.stopped = True
        ctx.log.info("echo role stopped")

    async def generate(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """``{"token_ids": [int, ...], "delay": float?}`` -> one ``{"token_ids": [t]}`` per token."""
        if not isinstance(request, dict):
            raise RequestError("bad_request", "request must be a JSON object")
        tokens = request.get("token_ids")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise RequestError("bad_request", "token_ids must be a list of integers")
        if len(tokens) > MAX_TOKENS:
            raise RequestError("bad_request", f"at most {MAX_TOKENS} token_ids")
        delay = request.get("delay", self.delay)
        if not isinstance(delay, (int, float)) or not 0 <= delay <= 10:
            raise RequestError("bad_request", "delay must be a number of seconds between 0 and 10")
        for i, token in enumerate(tokens):
            await asyncio.sleep(delay)  # 0 still yields: each token leaves in its own loop turn
            if self.echoed is not None:
                self.echoed.inc()
            last = i == len(tokens) - 1
            yield {"token_ids": [token], **({"finish_reason": "stop"} if last else {})}
