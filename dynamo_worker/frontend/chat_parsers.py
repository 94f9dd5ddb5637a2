"""Tools and reasoning on chat completions, the way ``vllm serve`` does them, with vLLM's parsers.

Request side (pure, no vLLM import): :func:`check_tools` applies ``vllm serve``'s rules for
``tools`` and ``tool_choice`` (``tools`` without ``tool_choice`` means ``auto``; ``auto`` needs
``--enable-auto-tool-choice`` and ``--tool-call-parser``; ``required`` and a named function need
a tool parser, which vLLM only loads with ``--enable-auto-tool-choice``), and
:func:`template_tools` gives the ``tools=`` the chat template is rendered with.

With ``--tool-call-parser``/``--reasoning-parser`` set, :class:`ChatParsers` composes vLLM's
own parser for those names (``vllm.parser.ParserManager``, which is what ``vllm serve`` uses)
and each chat request gets a :class:`RequestParsing` holding vLLM's ``ChatCompletionRequest``
and a parser instance:

* ``adjust_request`` (vLLM's) turns ``tool_choice`` ``required`` or a named function into a JSON
  schema built from the tools; it is sent to the worker as ``guided_decoding`` so the engine
  can only produce a valid call, exactly as ``vllm serve`` constrains it;
* ``parse`` (non-streamed) and ``parse_delta`` (streamed) split the output into
  ``reasoning``, ``content`` and ``tool_calls``.

Reasoning is returned as vLLM 0.32 names it (``reasoning``) and under Dynamo's (and older
vLLM's) name ``reasoning_content``, so clients of either find it.

vLLM is imported only when a parser flag is set, at start-up (the parsers pull in vLLM and
torch; the frontend otherwise runs without them).
"""

from __future__ import annotations

from typing import Any

import attrs
import msgspec

from dynamo_worker.core.errors import UsageError
from dynamo_worker.frontend.protocol import ChatRequest, GenerationParams, bad_request, internal, template_tool_list

TOOL_CHOICES = ("none", "auto", "required")
# The client field a tool-call constraint comes from (named in a worker's 400 about it).
GUIDED_PARAM = "tools"


def check_parser_names(tool_call_parser: str | None, reasoning_parser: str | None) -> None:
    """Start-up: each name is one of vLLM's registered parsers; a UsageError naming the flag if not."""
    if tool_call_parser:
        from vllm.tool_parsers import ToolParserManager

        known = ToolParserManager.list_registered()
        if tool_call_parser not in known:
            raise UsageError(
                f"--tool-call-parser {tool_call_parser!r} is not one of vLLM's tool parsers; "
                f"use one of: {', '.join(known)}"
            )
    if reasoning_parser:
        from vllm.reasoning import ReasoningParserManager

        known = ReasoningParserManager.list_registered()
        if reasoning_parser not in known:
            raise UsageError(
                f"--reasoning-parser {reasoning_parser!r} is not one of vLLM's reasoning "
                f"parsers; use one of: {', '.join(known)}"
            )


