"""The HTTP server: OpenAI routes, ``/health`` and ``/metrics``, and its graceful stop.

Streaming responses are Server-Sent Events (``data: {json}\\n\\n`` ... ``data: [DONE]\\n\\n``).
The SSE response is only started when the worker's first message arrives, so an error before
any output (bad request from the worker, no instance left after retries) is still a plain HTTP
error with its status code; after that, an error is one ``data: {"error": {...}}`` event that
ends the stream.

aiohttp sets ``TCP_NODELAY`` on every accepted connection (``BaseProtocol.connection_made``),
so small SSE writes are not held back by Nagle's algorithm. The runner is created with
``handler_cancellation=True``: a client that disconnects cancels its handler, which closes the
worker stream, which cancels the request on the worker.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import attrs
import msgspec
from aiohttp import web

from dynamo_worker.core.runtime import Client, Runtime
from dynamo_worker.frontend import disaggregation, guided, multimodal, preprocess, tokenization
from dynamo_worker.frontend.chat_parsers import ChatParsers, RequestParsing, template_tools
from dynamo_worker.frontend.choices import ChoiceStreams, choice_payloads, merged_usage
from dynamo_worker.frontend.detokenizer import TokenStrings
from dynamo_worker.frontend.disaggregation import PrefillRouter
from dynamo_worker.frontend.kv_routing import KvRouting, KvRoutingMetrics
from dynamo_worker.frontend.limits import Limits
from dynamo_worker.frontend.metrics import CLIENT_CLOSED, CONTENT_TYPE, FrontendMetrics, RequestTracker
from dynamo_worker.frontend.models import ModelTable, ServedModel
from dynamo_worker.frontend.output import OutputProcessor, echo_logprobs, prompt_logprobs_body
from dynamo_worker.frontend.protocol import (
    ApiError,
    ChatRequest,
    ChatShape,
    CompletionShape,
    GenerationParams,
    ResponseShape,
    TokenLogprob,
    chat_messages,
    completion_prompt,
    generation_params,
    internal,
    parse_chat,
    parse_completion,
    unavailable,
    usage_body,
)
from dynamo_worker.frontend.router import POLICIES, Router
from dynamo_worker.frontend.unimplemented import refuse_unimplemented

log = logging.getLogger(__name__)

WORKER_COMPONENT = "backend"  # Dynamo's name for the component decode workers register
WORKER_ENDPOINT = "generate"

_encode = msgspec.json.Encoder().encode
_SSE_DONE = b"data: [DONE]\n\n"


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(body), status=status, content_type="application/json")


def error_response(exc: ApiError) -> web.Response:
    return json_response(exc.body(), exc.status)


@web.middleware
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own errors (unknown path, wrong method) in OpenAI's JSON error shape."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(ApiError(exc.status, f"{request.method} {request.path}: {exc.reason}"))


@attrs.define
class _Prepared:
    """A request ready to send: its model, prompt, worker payload and response shape."""

    model: ServedModel
    tokenizer: Any
    prompt_ids: list[int]
    params: GenerationParams
    payload: dict[str, Any]
    shape: ResponseShape
    router: Router | None = None  # None: the LLM workers' router; else the processors'
    echo: str = ""  # completions with echo: the prompt's text, sent before the output
    chat: RequestParsing | None = None  # reasoning/tool-call parsing of chat output (chat_parsers)


class FrontendServer:
    """The OpenAI-compatible HTTP server over one ``backend.generate`` client."""

    def __init__(
        self,
        client: Client,
        *,
        router_mode: str = "round-robin",
        retries: int = 2,
        migration_limit: int = 0,
        max_request_bytes: int = 4 * 1024 * 1024,
        metrics: FrontendMetrics | None = None,
        prefill_client: Client | None = None,
        processor_client: Client | None = None,
        limits: Limits | None = None,
        kv: dict[str, Any] | None = None,
        chat_parsers: ChatParsers | None = None,
    ) -> None:
        self.client = client
        self.chat_parsers = chat_parsers or ChatParsers()
        self.metrics = metrics or FrontendMetrics()
        # --router-mode kv: ``kv`` holds KvRouting's knobs (overlap_weight, temperature, ...); the
        # decode and the prefill workers each get a KvRouting, with one set of metrics.
        self.kv: KvRouting | None = None
        self.prefill_kv: KvRouting | None = None
        if router_mode == "kv":
            kv_metrics = KvRoutingMetrics(self.metrics.registry)
            self.kv = KvRouting(client, metrics=kv_metrics, **(kv or {}))
            if prefill_client is not None:
                self.prefill_kv = KvRouting(prefill_client, metrics=kv_metrics, **(kv or {}))
        self.limits = limits or Limits()
        self.limits.register_metrics(self.metrics.registry)
        self.table = ModelTable(client)
        prefill = None
        if prefill_client is not None:
            prefill = PrefillRouter(
                prefill_client,
                POLICIES.get(router_mode, "round_robin"),
                kv=self.prefill_kv,
                on_prefill=lambda model: self.metrics.disaggregated.labels(model).inc(),
                on_fallback=lambda model, reason: self.metrics.prefill_fallbacks.labels(model, reason).inc(),
            )
        self.router = Router(
            client,
            router_mode,
            retries,
            migration_limit=migration_limit,
            on_retry=lambda model: self.metrics.retries.labels(model).inc(),
            on_migration=lambda model: self.metrics.migrations.labels(model).inc(),
            prefill=prefill,
            bus_connected=lambda: client.runtime.nc.is_connected,
            kv=self.kv,
        )
        self.media: multimodal.MediaRoute | None = None
        if processor_client is not None:
            self.media = multimodal.MediaRoute(
                processor_client,
                Router(
                    processor_client,
                    router_mode,
                    retries,
                    on_retry=lambda model: self.metrics.retries.labels(model).inc(),
                    bus_connected=lambda: processor_client.runtime.nc.is_connected,
                ),
            )
        self.max_request_bytes = max_request_bytes
        self.runner: web.AppRunner | None = None
        self.url = ""

    @classmethod
    def for_runtime(cls, runtime: Runtime, options: Any) -> FrontendServer:
        return cls(
            runtime.client(WORKER_COMPONENT, WORKER_ENDPOINT),
            router_mode=options.router_mode,
            retries=options.request_retries,
            migration_limit=options.migration_limit,
            max_request_bytes=options.max_request_bytes,
            prefill_client=runtime.client(disaggregation.COMPONENT, disaggregation.ENDPOINT),
            processor_client=runtime.client(multimodal.COMPONENT, multimodal.ENDPOINT),
            limits=Limits.from_options(options),
            kv={
                "overlap_weight": options.kv_overlap_score_weight,
                "temperature": options.router_temperature,
                "busy_threshold": options.busy_threshold,
                "balance_requests": options.kv_balance_requests,
                "balance_ratio": options.kv_balance_ratio,
                "prefill_queue": options.kv_prefill_queue,
                "use_events": options.kv_events,
            },
            chat_parsers=ChatParsers.from_options(options),
        )

    # ---- lifecycle ------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.max_request_bytes, middlewares=[*self.limits.middlewares(), _openai_errors]
        )
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/v1/models/{model:.+}", self.get_model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/version", self.version)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.render_metrics)
        return app

    @staticmethod
    def bind(host: str, port: int) -> socket.socket:
        """The listening socket (``port`` 0 picks a free one); an OSError if it cannot be had.

        Bound before the server starts so that a port in use is reported at start-up, as a
        one-line error, rather than from a background task.
        """
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        return socket.create_server((host, port), family=family, backlog=1024)

    async def start(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sock: socket.socket | None = None,
        shutdown_timeout: float = 30.0,
        discovery_timeout: float = 5.0,
    ) -> str:
        """Follow discovery, then serve on ``sock`` (or a new socket on host:port); returns the base URL."""
        sock = sock or self.bind(host, port)
        self.table.start()
        for kv in (self.kv, self.prefill_kv):
            if kv is not None:
                await kv.start()
        if not await self._wait_ready(discovery_timeout):
            log.warning(
                "no discovery snapshot after %.1fs; listening anyway (models appear as workers are found)",
                discovery_timeout,
            )
        self.runner = web.AppRunner(
            self.build_app(), handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None
        )
        await self.runner.setup()
        await web.SockSite(self.runner, sock).start()
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{shown}:{bound_port}"
        return self.url

    async def _wait_ready(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.client.watcher.ready.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop accepting; let in-flight requests finish up to the shutdown timeout; cancel the rest."""
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()
        for kv in (self.kv, self.prefill_kv):
            if kv is not None:
                await kv.stop()
        self.table.tokenizers.close()

    # ---- informational routes ---------------------------------------------------------------------

    def _model_card(self, model: ServedModel) -> dict[str, Any]:
        created = self.table.seen.get(model.parent or model.name, 0)  # an adapter: when its base appeared
        card = {
            "id": model.name,
            "object": "model",
            "created": created,
            "owned_by": "dynamo-worker",
            "max_model_len": model.max_model_len,
        }
        if model.parent is not None:  # a LoRA adapter, as vLLM lists them
            card["parent"] = model.parent
        return card

    async def list_models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._model_card(m) for m in self.table.live().values()]})

    async def get_model(self, request: web.Request) -> web.Response:
        try:
            return json_response(self._model_card(self.table.resolve(request.match_info["model"])))
        except ApiError as exc:
            return error_response(exc)

    async def health(self, request: web.Request) -> web.Response:
        live = self.table.live()
        instances = sum(len(m.instances) for m in live.values())
        body = {
            "status": "healthy" if instances else "unhealthy",
            "instances": instances,
            "models": [{"model": m.name, "instances": len(m.instances)} for m in live.values()],
        }
        if not instances:
            body["message"] = f"no {WORKER_COMPONENT}.{WORKER_ENDPOINT} worker is discovered"
        return json_response(body, 200 if instances else 503)

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            return json_response(await tokenization.tokenize(self.table, await self._read_body(request)))
        except ApiError as exc:
            return error_response(exc)

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            return json_response(await tokenization.detokenize(self.table, await self._read_body(request)))
        except ApiError as exc:
            return error_response(exc)

    async def version(self, request: web.Request) -> web.Response:
        return json_response(tokenization.versions())

    async def render_metrics(self, request: web.Request) -> web.Response:
        resp = web.Response(body=self.metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE
        return resp

    # ---- generation routes ------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat_completions")

    async def _serve(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        tracker = self.metrics.track(endpoint, stream=False)
        prepared: _Prepared | None = None
        try:
            prepared = await self._prepare(await self._read_body(request), endpoint, tracker)
            if prepared.params.stream:
                return await self._stream(request, prepared, tracker)
            return await self._unary(prepared, tracker)
        except ApiError as exc:
            tracker.finish(exc.status)
            if prepared is not None:  # a constraint vLLM rejected: name the client's field
                exc = guided.name_param(exc, prepared.params.guided_param)
            return error_response(exc)
        except asyncio.CancelledError:  # the client went away (handler cancellation)
            tracker.finish(CLIENT_CLOSED)
            raise
        except Exception as exc:  # a frontend bug: answer 500, log it, keep serving everyone else
            log.exception("%s request failed", endpoint)
            tracker.finish(500)
            return error_response(internal(f"internal error: {type(exc).__name__}: {exc}"))

    async def _read_body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(
                413,
                f"the request body is larger than {self.max_request_bytes} bytes (see --max-request-bytes)",
                code="request_too_large",
            ) from None

    async def _prepare(self, body: bytes, endpoint: str, tracker: RequestTracker) -> _Prepared:
        shape_cls: type[ResponseShape]
        chat: RequestParsing | None = None
        if endpoint == "completions":
            req: Any = parse_completion(body)
            refuse_unimplemented(body, endpoint)
            params = generation_params(req)
            prompt = completion_prompt(req)
            prompt_param, shape_cls = "prompt", CompletionShape
        else:
            req = parse_chat(body)
            refuse_unimplemented(body, endpoint)
            params = generation_params(req)
            self.chat_parsers.check(req)
            if multimodal.has_media(req):
                multimodal.refuse_text_only_fields(req)  # the processor renders the prompt: refuse, not drop
                return await self._prepare_media(body, req, params, tracker)
            messages = chat_messages(req)
            prompt_param, shape_cls = "messages", ChatShape
        tracker.request_type = "stream" if params.stream else "unary"
        model = await self.table.resolve_request(req.model)
        tracker.set_model(model.name)
        tokenizer = await self.table.tokenizer(model)
        if endpoint == "completions":
            prompt_ids = preprocess.encode_completion_prompt(tokenizer, prompt, req.add_special_tokens)
        else:
            chat = self.chat_parsers.for_request(req, body, tokenizer)
            if chat is not None:
                params = chat.adjust(params)  # tool_choice required/named: vLLM's schema constraint
            prompt_ids = preprocess.encode_chat_prompt(
                tokenizer,
                model.name,
                messages,
                add_generation_prompt=req.add_generation_prompt,
                continue_final_message=req.continue_final_message,
                add_special_tokens=req.add_special_tokens,
                tools=template_tools(req),
                chat_template_kwargs=req.chat_template_kwargs,
            )
        _check_token_ids(tokenizer, params)
        self.limits.check_prompt(len(prompt_ids), prompt_param)
        max_tokens = preprocess.resolve_max_tokens(model, len(prompt_ids), params)
        requested = params.max_tokens if params.max_tokens_given else None  # a default is capped, not refused
        max_tokens = self.limits.check_max_tokens(requested, max_tokens, params.max_tokens_param)
        payload = preprocess.preprocessed_request(model, prompt_ids, params, max_tokens)
        tracker.prompt(len(prompt_ids))
        shape = shape_cls(model.name, TokenStrings(tokenizer), params.include_usage)
        if endpoint != "completions" and not req.add_generation_prompt:
            shape.role = req.messages[-1].role  # the answer continues the last message (vllm serve's role)
        echo = ""
        if endpoint == "completions" and req.echo:  # the prompt as given, or its token ids decoded
            echo = prompt if isinstance(prompt, str) else str(tokenizer.decode(prompt_ids))
        return _Prepared(model, tokenizer, prompt_ids, params, payload, shape, echo=echo, chat=chat)

    async def _prepare_media(
        self, body: bytes, req: ChatRequest, params: GenerationParams, tracker: RequestTracker
    ) -> _Prepared:
        """A chat request with image/video parts: a processor tokenizes and encodes it."""
        tracker.request_type = "stream" if params.stream else "unary"
        model = await self.table.resolve_request(req.model)
        tracker.set_model(model.name)
        multimodal.refuse_text_only_model(req, model)  # vllm serve: a 400, whatever else is running
        if self.media is None:
            raise unavailable("this frontend routes no multimodal requests", code="no_processor")
        self.media.check(model.name)
        tokenizer = await self.table.tokenizer(model)
        _check_token_ids(tokenizer, params)
        shape = ChatShape(model.name, TokenStrings(tokenizer), params.include_usage)
        return _Prepared(
            model, tokenizer, [], params, self.media.payload(body, model, params), shape, router=self.media.router
        )

    def _choices(self, p: _Prepared) -> ChoiceStreams:
        """The request's n choices as n worker streams (dynamo_worker.frontend.choices)."""
        router = p.router or self.router
        return ChoiceStreams(
            lambda payload: router.generate(p.model.name, payload), choice_payloads(p.payload, p.params.n)
        )

    @staticmethod
    def _shapes(p: _Prepared) -> list[ResponseShape]:
        """One response shape per choice (a completion's text_offset runs per choice), sharing the id."""
        return [p.shape] + [p.shape.for_choice() for _ in range(p.params.n - 1)]

    @staticmethod
    def _echo_logprobs(p: _Prepared, out: OutputProcessor) -> list[TokenLogprob]:
        """Completions with echo and logprobs: the prompt's, which lead the choice's (vLLM's order)."""
        if not p.echo or p.params.logprobs is None:
            return []
        return echo_logprobs(out.prompt_logprobs, p.prompt_ids, p.params.logprobs)

    async def _unary(self, p: _Prepared, tracker: RequestTracker) -> web.Response:
        n = p.params.n
        outs = [OutputProcessor(p.tokenizer, p.prompt_ids, p.params) for _ in range(n)]
        texts: list[list[str]] = [[p.echo] for _ in range(n)]
        logprobs: list[list[TokenLogprob]] | None = [[] for _ in range(n)] if p.params.logprobs is not None else None
        token_ids: list[list[int]] = [[] for _ in range(n)]  # for vLLM's reasoning/tool parsers
        choices = self._choices(p)
        async with aclosing(choices.items()) as stream:
            async for i, item in stream:
                out = outs[i]
                if item is None:  # the worker ended the stream without a finish reason
                    texts[i].append(out.end_of_stream().text)
                    continue
                delta = out.process(item)
                tracker.tokens(delta.tokens)
                texts[i].append(delta.text)
                token_ids[i].extend(delta.token_ids)
                if logprobs is not None and delta.logprobs:
                    logprobs[i].extend(delta.logprobs)
                if out.finished:
                    choices.stop(i)  # a stop string: the rest is cancelled on the worker
        usage = merged_usage(outs)
        bodies = []
        for i, (shape, out) in enumerate(zip(self._shapes(p), outs, strict=True)):
            assert out.finish_reason is not None
            lps = None if logprobs is None else self._echo_logprobs(p, out) + logprobs[i]
            body = shape.full("".join(texts[i]), out.finish_reason, lps, usage)
            body["choices"][0]["stop_reason"] = out.stop_reason  # vllm serve: on every choice, often null
            if p.chat is not None:  # reasoning and tool calls, by a parser of its own per choice (as vLLM)
                p.chat.choice().rewrite_choice(body["choices"][0], "".join(texts[i]), token_ids[i])
                if isinstance(shape, ChatShape):  # the parser writes "assistant"; continuing a message keeps its role
                    body["choices"][0]["message"]["role"] = shape.role
            if p.params.prompt_logprobs is not None:  # vllm serve: per choice on completions, once on chat
                where = body["choices"][0] if isinstance(shape, CompletionShape) else body
                where["prompt_logprobs"] = prompt_logprobs_body(out.prompt_logprobs, shape.token_text)
            bodies.append(body)
        body = bodies[0]
        body["choices"] = [_indexed(b, i)["choices"][0] for i, b in enumerate(bodies)]
        tracker.finish(200, usage["completion_tokens"])
        return json_response(body)

    async def _stream(self, request: web.Request, p: _Prepared, tracker: RequestTracker) -> web.StreamResponse:
        outs = [OutputProcessor(p.tokenizer, p.prompt_ids, p.params) for _ in range(p.params.n)]
        shapes = self._shapes(p)
        echo_pending = [bool(p.echo)] * p.params.n
        parsers = [p.chat.choice() for _ in range(p.params.n)] if p.chat is not None else None
        resp: web.StreamResponse | None = None
        # The events of one wake-up leave in one write, and the last ones with the end of the
        # body: a client that stops reading at [DONE] then finds the body complete and reuses
        # its connection (measured: 4-6% of connections were dropped and reopened otherwise).
        events: list[bytes] = []

        def event(obj: Any) -> None:
            events.append(b"data: " + _encode(obj) + b"\n\n")

        async def send() -> None:
            assert resp is not None
            if events:
                await resp.write(b"".join(events))
                events.clear()

        async def start() -> web.StreamResponse:
            r = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await r.prepare(request)
            for i, shape in enumerate(shapes):  # e.g. chat's role chunk, for every choice (vLLM's)
                for chunk in shape.first_chunks():
                    if p.params.continuous_usage:  # vllm serve: the role chunk has usage too, no tokens yet
                        chunk["usage"] = usage_body(outs[i].prompt_tokens, 0, None)
                    event(_indexed(chunk, i))
            return r

        def completion_tokens() -> int:
            return sum(o.completion_tokens for o in outs)

        choices = self._choices(p)
        try:
            async with aclosing(choices.items()) as stream:
                async for i, item in stream:
                    out = outs[i]
                    if item is None:  # the worker ended the stream without a finish reason
                        delta = out.end_of_stream()
                    else:
                        delta = out.process(item)
                        tracker.tokens(delta.tokens)
                    if resp is None:
                        resp = await start()
                    text, logprobs = delta.text, delta.logprobs
                    if echo_pending[i]:  # the prompt (and its logprobs) lead the choice's first chunk
                        echo_pending[i] = False
                        text = p.echo + text
                        if p.params.logprobs is not None:
                            logprobs = self._echo_logprobs(p, out) + (logprobs or [])
                    emit = bool(text or logprobs or delta.finish_reason)
                    if parsers is not None:  # reasoning and tool calls: vLLM's parser decides the delta
                        parsed = parsers[i].delta(text, list(delta.token_ids), p.prompt_ids, delta.finish_reason)
                        emit = bool(parsed is not None or logprobs or delta.finish_reason)
                    if emit:
                        chunk = _indexed(shapes[i].chunk(text, delta.finish_reason, logprobs), i)
                        if parsers is not None:
                            parsers[i].rewrite_chunk_choice(chunk["choices"][0], parsed)
                        if delta.finish_reason is not None or isinstance(shapes[i], CompletionShape):
                            # vllm serve: on every completions chunk (null until the last), on chat's last
                            chunk["choices"][0]["stop_reason"] = out.stop_reason
                        if p.params.continuous_usage:  # stream_options.continuous_usage_stats
                            chunk["usage"] = usage_body(out.prompt_tokens, out.completion_tokens, None)
                        event(chunk)
                    if out.finished:
                        choices.stop(i)  # a stop string: closing its stream cancels the rest on the worker
                    if choices.live:  # the last events leave with the end of the body
                        await send()
            assert resp is not None  # every choice ends in a message above
            if p.params.include_usage:
                event(p.shape.usage_chunk(merged_usage(outs)))
            events.append(_SSE_DONE)
            await resp.write_eof(b"".join(events))
        except ApiError as exc:
            if resp is None:
                raise  # nothing sent yet: a plain HTTP error
            log.warning("stream of model %s failed after output began: %r", p.model.name, exc)
            try:
                event(exc.body())
                await resp.write_eof(b"".join(events))
            except ConnectionResetError:
                pass
            tracker.finish(exc.status, completion_tokens())
            return resp
        except ConnectionResetError:  # the client closed the connection while we wrote to it
            tracker.finish(CLIENT_CLOSED, completion_tokens())
            assert resp is not None
            return resp
        tracker.finish(200, completion_tokens())
        return resp


def _check_token_ids(tokenizer: Any, params: GenerationParams) -> None:
    """The token ids a request names are in the model's vocabulary (a 400 naming the field)."""
    preprocess.check_stop_token_ids(
        tokenizer, params.stop_token_ids, list(params.logit_bias or ()), params.allowed_token_ids or ()
    )


def _indexed(body: dict[str, Any], index: int) -> dict[str, Any]:
    """A response body (or chunk) of choice ``index``."""
    for choice in body["choices"]:
        choice["index"] = index
    return body
