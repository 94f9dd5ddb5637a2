"""An example third-party role: ``generate`` streams the request's token ids back, one per message.

It has no engine, so it shows the whole plugin surface (options, validation, endpoints, health
payload, metrics, shutdown) in a few lines. docs/writing-a-role.md walks through it.

With ``--echo-model DIR`` (a model directory with a tokenizer) it registers as a ``backend``
worker serving that model, so the frontend routes OpenAI requests to it: a full stack without an
engine, for load, soak and fault tests (``benchmarks/soak.py``, ``tests/test_faults.py``). It then
honours ``stop_conditions.max_tokens`` and reports usage as a decode worker does.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter

from dynamo_worker.plugin import (
    GenerateChunk,
    GenerateRequest,
    Registrar,
    RequestContext,
    RequestError,
    Usage,
    UsageError,
    WorkerContext,
    hookimpl,
)

MAX_TOKENS = 4096


class EchoRequest(GenerateRequest, kw_only=True):
    """The ``generate`` request every worker takes (the frontend sends it), plus this role's own
    ``delay``; ``stop_conditions.max_tokens`` is honoured, the other fields are accepted and
    ignored (there is no engine to sample with). Unknown fields are refused, as on a decode worker."""

    delay: float | None = None


class EchoRole:
    """Streams each request's token ids back, one per message (an example plugin, no engine)."""

    name = "echo"
    component = "echo"  # where its endpoints are addressed; "backend" with --echo-model (configure)

    def __init__(self) -> None:
        self.delay = 0.0
        self.echoed: Counter | None = None
        self.stopped = False
        self.model_dir: str | None = None

    @hookimpl
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("echo role")
        group.add_argument(
            "--echo-delay",
            type=float,
            default=0.0,
            metavar="SECONDS",
            help="pause between streamed tokens (default %(default)s)",
        )
        group.add_argument(
            "--echo-model",
            metavar="DIR",
            default=None,
            help="serve as a backend worker of the model in DIR (its tokenizer), so the "
            "frontend routes requests here: a stack with no engine, for load tests",
        )
        group.add_argument(
            "--echo-served-model-name",
            default="echo",
            metavar="NAME",
            help="the model name clients use with --echo-model (default %(default)s)",
        )

    @hookimpl
    def dynamo_worker_configure(self, ctx: WorkerContext) -> None:
        if ctx.options.echo_delay < 0:
            raise UsageError(f"--echo-delay must be 0 or more (got {ctx.options.echo_delay})")
        self.delay = ctx.options.echo_delay
        if ctx.options.echo_model is not None:
            if not Path(ctx.options.echo_model, "tokenizer_config.json").is_file():
                raise UsageError(
                    f"--echo-model {ctx.options.echo_model}: no tokenizer_config.json there; "
                    "give a model directory (dynamo-worker demo-model PATH writes one)"
                )
            self.model_dir = str(Path(ctx.options.echo_model).resolve())
            self.component = "backend"  # where the frontend looks for workers

    @hookimpl
    def dynamo_worker_register_metrics(self, registry: CollectorRegistry, ctx: WorkerContext) -> None:
        self.echoed = Counter("echo_tokens", "Tokens echoed back", registry=registry)

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Registrar, ctx: WorkerContext) -> None:
        if self.model_dir is None:
            registrar.endpoint("generate", self.generate, model="echo")
        else:
            registrar.endpoint(
                "generate",
                self.generate,
                model=ctx.options.echo_served_model_name,
                model_path=self.model_dir,
                max_model_len=MAX_TOKENS * 2,
                eos_token_ids=[],
                kind="decode",
            )

    @hookimpl
    def dynamo_worker_health_payload(self, ctx: WorkerContext) -> dict[str, Any]:
        return {"token_ids": [1]}

    @hookimpl
    def dynamo_worker_shutdown(self, ctx: WorkerContext) -> None:
        self.stopped = True
        ctx.log.info("echo role stopped")

    async def generate(self, request: Any, context: RequestContext) -> AsyncIterator[GenerateChunk]:
        """``{"token_ids": [int, ...], "delay": float?}`` -> one chunk of one token per token."""
        try:
            req = msgspec.convert(request, EchoRequest)
        except msgspec.ValidationError as exc:
            raise RequestError("bad_request", f"invalid request: {exc}") from None
        tokens = req.token_ids
        if len(tokens) > MAX_TOKENS:
            raise RequestError("bad_request", f"at most {MAX_TOKENS} token_ids")
        delay = self.delay if req.delay is None else req.delay
        if not 0 <= delay <= 10:
            raise RequestError("bad_request", "delay must be a number of seconds between 0 and 10")
        limit = req.stop_conditions.max_tokens
        if limit is not None and limit < 1:
            raise RequestError("bad_request", "stop_conditions.max_tokens must be an integer of at least 1")
        prompt_len = len(tokens)
        finish = "stop"
        if limit is not None and limit < len(tokens):
            tokens, finish = tokens[:limit], "length"
        for i, token in enumerate(tokens):
            await asyncio.sleep(delay)  # 0 still yields: each token leaves in its own loop turn
            if self.echoed is not None and not context.is_health_check:  # count users' tokens only
                self.echoed.inc()
            chunk = GenerateChunk([token])
            if i == len(tokens) - 1:
                chunk.finish_reason = finish  # "length" when max_tokens cut the echo short
                if self.model_dir is not None:  # a backend worker reports usage, as decode does
                    chunk.completion_usage = Usage.of(prompt_len, len(tokens))
            yield chunk
