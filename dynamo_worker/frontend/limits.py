"""What the frontend refuses before it does any work: no API key, too many requests, too big.

* ``--api-key`` (env ``VLLM_API_KEY``, as ``vllm serve``): every ``/v1`` route needs
  ``Authorization: Bearer KEY``; a missing or wrong key gets 401. ``/health`` and ``/metrics``
  stay open, as with ``vllm serve``, so probes and scrapers need no secret.
* ``--max-concurrent-requests``: generation requests served at once; the next one gets 429 with
  ``Retry-After`` at once instead of queueing without bound (memory, and latency for everyone).
  A 503 (no worker for the model right now) carries ``Retry-After`` too.
* ``--max-prompt-tokens`` / ``--max-completion-tokens``: 400 past either, below the model's own
  context limit (which the frontend checks anyway). A chat request without ``max_tokens`` gets
  ``--max-completion-tokens`` when it is set, the rest of the context otherwise; a completions
  request vllm serve's default of 16, capped by ``--max-completion-tokens``.
* The request body is bounded by ``--max-request-bytes`` (413), enforced by aiohttp's
  ``client_max_size`` in :mod:`dynamo_worker.frontend.app`.
"""

from __future__ import annotations

import argparse
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from aiohttp import web
from prometheus_client import Counter

from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.options import check_at_least, env_default
from dynamo_worker.frontend.protocol import ApiError, bad_request

DEFAULT_MAX_CONCURRENT_REQUESTS = 256
RETRY_AFTER_SECONDS = 1
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_arguments(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--api-key",
        default=env_default("VLLM_API_KEY", None),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every /v1 route; 401 otherwise "
        "(env VLLM_API_KEY, as vllm serve; prefer the variable: a flag is visible in ps)",
    )
    g.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=env_default("DYN_MAX_CONCURRENT_REQUESTS", DEFAULT_MAX_CONCURRENT_REQUESTS, int),
        metavar="N",
        help="generation requests served at once; more get 429 with Retry-After "
        "(env DYN_MAX_CONCURRENT_REQUESTS; default %(default)s)",
    )
    g.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=env_default("DYN_MAX_PROMPT_TOKENS", 0, int),
        metavar="N",
        help="longest accepted prompt in tokens, 400 past it; 0: the model's context "
        "(env DYN_MAX_PROMPT_TOKENS; default %(default)s)",
    )
    g.add_argument(
        "--max-completion-tokens",
        type=int,
        default=env_default("DYN_MAX_COMPLETION_TOKENS", 0, int),
        metavar="N",
        help="largest accepted max_tokens, 400 past it, and the default when a request gives "
        "none; 0: the rest of the model's context (env DYN_MAX_COMPLETION_TOKENS; default %(default)s)",
    )


def configure(options: Any) -> None:
    check_at_least("--max-concurrent-requests", options.max_concurrent_requests, 1)
    check_at_least("--max-prompt-tokens", options.max_prompt_tokens, 0)
    check_at_least("--max-completion-tokens", options.max_completion_tokens, 0)
    if options.api_key is not None and not options.api_key.strip():
        raise UsageError("--api-key is blank; give a key (or set VLLM_API_KEY) or leave it unset")


@attrs.define
class Limits:
    """The frontend's admission rules; its two middlewares go in front of every route."""

    api_key: str | None = None
    max_concurrent: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    max_prompt_tokens: int = 0
    max_completion_tokens: int = 0
    active: int = 0
    rejected: Counter | None = None

    @classmethod
    def from_options(cls, options: Any) -> Limits:
        return cls(
            api_key=options.api_key,
            max_concurrent=options.max_concurrent_requests,
            max_prompt_tokens=options.max_prompt_tokens,
            max_completion_tokens=options.max_completion_tokens,
        )

    def register_metrics(self, registry: Any) -> None:
        self.rejected = Counter(
            "dynamo_frontend_rejected_requests",
            "Requests refused before any work, by reason (unauthorized, overloaded)",
            ("reason",),
            registry=registry,
        )

    def _count(self, reason: str) -> None:
        if self.rejected is not None:
            self.rejected.labels(reason).inc()

    def middlewares(self) -> list[Any]:
        return [self._authenticate, self._admit]

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.api_key is not None and request.path.startswith("/v1"):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                self._count("unauthorized")
                err = ApiError(
                    401,
                    "a valid API key is required: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                )
                return _error(err)
        return await handler(request)

    @web.middleware
    async def _admit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "POST" or request.path not in GENERATION_PATHS:
            return await handler(request)
        if self.active >= self.max_concurrent:
            self._count("overloaded")
            err = ApiError(
                429,
                f"the server is serving its limit of {self.max_concurrent} requests "
                f"(--max-concurrent-requests); retry after {RETRY_AFTER_SECONDS}s",
                code="too_many_requests",
            )
            resp = _error(err)
            resp.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return resp
        self.active += 1
        try:
            resp = await handler(request)
        finally:
            self.active -= 1
        if resp.status == 503 and not resp.prepared:
            # No worker right now (restarting, or every try failed): worth retrying shortly.
            resp.headers.setdefault("Retry-After", str(RETRY_AFTER_SECONDS))
        return resp

    def check_prompt(self, prompt_len: int, param: str) -> None:
        if self.max_prompt_tokens and prompt_len > self.max_prompt_tokens:
            raise bad_request(
                f"the prompt is {prompt_len} tokens, over this server's limit of "
                f"{self.max_prompt_tokens} (--max-prompt-tokens); shorten it",
                param=param,
                code="prompt_too_long",
            )

    def check_max_tokens(self, requested: int | None, resolved: int | None, param: str) -> int | None:
        """The max_tokens to send: ``resolved`` (the model's checks passed), capped by the limit."""
        cap = self.max_completion_tokens
        if not cap:
            return resolved
        if requested is not None and requested > cap:
            raise bad_request(
                f"{param} is {requested}, over this server's limit of {cap} (--max-completion-tokens); lower it",
                param=param,
                code="max_tokens_too_large",
            )
        return cap if resolved is None else min(resolved, cap)


def _error(exc: ApiError) -> web.Response:
    return web.Response(text=json.dumps(exc.body()), status=exc.status, content_type="application/json")
