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

from prometheus_client import CollectorRegistry, Counter

from dynamo_worker.plugin import (
    Registrar,
    RequestContext,
    RequestError,
    UsageError,
    WorkerContext,
    hookimpl,
)

MAX_TOKENS = 4096
# The fields a request may carry: its own, plus Dynamo's PreprocessedRequest ones that the
# frontend sends (ignored here). Anything else is a bad request, as on a decode worker.
KNOWN_FIELDS = frozenset(
    {
        "token_ids",
        "delay",
        "model",
        "stop_conditions",
        "sampling_options",
        "output_options",
        "eos_token_ids",
        "mdc_sum",
        "annotations",
        "routing",
        "extra_args",
        "prefill_result",
        "bootstrap_info",
    }
)


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

    async def generate(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        """``{"token_ids": [int, ...], "delay": float?}`` -> one ``{"token_ids": [t]}`` per token."""
        if not isinstance(request, dict):
            raise RequestError("bad_request", "request must be a JSON object")
        unknown = sorted(set(request) - KNOWN_FIELDS)
        if unknown:
            raise RequestError("bad_request", f"unknown fields: {', '.join(map(str, unknown))}")
        tokens = request.get("token_ids")
        if not isinstance(tokens, list) or not all(type(t) is int for t in tokens):
            raise RequestError("bad_request", "token_ids must be a list of integers")
        if len(tokens) > MAX_TOKENS:
            raise RequestError("bad_request", f"at most {MAX_TOKENS} token_ids")
        delay = request.get("delay", self.delay)
        if not isinstance(delay, (int, float)) or not 0 <= delay <= 10:
            raise RequestError("bad_request", "delay must be a number of seconds between 0 and 10")
        prompt_len = len(tokens)
        finish = "stop"
        limit = _max_tokens(request.get("stop_conditions"))
        if limit is not None and limit < len(tokens):
            tokens, finish = tokens[:limit], "length"
        for i, token in enumerate(tokens):
            await asyncio.sleep(delay)  # 0 still yields: each token leaves in its own loop turn
            if self.echoed is not None and not context.is_health_check:  # count users' tokens only
                self.echoed.inc()
            last = i == len(tokens) - 1
            if last and self.model_dir is not None:  # a backend worker reports usage, as decode does
                yield {
                    "token_ids": [token],
                    "finish_reason": finish,
                    "completion_usage": {
                        "prompt_tokens": prompt_len,
                        "completion_tokens": len(tokens),
                        "total_tokens": prompt_len + len(tokens),
                    },
                }
            else:
                yield {"token_ids": [token], **({"finish_reason": "stop"} if last else {})}


def _max_tokens(stop_conditions: Any) -> int | None:
    """``stop_conditions.max_tokens`` if given; a bad_request if it is not a positive integer."""
    if stop_conditions is None:
        return None
    if not isinstance(stop_conditions, dict):
        raise RequestError("bad_request", "stop_conditions must be a JSON object")
    limit = stop_conditions.get("max_tokens")
    if limit is None:
        return None
    if type(limit) is not int or limit < 1:
        raise RequestError("bad_request", "stop_conditions.max_tokens must be an integer of at least 1")
    return limit
