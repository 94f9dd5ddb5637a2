"""Helpers for the frontend tests: scripted fake decode workers on the real runtime.

A :class:`FakeDecodeWorker` serves ``backend.generate`` through :class:`Runtime` exactly as a
decode worker does, and publishes the same discovery record, but its "engine" is a script:
it streams the prompt's token ids back (reversed by default), one per message, honouring
``max_tokens``, with logprobs and usage. Options make it slow, fail before or during the
stream, or record what it saw (requests, cancellations).

The workers run on an asyncio loop in a background thread (:class:`LoopThread`), so tests
stay plain synchronous functions that call the frontend with the ``openai`` client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import attrs

from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.core.runtime import Runtime

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread; :meth:`run` awaits a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-workers", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@attrs.define
class FakeDecodeWorker:
    """One scripted ``backend.generate`` instance serving ``model``.

    mode: ``"reverse"`` streams the prompt ids reversed, ``"forward"`` in order without the
    leading BOS; ``reply`` (token ids) streams those whatever the prompt. ``delay``: seconds
    before each token. ``reject``: a request-plane error code raised before any token
    (``retryable`` as given). ``fail_after``: raise an internal error after that many tokens.
    The stream ends with ``finish_reason`` "stop" and ``stop_reason`` (vLLM's) on the first of the
    request's ``stop_token_ids`` (that token sent last, as vLLM sends it), "length" when max_tokens
    cut it, else "eos", plus ``completion_usage``.
    """

    nats_url: str
    namespace: str
    model: str
    model_path: str
    max_model_len: int = 256
    eos_token_ids: list[int] = attrs.field(factory=lambda: [1])
    mode: str = "reverse"
    delay: float = 0.0
    reject: str | None = None
    retryable: bool = False
    fail_after: int | None = None
    bos_token_id: int = 0
    reply: list[int] | None = None
    requests: list[dict[str, Any]] = attrs.field(factory=list)
    cancelled: list[str] = attrs.field(factory=list)
    runtime: Runtime | None = None

    async def start(self) -> FakeDecodeWorker:
        self.runtime = await Runtime.connect(self.nats_url, self.namespace, name=f"fake-decode/{self.model}")
        await self.runtime.serve_endpoint("backend", "generate", self.generate)
        await self.runtime.publish(
            "backend",
            "generate",
            "decode",
            {
                "model": self.model,
                "model_path": self.model_path,
                "max_model_len": self.max_model_len,
                "eos_token_ids": self.eos_token_ids,
                "kind": "decode",
            },
        )
        return self

    async def withdraw(self) -> None:
        assert self.runtime is not None
        await self.runtime.withdraw()

    async def stop(self) -> None:
        if self.runtime is not None:
            await self.runtime.withdraw()
            await self.runtime.drain(1)
            await self.runtime.close()
            self.runtime = None

    @property
    def instance_id(self) -> str:
        assert self.runtime is not None
        return self.runtime.instance_id

    def output_ids(self, request: dict[str, Any]) -> list[int]:
        """The token ids this worker streams for ``request`` (before max_tokens)."""
        if self.reply is not None:
            return list(self.reply)
        ids = list(request["token_ids"])
        if self.mode == "forward":
            return ids[1:] if ids and ids[0] == self.bos_token_id else ids
        return ids[::-1]

    async def generate(self, request: dict[str, Any], ctx: RequestContext) -> AsyncIterator[dict[str, Any]]:
        self.requests.append(request)
        if self.reject is not None:
            raise RequestError(self.reject, f"scripted {self.reject} from {self.model}", retryable=self.retryable)
        out = self.output_ids(request)
        max_tokens = request["stop_conditions"].get("max_tokens")
        finish, stop_reason = "eos", None
        stop_ids = request["stop_conditions"].get("stop_token_ids") or []
        at = next((k for k, t in enumerate(out) if t in stop_ids), None)
        if at is not None and (max_tokens is None or at < max_tokens):
            out, finish, stop_reason = out[: at + 1], "stop", out[at]
        elif max_tokens is not None and len(out) >= max_tokens:
            out, finish = out[:max_tokens], "length"
        logprobs = request.get("output_options", {}).get("logprobs")
        try:
            for i, token in enumerate(out):
                if self.fail_after is not None and i == self.fail_after:
                    raise RequestError("internal", f"scripted failure after {i} tokens")
                if self.delay:
                    await asyncio.sleep(self.delay)
                item: dict[str, Any] = {"token_ids": [token]}
                if logprobs is not None:
                    item["log_probs"] = [-0.25 * (i + 1)]
                    item["top_logprobs"] = [
                        [
                            {"rank": r + 1, "token_id": token + r, "logprob": -0.25 * (i + 1) - r}
                            for r in range(logprobs)
                        ]
                    ]
                if i == len(out) - 1:
                    item["finish_reason"] = finish
                    if stop_reason is not None:
                        item["stop_reason"] = stop_reason
                    item["completion_usage"] = {
                        "prompt_tokens": len(request["token_ids"]),
                        "completion_tokens": len(out),
                        "total_tokens": len(request["token_ids"]) + len(out),
                        "prompt_tokens_details": {"cached_tokens": 0},
                    }
                yield item
        except asyncio.CancelledError:
            self.cancelled.append(ctx.request_id)
            raise