def tool_names(req: ChatRequest) -> list[str]:
    """The function names of ``tools``; a 400 naming the bad entry if a tool is malformed."""
    names = []
    for i, tool in enumerate(req.tools or ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad_request('each tool must be {"type": "function", "function": {"name": ...}}', param=f"tools[{i}]")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request("a tool's function needs a non-empty name", param=f"tools[{i}].function.name")
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(
                "a tool's function parameters must be a JSON schema object", param=f"tools[{i}].function.parameters"
            )
        names.append(name)
    return names


def check_tools(req: ChatRequest, *, tool_parsing: bool, auto_enabled: bool) -> str | dict[str, Any] | None:
    """``vllm serve``'s checks of ``tools``/``tool_choice``; returns the effective ``tool_choice``.

    ``tool_parsing``: a tool parser is loaded (vLLM loads one only with both
    ``--enable-auto-tool-choice`` and ``--tool-call-parser``).
    """
    if req.tools is not None and not req.tools:
        raise bad_request(
            "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely.",
            param="tools",
        )
    names = tool_names(req)
    choice = req.tool_choice
    if choice is None and req.tools:
        choice = "auto"  # vllm serve's (and OpenAI's) default when tools are given
    if choice is None or choice == "none":
        return choice
    if not req.tools:
        raise bad_request("When using `tool_choice`, `tools` must be set.", param="tool_choice")
    usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
    if isinstance(choice, dict):
        function = choice.get("function")
        if not isinstance(function, dict):
            raise bad_request(
                f"Invalid value for `function`: `{function}` in `tool_choice`! {usage}", param="tool_choice.function"
            )
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise bad_request(
                f"Invalid `name` in `function`: `{name}` in `tool_choice`! {usage}", param="tool_choice.function.name"
            )
        if name not in names:
            raise bad_request(
                "The tool specified in `tool_choice` does not match any of the specified `tools`", param="tool_choice"
            )
    elif choice not in TOOL_CHOICES:
        raise bad_request(
            f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or "required" are supported.',
            param="tool_choice",
        )
    if not tool_parsing:
        # vllm serve's renderer: without a tool parser nothing could turn the output into calls
        if choice == "auto":
            if not auto_enabled:
                raise bad_request(
                    '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set',
                    param="tool_choice",
                )
        else:
            desc = f'function "{choice["function"]["name"]}"' if isinstance(choice, dict) else f'"{choice}"'
            raise bad_request(f"tool_choice={desc} requires --tool-call-parser to be set", param="tool_choice")
    return choice


def template_tools(req: ChatRequest) -> list[dict[str, Any]] | None:
    """The ``tools=`` for the chat template: every tool, also with ``tool_choice`` ``none``, as vLLM
    renders them (through its tool type: :func:`~dynamo_worker.frontend.protocol.template_tool`)."""
    return template_tool_list(req.tools) if req.tools else None


class ChatParsers:
    """vLLM's composed reasoning/tool parser class for the frontend's flags (None: no parsing)."""

    def __init__(
        self, tool_call_parser: str | None = None, reasoning_parser: str | None = None, enable_auto_tools: bool = False
    ) -> None:
        self.enable_auto_tools = enable_auto_tools
        self.names = ", ".join(
            f"{flag} {name}"
            for flag, name in (("--tool-call-parser", tool_call_parser), ("--reasoning-parser", reasoning_parser))
            if name
        )
        self.parser_cls: Any = None
        if tool_call_parser or reasoning_parser:
            check_parser_names(tool_call_parser, reasoning_parser)
            from vllm.parser import ParserManager

            self.parser_cls = ParserManager.get_parser(
                tool_parser_name=tool_call_parser or None,
                reasoning_parser_name=reasoning_parser or None,
                enable_auto_tools=enable_auto_tools,
            )

    @classmethod
    def from_options(cls, options: Any) -> ChatParsers:
        return cls(
            getattr(options, "tool_call_parser", None),
            getattr(options, "reasoning_parser", None),
            bool(getattr(options, "enable_auto_tool_choice", False)),
        )

    @property
    def tool_parsing(self) -> bool:
        return self.parser_cls is not None and self.parser_cls.tool_parser_cls is not None

    def check(self, req: ChatRequest) -> str | dict[str, Any] | None:
        return check_tools(req, tool_parsing=self.tool_parsing, auto_enabled=self.enable_auto_tools)

    def for_request(self, req: ChatRequest, body: bytes, tokenizer: Any) -> RequestParsing | None:
        """The request's parsing; None when there is nothing to parse (no parser flag, or only a tool
        parser and no tools: vLLM's then returns the text as it is). A 400 if vLLM's request model
        refuses the body."""
        if self.parser_cls is None or (not req.tools and self.parser_cls.reasoning_parser_cls is None):
            return None
        return RequestParsing(self, body, tokenizer)


def _tool_call_id() -> str:
    from vllm.renderers.chat_utils import make_tool_call_id

    return str(make_tool_call_id())


def _refusal(exc: Any) -> Exception:
    """A pydantic refusal of vLLM's request model as a 400: its message and the field it names
    (a ValueError raised in one of vLLM's validators comes wrapped, as ``ctx.error``)."""
    errors = exc.errors()
    if not errors:
        return bad_request(str(exc))
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    loc = ".".join(str(part) for part in first.get("loc", ()))
    if isinstance(cause, Exception):
        return bad_request(str(cause), param=getattr(cause, "parameter", None) or loc or None)
    return bad_request(f"{first['msg']}" + (f" (parameter {loc})" if loc else ""), param=loc or None)


class RequestParsing:
    """One chat request's vLLM request object and parser: constraints in, reasoning/tool calls out."""

    def __init__(self, parsers: ChatParsers, body: bytes, tokenizer: Any) -> None:
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import (
            ChatCompletionNamedToolChoiceParam,
            ChatCompletionRequest,
        )
        from vllm.exceptions import VLLMValidationError

        self.enable_auto_tools = parsers.enable_auto_tools
        try:
            request = ChatCompletionRequest.model_validate(msgspec.json.decode(body))
        except ValidationError as exc:  # vllm serve's 400 for the same body, with the field it names
            raise _refusal(exc) from None
        except VLLMValidationError as exc:  # raised by vLLM's validators, not wrapped by pydantic
            raise bad_request(str(exc), param=exc.parameter) from None
        self._parsers, self._tokenizer, self.request = parsers, tokenizer, request
        parser = self._new_parser()
        before = request.structured_outputs
        # vllm serve's renderer: adjust when tools may be called or reasoning is parsed
        if parser.reasoning_parser is not None or request.tool_choice != "none":
            self.request = parser.adjust_request(request)
        self._constraint = self.request.structured_outputs if self.request.structured_outputs is not before else None
        self.named = isinstance(self.request.tool_choice, ChatCompletionNamedToolChoiceParam)
        self.required = self.request.tool_choice == "required"

    def _new_parser(self) -> Any:
        try:
            return self._parsers.parser_cls(
                self._tokenizer,
                self.request.tools,
                chat_template_kwargs=self.request.chat_template_kwargs,
                model_config=None,
            )
        except Exception as exc:  # a parser that needs tokens this model's tokenizer lacks: a server setup error
            raise internal(
                f"the configured parser ({self._parsers.names}) cannot parse this model's output: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def choice(self) -> ChoiceParsing:
        """A parser for one choice: vLLM's parsers keep per-stream state, so one per choice (as vLLM)."""
        return ChoiceParsing(self, self._new_parser())

    def adjust(self, params: GenerationParams) -> GenerationParams:
        """The generation parameters with the tool-call constraint vLLM's adjust_request set."""
        changes: dict[str, Any] = {"skip_special_tokens": bool(self.request.skip_special_tokens)}
        so = self._constraint
        if so is not None:
            spec = {
                k: getattr(so, k)
                for k in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
                if getattr(so, k, None) is not None
            }
            if spec:
                # vLLM replaces any response_format by the tool schema; so do we
                changes.update(guided=spec, guided_param=GUIDED_PARAM)
        return attrs.evolve(params, **changes)


class ChoiceParsing:
    """One choice's output to reasoning, content and tool calls, as vllm serve returns them."""

    def __init__(self, request: RequestParsing, parser: Any) -> None:
        self.parser = parser
        self.request = request.request
        self.enable_auto_tools = request.enable_auto_tools
        self.named, self.required = request.named, request.required
        self.tools_streamed = False
        self._prompt_ids_given = False

    def _reasoning_fields(self, reasoning: str | None) -> dict[str, Any]:
        if self.parser.reasoning_parser is None:
            return {}
        return {"reasoning": reasoning, "reasoning_content": reasoning}

    def rewrite_choice(self, choice: dict[str, Any], text: str, token_ids: list[int]) -> None:
        """A non-streamed choice (``message``, ``finish_reason``) with the output parsed."""
        choice["message"], choice["finish_reason"] = self.message(text, token_ids, choice["finish_reason"])

    def rewrite_chunk_choice(self, choice: dict[str, Any], delta: dict[str, Any] | None) -> None:
        """A streamed choice with :meth:`delta`'s parsed delta and vllm serve's finish reason."""
        choice["delta"] = delta or {}
        choice["finish_reason"] = self.stream_finish_reason(choice["finish_reason"])

    def message(self, text: str, token_ids: list[int], finish_reason: str) -> tuple[dict[str, Any], str]:
        """The non-streamed assistant message and finish reason (``tool_calls`` as vllm serve sets it)."""
        reasoning, content, calls = self.parser.parse(
            text, self.request, enable_auto_tools=self.enable_auto_tools, model_output_token_ids=token_ids
        )
        if not self.request.include_reasoning:
            reasoning = None
        calls = list(calls or [])
        if self.request.parallel_tool_calls is False:
            calls = calls[:1]
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if (self.named or self.required) and content is None:
            message["content"] = ""  # vllm serve: content "" beside forced calls
        if calls:
            message["tool_calls"] = [
                {
                    "id": call.id or _tool_call_id(),
                    "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments},
                }
                for call in calls
            ]
        message.update(self._reasoning_fields(reasoning))
        auto_called = bool(calls) and not (self.named or self.required) and self.request.tool_choice != "none"
        if auto_called or (self.required and finish_reason == "stop"):
            finish_reason = "tool_calls"
        return message, finish_reason

    def delta(
        self, text: str, token_ids: list[int], prompt_ids: list[int], finish_reason: str | None
    ) -> dict[str, Any] | None:
        """One streamed delta as vllm serve sends it (None: nothing to send for these tokens)."""
        given = None if self._prompt_ids_given else prompt_ids
        self._prompt_ids_given = True
        msg = self.parser.parse_delta(
            text, list(token_ids), self.request, prompt_token_ids=given, finished=finish_reason is not None
        )
        if msg is None:
            return None
        if msg.tool_calls:
            self.tools_streamed = True
            if self.request.parallel_tool_calls is False:
                msg.tool_calls = [tc for tc in msg.tool_calls if tc.index == 0]
        out = msg.model_dump(exclude_unset=True, exclude_none=True)
        if "reasoning" in out:
            out["reasoning_content"] = out["reasoning"]
        return out

    def stream_finish_reason(self, finish_reason: str | None) -> str | None:
        """``tool_calls`` once calls were streamed (auto or required), as vllm serve reports it."""
        if finish_reason == "stop" and self.tools_streamed and not self.named:
            return "tool_calls"
        return finish_reason
