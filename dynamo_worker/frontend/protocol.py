"""The OpenAI wire format: request validation and response shapes.

Requests are decoded with msgspec Structs (types checked, unknown fields ignored as OpenAI's own
server does for forward compatibility), then checked for ranges and for features this frontend
does not implement: those get a 400 naming the parameter rather than being silently ignored.
Every failure is an :class:`ApiError`, which the HTTP layer turns into OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` shaped as ``vllm serve`` 0.32 fills it: ``type``
the exception's name (``BadRequestError``, ``NotFoundError``, ...), ``code`` the HTTP status.
"""

from __future__ import annotations

import copy
import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import msgspec

from dynamo_worker.core.generate import MAX_LOGPROBS, PLAIN_SAMPLING_FIELDS

# n choices are n worker requests (see app.py); OpenAI's own limit, where vLLM takes up to 16384.
MAX_N = 128
MAX_STOP_STRINGS = 32

# vllm serve's error `type` per status (vllm/entrypoints/serve/exception_handling): the status
# phrase as a class name, "Error" once at the end (BadRequestError, NotFoundError,
# UnprocessableEntityError, InternalServerError, ServiceUnavailableError, NotImplementedError). The
# statuses vLLM never answers with such a body (401, 405, 413, 429) follow the same rule. Written
# out rather than derived from http.HTTPStatus, whose phrase for 413 changed in Python 3.13.
ERROR_TYPES = {
    400: "BadRequestError",
    401: "UnauthorizedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    429: "TooManyRequestsError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """A request that cannot be served; ``status`` is the HTTP status it is answered with.

    ``code`` is our short reason (``no_worker``, ``context_length_exceeded``, ...) for the log and
    ``repr``; the body's ``code`` is the status, as vllm serve's, so a client tells errors apart by
    status, ``type`` and ``param`` (docs/frontend.md "Errors").
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.reason = code
        self.type = ERROR_TYPES.get(status, "InternalServerError" if status >= 500 else "BadRequestError")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, param={self.param!r}, reason={self.reason!r})"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def model_not_found(model: str, available: Sequence[str]) -> ApiError:
    known = ", ".join(sorted(available)) or "none"
    return ApiError(
        404, f"the model {model!r} does not exist; available models: {known}", param="model", code="model_not_found"
    )


def unavailable(message: str, code: str = "no_worker") -> ApiError:
    return ApiError(503, message, code=code)


def internal(message: str) -> ApiError:
    return ApiError(500, message, code="internal")


# ---- requests ---------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # usage on every chunk, as vLLM's extension


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a "tool" turn: the call it answers


class JsonSchema(msgspec.Struct):
    name: str | None = None
    description: str | None = None
    json_schema: Any = msgspec.field(default=None, name="schema")  # OpenAI's "schema"
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: JsonSchema | None = None


class _Common(msgspec.Struct, kw_only=True):
    """Fields both endpoints take. Extensions (as in vLLM): top_k, min_p, min_tokens,
    stop_token_ids, ignore_eos, repetition_penalty, skip_special_tokens, allowed_token_ids."""

    model: str | None = None  # left out: the one model served, as vllm serve (ModelTable.resolve_request)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None  # sampling_options.allowed_token_ids, checked against the vocabulary
    ignore_eos: bool = False
    min_tokens: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    # Structured outputs (see dynamo_worker.frontend.guided), on both endpoints as in vLLM.
    response_format: ResponseFormat | None = None
    structured_outputs: Any = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


# vLLM's CompletionRequest: max_tokens 16 when left out or null (its normalize_null_max_tokens).
COMPLETION_MAX_TOKENS = 16


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[Any]
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True  # a text prompt is encoded with the tokenizer's special tokens (BOS)


class ChatRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    # How the chat template renders the prompt (preprocess.encode_chat_prompt), vLLM's defaults.
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last message left open, for the model to continue
    add_special_tokens: bool = False  # special tokens on top of the template's own (a second BOS)
    chat_template_kwargs: dict[str, Any] | None = None


@attrs.frozen
class GenerationParams:
    """What both endpoints ask of the worker, validated and normalised."""

    max_tokens: int | None
    min_tokens: int | None
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    ignore_eos: bool
    sampling: dict[str, float | int]  # only the options the client set
    logprobs: int | None  # top-N alternatives per token (0: only the sampled token); None: off
    stream: bool
    include_usage: bool
    skip_special_tokens: bool
    max_tokens_param: str = "max_tokens"  # the name the client used, for error messages
    max_tokens_given: bool = True  # False: completions' default (16), which --max-completion-tokens caps
    continuous_usage: bool = False  # usage on every streamed chunk
    include_stop_str_in_output: bool = False
    guided: dict[str, Any] | None = None  # sampling_options.guided_decoding (vLLM's StructuredOutputsParams)
    guided_param: str | None = None  # the client field the constraint came from
    logit_bias: dict[int, float] | None = None
    n: int = 1  # choices: the frontend sends n requests (app.py)
    prompt_logprobs: int | None = None  # top-N per prompt token (echo with logprobs asks for them too)
    allowed_token_ids: tuple[int, ...] | None = None  # the only tokens the sampler may pick


_completion_decoder = msgspec.json.Decoder(CompletionRequest)
_chat_decoder = msgspec.json.Decoder(ChatRequest)
_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")


def decode_body(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    """A request body decoded into its Struct; a 400 naming the bad parameter otherwise."""
    return _decode(decoder, body)


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    if not body.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        match = _PATH.search(message)
        param = match.group("path") if match and match.group("path") else None
        if param is None and "missing required field" in message:
            param = message.rpartition("`")[0].rpartition("`")[2] or None
        return_message = _PATH.sub("", message)
        raise bad_request(f"{return_message}" + (f" (parameter {param})" if param else ""), param=param) from None
    except msgspec.DecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None


def parse_completion(body: bytes) -> CompletionRequest:
    req: CompletionRequest = _decode(_completion_decoder, body)
    if req.suffix:
        raise bad_request("suffix is not supported", param="suffix")
    if req.best_of not in (None, 1, req.n):  # vLLM 0.32 has no best_of; equal to n it changes nothing
        raise bad_request("best_of is not supported (vLLM 0.32 removed it); use n", param="best_of")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise bad_request(f"logprobs must be between 0 and {MAX_LOGPROBS}", param="logprobs")
    return req


def parse_chat(body: bytes) -> ChatRequest:
    req: ChatRequest = _decode(_chat_decoder, body)
    if not req.messages:
        raise bad_request("messages must not be empty", param="messages")
    if req.continue_final_message and req.add_generation_prompt:  # vLLM's words (check_generation_prompt)
        raise bad_request(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    # tools/tool_choice depend on the server's parser flags: checked by chat_parsers.check_tools
    if req.top_logprobs is not None:
        if not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs must be between 0 and {MAX_LOGPROBS}", param="top_logprobs")
        if not req.logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", param="top_logprobs")
    return req


def _check_range(
    name: str, value: float | None, low: float | None, high: float | None, *, low_open: bool = False
) -> None:
    if value is None:
        return
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and value > high
    if too_low or too_high:
        lo = "" if low is None else (f"greater than {low:g}" if low_open else f"at least {low:g}")
        hi = "" if high is None else f"at most {high:g}"
        raise bad_request(f"{name} must be {' and '.join(p for p in (lo, hi) if p)} (got {value:g})", param=name)


def generation_params(req: CompletionRequest | ChatRequest) -> GenerationParams:
    """Validate what both endpoints share; a 400 naming the parameter on the first problem."""
    n = 1 if req.n is None else req.n
    if not 1 <= n <= MAX_N:
        raise bad_request(f"n must be between 1 and {MAX_N} (got {n})", param="n")
    if n > 1 and req.temperature is not None and req.temperature < 1e-5:
        raise bad_request(f"n must be 1 when using greedy sampling, got {n}.", param="n")  # vLLM's words
    max_tokens, max_param = req.max_tokens, "max_tokens"
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
    max_tokens_given = max_tokens is not None
    if isinstance(req, CompletionRequest) and max_tokens is None:
        max_tokens = COMPLETION_MAX_TOKENS  # vllm serve's completions default, also for an explicit null
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{max_param} must be at least 1 (got {max_tokens})", param=max_param)
    if req.min_tokens is not None:
        if req.min_tokens < 0:
            raise bad_request(f"min_tokens must be 0 or more (got {req.min_tokens})", param="min_tokens")
        if max_tokens is not None and req.min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens ({req.min_tokens}) must not exceed {max_param} ({max_tokens})", param="min_tokens"
            )
    _check_range("temperature", req.temperature, 0, None)
    _check_range("top_p", req.top_p, 0, 1, low_open=True)
    _check_range("top_k", req.top_k, -1, None)
    _check_range("min_p", req.min_p, 0, 1)
    _check_range("presence_penalty", req.presence_penalty, -2, 2)
    _check_range("frequency_penalty", req.frequency_penalty, -2, 2)
    _check_range("repetition_penalty", req.repetition_penalty, 0, None, low_open=True)
    stop: tuple[str, ...] = ()
    if isinstance(req.stop, str):
        stop = (req.stop,)
    elif req.stop:
        stop = tuple(req.stop)
    if len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"at most {MAX_STOP_STRINGS} stop strings (got {len(stop)})", param="stop")
    if any(s == "" for s in stop):
        raise bad_request("stop strings must not be empty", param="stop")
    stop_ids = tuple(req.stop_token_ids or ())
    if any(t < 0 for t in stop_ids):
        raise bad_request("stop_token_ids must be non-negative token ids", param="stop_token_ids")
    allowed = None if req.allowed_token_ids is None else tuple(req.allowed_token_ids)
    if allowed is not None and not allowed:  # vLLM: "allowed_token_ids is not None and empty!"
        raise bad_request(
            "allowed_token_ids must not be empty; leave it out to allow every token", param="allowed_token_ids"
        )
    if allowed is not None and any(t < 0 for t in allowed):
        raise bad_request("allowed_token_ids must be non-negative token ids", param="allowed_token_ids")
    logit_bias: dict[int, float] = {}
    for key, bias in (req.logit_bias or {}).items():
        if not re.fullmatch(r"[0-9]+", key):
            raise bad_request(f"logit_bias keys must be token ids (got {key!r})", param="logit_bias")
        logit_bias[int(key)] = min(100.0, max(-100.0, bias))  # clamped as OpenAI and vLLM do
    sampling = {name: value for name in PLAIN_SAMPLING_FIELDS if (value := getattr(req, name)) is not None}
    if isinstance(req, ChatRequest):
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        logprobs = req.logprobs
    stream = bool(req.stream)
    if req.stream_options is not None and not stream:
        raise bad_request("stream_options can only be defined when `stream=True`", param="stream_options")
    prompt_logprobs = req.prompt_logprobs
    if prompt_logprobs is not None:
        if stream and prompt_logprobs != 0:
            raise bad_request("`prompt_logprobs` are not available when `stream=True`.", param="prompt_logprobs")
        if not 0 <= prompt_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}", param="prompt_logprobs")
        if stream:
            prompt_logprobs = None  # 0 while streaming: vllm serve accepts it and returns nothing
    elif isinstance(req, CompletionRequest) and req.echo:
        prompt_logprobs = req.logprobs  # echo with logprobs: the prompt's come first, as in vLLM
    # Imported here: guided builds on this module's errors and response_format type.
    from dynamo_worker.frontend.guided import guided_decoding

    guided, guided_param = guided_decoding(req, req.response_format)
    include_usage = stream and req.stream_options is not None and req.stream_options.include_usage
    return GenerationParams(
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=req.ignore_eos,
        sampling=sampling,
        logprobs=logprobs,
        stream=stream,
        include_usage=include_usage,
        skip_special_tokens=req.skip_special_tokens,
        max_tokens_param=max_param,
        max_tokens_given=max_tokens_given,
        continuous_usage=include_usage and req.stream_options is not None and req.stream_options.continuous_usage_stats,
        include_stop_str_in_output=req.include_stop_str_in_output,
        guided=guided,
        guided_param=guided_param,
        logit_bias=logit_bias or None,
        n=n,
        prompt_logprobs=prompt_logprobs,
        allowed_token_ids=allowed,
    )


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The one prompt of a completion request: text, or token ids."""
    prompt = req.prompt
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    if all(type(t) is int for t in prompt):
        return list(prompt)
    if len(prompt) > 1:
        raise bad_request(
            f"one prompt per request: got a list of {len(prompt)} prompts; send them as separate requests",
            param="prompt",
        )
    (only,) = prompt
    if isinstance(only, str):
        return only
    if isinstance(only, list) and only and all(type(t) is int for t in only):
        return list(only)
    raise bad_request("prompt must be a string, a list of token ids, or a list holding one of those", param="prompt")


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The messages as the chat template wants them: role and plain-text content."""
    return template_messages(req.messages)


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """:func:`chat_messages` of a message list (``/tokenize`` takes one too)."""
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if isinstance(msg.content, list):
            texts = []
            for j, part in enumerate(msg.content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"content part of type {part.type!r} is not supported: this frontend serves text only",
                        param=f"messages[{i}].content[{j}]",
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        else:
            content = msg.content or ""
        # vLLM's ConversationMessage (renderers/chat_utils._parse_chat_message_content), keys in
        # its order: tool_calls only on an assistant turn, tool_call_id only on a tool turn.
        entry: dict[str, Any] = {"role": msg.role, "content": content}
        if msg.role == "assistant" and msg.tool_calls:  # vLLM drops an empty list: the plain assistant path
            entry["tool_calls"] = [
                _template_tool_call(call, f"messages[{i}].tool_calls[{j}]") for j, call in enumerate(msg.tool_calls)
            ]
        if msg.role == "tool" and msg.tool_call_id is not None:
            entry["tool_call_id"] = msg.tool_call_id
        if msg.name is not None:
            entry["name"] = msg.name
        out.append(entry)
    return out


def _template_tool_call(call: dict[str, Any], param: str) -> dict[str, Any]:
    """An earlier tool call as vLLM hands it to chat templates: through its pydantic message type
    (OpenAI's ``ChatCompletionMessageToolCallParam``), so its keys come in that type's order,
    ``{"id", "function": {"arguments", "name"}, "type"}``, then any others as sent; and
    ``arguments`` as an object, not JSON text (``_postprocess_messages``, Transformers'
    convention): arguments that are not a JSON object become ``{}`` so a conversation with one
    bad turn can still continue.
    """
    function = call.get("function")
    if (
        call.get("type", "function") != "function"
        or not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
    ):
        raise bad_request(
            'an assistant tool call must be {"type": "function", "function": {"name": ..., "arguments": ...}}',
            param=param,
        )
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError:
            arguments = {}
    if not isinstance(arguments, dict):
        arguments = {}
    fn = {"arguments": arguments, "name": function["name"]}
    fn.update((k, v) for k, v in function.items() if k not in fn)
    out: dict[str, Any] = {"id": call["id"]} if "id" in call else {}
    out.update(function=fn, type="function")
    out.update((k, v) for k, v in call.items() if k not in out)
    return out


def template_tool(tool: Any, i: int) -> dict[str, Any]:
    """A ``tools`` entry as vLLM hands it to chat templates: ``ChatCompletionToolsParam.model_dump()``.

    ``{"type", "function": {"name", "description", "parameters"}}`` with ``description`` and
    ``parameters`` null when not given, ``strict``/``defer_loading`` only when set (a tool's
    ``defer_loading`` also on its function unless that has one), other keys dropped. A 400
    naming the entry when it is not a function tool of those types.
    """
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
        raise bad_request('each tool must be {"type": "function", "function": {"name": ...}}', param=f"tools[{i}]")
    types: dict[str, type] = {
        "name": str,
        "description": str,
        "parameters": dict,
        "strict": bool,
        "defer_loading": bool,
    }
    for key, kind in types.items():
        value = function.get(key)
        if (value is None and key == "name") or (value is not None and not isinstance(value, kind)):
            raise bad_request(
                f"a tool's function {key} must be {'a string' if key == 'name' else 'a ' + kind.__name__}",
                param=f"tools[{i}].function.{key}",
            )
    defer = tool.get("defer_loading")
    if defer is not None and not isinstance(defer, bool):
        raise bad_request("a tool's defer_loading must be a boolean", param=f"tools[{i}].defer_loading")
    fn: dict[str, Any] = {k: function.get(k) for k in ("name", "description", "parameters")}
    for key in ("strict", "defer_loading"):
        value = function.get(key, defer if key == "defer_loading" else None)
        if value is not None:
            fn[key] = value
    out: dict[str, Any] = {"type": "function", "function": fn}
    if defer is not None:
        out["defer_loading"] = defer
    return out


def template_tool_list(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    """:func:`template_tool` of each entry (None: no ``tools`` given)."""
    return None if tools is None else [template_tool(tool, i) for i, tool in enumerate(tools)]


# ---- responses --------------------------------------------------------------------------------


@attrs.frozen
class TokenLogprob:
    """One generated token's log-probability and its top alternatives (token id, logprob)."""

    token_id: int
    logprob: float | None  # None: the first prompt token (echo with logprobs), which has none
    top: tuple[tuple[int, float], ...] = ()
    # The tokens before it in its sequence (up to 4), which complete a token holding part of a
    # UTF-8 character as vLLM does (detokenizer.TokenStrings); None: the token's own decoding.
    context: tuple[int, ...] | None = None


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return usage


class ResponseShape:
    """Builds one endpoint's response bodies; subclasses fill in the endpoint's shapes."""

    object_full = ""
    object_chunk = ""
    id_prefix = ""

    def __init__(self, model: str, token_text: Callable[..., str], include_usage: bool = False) -> None:
        self.id = f"{self.id_prefix}{uuid.uuid4().hex}"
        self.model = model
        self.created = int(time.time())
        self.token_text = token_text
        self.include_usage = include_usage

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def for_choice(self) -> ResponseShape:
        """The shape of another choice of the same response (``n`` > 1): the same id and
        creation time; a subclass with per-choice state (a running offset) starts it afresh."""
        return copy.copy(self)

    def first_chunks(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, text: str, finish_reason: str | None, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
        raise NotImplementedError

    def full(
        self, text: str, finish_reason: str, logprobs: Sequence[TokenLogprob] | None, usage: dict[str, Any]
    ) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope(self.object_chunk, [])
        body["usage"] = usage
        return body

    def _chunk_body(self, choice: dict[str, Any]) -> dict[str, Any]:
        body = self._envelope(self.object_chunk, [choice])
        if self.include_usage:
            body["usage"] = None
        return body


class CompletionShape(ResponseShape):
    """``/v1/completions``: ``text_completion`` objects."""

    object_full = "text_completion"
    object_chunk = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._offset = 0  # text_offset of the next token (sum of the token texts before it)

    def for_choice(self) -> CompletionShape:
        shape = copy.copy(self)
        shape._offset = 0
        return shape

    def _logprobs(self, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        tokens, offsets = [], []
        for lp in logprobs:
            text = self.token_text(lp.token_id, lp.context)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [
                None if lp.logprob is None else {self.token_text(t, lp.context): v for t, v in lp.top}
                for lp in logprobs
            ],
            "text_offset": offsets,
        }

    def chunk(self, text: str, finish_reason: str | None, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
        return self._chunk_body(
            {"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}
        )

    def full(
        self, text: str, finish_reason: str, logprobs: Sequence[TokenLogprob] | None, usage: dict[str, Any]
    ) -> dict[str, Any]:
        body = self._envelope(
            self.object_full,
            [{"index": 0, "text": text, "logprobs": self._logprobs(logprobs), "finish_reason": finish_reason}],
        )
        body["usage"] = usage
        return body


class ChatShape(ResponseShape):
    """``/v1/chat/completions``: ``chat.completion`` and ``chat.completion.chunk`` objects."""

    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"
    id_prefix = "chatcmpl-"
    # The answer's role: vllm serve's "assistant", or without a generation prompt
    # (``add_generation_prompt: false``) the last message's, which the answer continues.
    role = "assistant"

    def _entry(self, token_id: int, logprob: float | None, context: tuple[int, ...] | None) -> dict[str, Any]:
        text = self.token_text(token_id, context)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        if logprobs is None:
            return None
        return {
            "content": [
                {
                    **self._entry(lp.token_id, lp.logprob, lp.context),
                    "top_logprobs": [self._entry(t, v, lp.context) for t, v in lp.top],
                }
                for lp in logprobs
            ]
        }

    def first_chunks(self) -> list[dict[str, Any]]:
        return [
            self._chunk_body(
                {"index": 0, "delta": {"role": self.role, "content": ""}, "logprobs": None, "finish_reason": None}
            )
        ]

    def chunk(self, text: str, finish_reason: str | None, logprobs: Sequence[TokenLogprob] | None) -> dict[str, Any]:
        return self._chunk_body(
            {
                "index": 0,
                "delta": {"content": text} if text else {},
                "logprobs": self._logprobs(logprobs),
                "finish_reason": finish_reason,
            }
        )

    def full(
        self, text: str, finish_reason: str, logprobs: Sequence[TokenLogprob] | None, usage: dict[str, Any]
    ) -> dict[str, Any]:
        body = self._envelope(
            self.object_full,
            [
                {
                    "index": 0,
                    "message": {"role": self.role, "content": text},
                    "logprobs": self._logprobs(logprobs),
                    "finish_reason": finish_reason,
                }
            ],
        )
        body["usage"] = usage
        return body
