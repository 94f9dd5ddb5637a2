"""Sends a request to one instance serving its model; retries; migrates; maps errors to HTTP.

With prefill workers for the model, the request is first prefilled on one of them
(:mod:`dynamo_worker.frontend.disaggregation`) and the decode worker gets its ``prefill_result``.

A retryable error (the instance left, shut down, or never answered) that arrives before the
first token is retried on another instance of the same model, up to ``--request-retries``
times. One that arrives after tokens were produced is *migrated*, up to ``--migration-limit``
times: the request goes to another instance with the prompt plus the tokens already produced
and the remaining token budget, and its tokens continue the same stream, so the client sees one
unbroken answer. Seeded sampling restarts its random stream on the new worker.

Before each try (the first, a retry, a migration) the router waits, up to :data:`RECOVERY_WAIT`
seconds (:data:`MIGRATION_WAIT` for a migration), until the NATS connection is up and some
instance serves the model (at once when they are): during a NATS restart every try would otherwise
fail at once, and the request with it, and just after one the workers take a moment to register
again. A retry or migration waits its first :data:`TRIED_GRACE` s for an instance it has not tried.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import msgspec

from dynamo_worker.core import wire
from dynamo_worker.core.discovery import InstanceRecord
from dynamo_worker.core.generate import Usage, cached_tokens
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Client
from dynamo_worker.frontend import models
from dynamo_worker.frontend.disaggregation import PrefillRouter
from dynamo_worker.frontend.kv_routing import KvRouting
from dynamo_worker.frontend.output import merge_messages
from dynamo_worker.frontend.protocol import ApiError

log = logging.getLogger(__name__)

# Request-plane error codes (dynamo_worker.core.wire.ErrorInfo) to HTTP statuses.
STATUS_BY_CODE = {
    "bad_request": 400,
    "not_found": 404,
    "unavailable": 503,
    "engine_dead": 503,
    "cancelled": 503,
    "internal": 500,
    wire.TOO_LARGE: 413,  # a request (or its response) over the request plane's size limit
}

POLICIES = {"round-robin": "round_robin", "random": "random"}
RECOVERY_WAIT = 3.0  # seconds a try waits for NATS and an instance of its model to be back
# A migration waits longer: its client holds a stream already begun, and the instance it needs may be
# a live one whose lease the servers expired while JetStream elected a leader (a host cut off with
# the discovery bucket's leader): it registers again once JetStream answers, seconds later (seen:
# 4.6 s after the expiry, on a loaded 2-core machine; the 3 s wait failed 4 of 8 streams).
MIGRATION_WAIT = 15.0
# How long a retry or a migration waits for an instance it has not tried before taking one that
# failed it: the error can arrive before discovery's news that its instance left (a worker that
# withdraws and then fails its streams), and the stale view would send the request straight back.
TRIED_GRACE = 1.0


def api_error(exc: RequestError) -> ApiError:
    """The HTTP error a request-plane error becomes (unknown codes are internal errors)."""
    status = STATUS_BY_CODE.get(exc.code, 500)
    message = exc.message if status != 500 else f"the worker failed: {exc.message}"
    code = "request_too_large" if status == 413 else exc.code  # as for a body over --max-request-bytes
    return ApiError(status, message, code=code)


class Router:
    """Picks instances of ``backend.generate`` for a model by ``--router-mode``."""

    def __init__(
        self,
        client: Client,
        mode: str = "round-robin",
        retries: int = 2,
        *,
        migration_limit: int = 0,
        on_retry: Callable[[str], None] | None = None,
        on_migration: Callable[[str], None] | None = None,
        prefill: PrefillRouter | None = None,
        bus_connected: Callable[[], bool] | None = None,
        kv: KvRouting | None = None,
    ) -> None:
        self.client = client
        self.kv = kv  # --router-mode kv: the choice by cached prefix and load
        self.prefill = prefill  # disaggregated serving: prefill first when prefill workers exist
        self.policy = POLICIES.get(mode, "round_robin")  # kv: the policy of whatever kv does not route
        self.retries = retries
        self.migration_limit = migration_limit
        self.on_retry = on_retry or (lambda model: None)
        self.on_migration = on_migration or (lambda model: None)
        self.bus_connected = bus_connected or (lambda: True)

    def _pick(
        self, model: str, tried: set[str], request: dict[str, Any], request_id: str | None
    ) -> tuple[InstanceRecord, dict[str, Any]]:
        """The instance for this try, and the request to send it (with ``routing.dp_rank`` when
        the KV router chose a data-parallel rank)."""

        def serves(r: InstanceRecord) -> bool:
            return models.serves(r, model)  # its base model, or a LoRA adapter it holds

        def untried(r: InstanceRecord) -> bool:
            return serves(r) and r.instance_id not in tried

        # Prefer an instance not tried yet; with none left, one that failed may have recovered.
        for where in (untried, serves):
            candidates = self.client.instances(where)
            if not candidates:
                continue
            if self.kv is None or request_id is None:
                return self.client.pick(self.policy, where), request
            record, rank = self.kv.choose(candidates, request, request_id)
            if record.data.get("data_parallel_size", 1) > 1:
                request = {**request, "routing": {**(request.get("routing") or {}), "dp_rank": rank}}
            return record, request
        raise ApiError(503, f"no worker serves the model {model!r} right now; retry later", code="no_worker")

    async def _recovered(self, model: str, tried: set[str], wait: float = RECOVERY_WAIT) -> None:
        """Wait (up to ``wait`` s) until NATS is connected and an instance serves ``model``; at once if so.

        One not in ``tried`` is waited for during the first :data:`TRIED_GRACE` s.
        """
        start = time.monotonic()
        while (waited := time.monotonic() - start) < wait:
            if self.bus_connected():
                live = self.client.instances(lambda r: models.serves(r, model))
                if any(r.instance_id not in tried for r in live) or (live and waited >= TRIED_GRACE):
                    return
            await asyncio.sleep(0.05)

    async def generate(self, model: str, payload: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        """Stream the worker's response messages; an :class:`ApiError` on failure.

        Close it (``contextlib.aclosing``) to stop early: the worker's request is cancelled.
        """
        if self.kv is None:
            async with aclosing(self._generate(model, payload, None)) as stream:
                async for item in stream:
                    yield item
            return
        request_id = uuid.uuid4().hex  # the KV router's handle on this request's load
        cached: int | None = None
        try:
            async with aclosing(self._generate(model, payload, request_id)) as stream:
                async for item in stream:
                    # A message: its worker has finished its prefill (on every message, not the
                    # first only: a migrated request is prefilled again on its new worker).
                    self.kv.first_token(request_id)
                    if "completion_usage" in item:
                        cached = cached_tokens(item["completion_usage"])
                    yield item
        finally:
            self.kv.finished(request_id, cached)

    async def _generate(
        self, model: str, payload: dict[str, Any], request_id: str | None
    ) -> AsyncGenerator[dict[str, Any], None]:
        tried: set[str] = set()
        attempt = migrations = 0
        produced: list[int] = []
        request = payload
        # Prompt logprobs need the prompt run where they are asked for: vLLM neither loads a
        # transferred KV cache for such a request (skip_reading_prefix_cache) nor could it score
        # the prompt from one, so a prefill worker's work would be thrown away.
        wants_prompt_logprobs = (payload.get("output_options") or {}).get("prompt_logprobs") is not None
        prefill_result = (
            await self.prefill.prefill(model, payload)
            if self.prefill is not None and not wants_prompt_logprobs
            else None
        )
        if prefill_result is not None:
            request = {**payload, "prefill_result": prefill_result}
        while True:
            await self._recovered(model, tried, MIGRATION_WAIT if migrations else RECOVERY_WAIT)
            record, sent = self._pick(model, tried, request, request_id)
            tried.add(record.instance_id)
            try:
                async with aclosing(self.client.direct_batches(sent, record.instance_id)) as stream:
                    async for items in stream:
                        for item in merge_messages(items):
                            produced.extend(item.get("token_ids") or [])
                            if migrations and "completion_usage" in item:
                                item["completion_usage"] = _usage(payload, produced, item["completion_usage"])
                            yield item
                return
            except RequestError as exc:
                if not exc.retryable:
                    raise api_error(exc) from exc
                if not produced and attempt < self.retries:
                    attempt += 1
                    self.on_retry(model)
                    log.info(
                        "instance %s failed before the first token (%s: %s); retry %d of %d",
                        record.instance_id,
                        exc.code,
                        exc.message,
                        attempt,
                        self.retries,
                    )
                    continue
                if produced and migrations < self.migration_limit:
                    migrations += 1
                    self.on_migration(model)
                    log.warning(
                        "instance %s failed after %d tokens (%s: %s); migrating (%d of %d)",
                        record.instance_id,
                        len(produced),
                        exc.code,
                        exc.message,
                        migrations,
                        self.migration_limit,
                    )
                    # From the original payload: the new worker computes the whole prefix itself.
                    request = continuation(payload, produced)
                    if request is None:  # every token was produced: only the finish was lost
                        yield {
                            "token_ids": [],
                            "finish_reason": "length",
                            "completion_usage": _usage(payload, produced, None),
                        }
                        return
                    continue
                raise api_error(exc) from exc


def continuation(payload: dict[str, Any], produced: list[int]) -> dict[str, Any] | None:
    """The request that continues ``payload`` after ``produced`` tokens, or None if none are left."""
    stop = dict(payload.get("stop_conditions") or {})
    if stop.get("max_tokens") is not None:
        remaining = stop["max_tokens"] - len(produced)
        if remaining <= 0:
            return None
        stop["max_tokens"] = remaining
    if stop.get("min_tokens"):
        stop["min_tokens"] = max(0, stop["min_tokens"] - len(produced))
    # The prompt's logprobs came with the first message; scored again, the prompt would include
    # the tokens produced.
    output = {k: v for k, v in (payload.get("output_options") or {}).items() if k != "prompt_logprobs"}
    return {
        **payload,
        "token_ids": [*payload["token_ids"], *produced],
        "stop_conditions": stop,
        "output_options": output,
    }


def _usage(payload: dict[str, Any], produced: list[int], reported: dict[str, Any] | None) -> dict[str, Any]:
    """Usage as the client's request saw it, after a migration: its own prompt, every token it was
    sent, and the prompt tokens the last worker found cached (it computed the rest)."""
    usage = Usage.of(len(payload["token_ids"]), len(produced), cached_tokens(reported))
    return msgspec.to_builtins(usage)
