"""Conformance with ``vllm serve``: the same requests to ``vllm serve`` and to our stack, compared.

One ``vllm serve`` and one stack (nats-server, a frontend, one decode worker) on the demo model,
each with the same engine flags and the same tool flags (``--enable-auto-tool-choice
--tool-call-parser pythonic``). They run one after the other, never together (two engines would
share the 2 cores): ``vllm serve`` starts, answers every case, stops; then our stack does the
same. Each case is then one test comparing the two answers:

* **acceptance**: the same HTTP status; for an error, both bodies are OpenAI's
  ``{"error": {"message", "type", "param", "code"}}``, ours with the OpenAI type of vLLM's
  (:data:`ERROR_TYPES`: vLLM names the exception class) and the same ``param`` where vLLM sets one;
* **shape**: the same set of key paths, recursively (list items merged, value types noted as
  null, bool, number, string, list or object), over the whole body or every streamed chunk; a key
  whose value is null counts as absent, since the ``openai`` client reads both as ``None``;
* **values**, for greedy (``temperature: 0``) and seeded requests: the same text per choice, the
  same finish reasons, usage, tool calls and logprobs (to 1e-3).

Requests go through the official ``openai`` client (errors too: its exception carries the
response); ``/tokenize``, ``/detokenize`` and ``/version`` through ``httpx``. Prompts are text, or
the token ids of a text, never random ids: a token-id prompt ending inside a UTF-8 character makes
vLLM's own detokenizer return another text (docs/frontend.md).

A difference that remains is an entry of :data:`KNOWN_DIFFERENCES` (or, for a key in every answer,
:data:`GLOBAL_SHAPE_DIFFERENCES`), asserted exactly (the test fails when it goes away, too) and a
row of docs/frontend.md's table "Compared with vllm serve", which the last test checks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import jsonschema
import openai
import pytest

from benchmarks.config import SERVED_NAME
from benchmarks.servers import VllmServe
from tests.helpers import NatsServer, WorkerProcess, free_port, wait_until, worker_env
from tests.test_structured_outputs import CODE, PERSON  # the same schema and regex as there

ROOT = Path(__file__).resolve().parent.parent
SERVED = SERVED_NAME  # "demo", the name benchmarks/servers.py gives vllm serve
TOOL_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "pythonic"]
# Room for tool definitions: the demo tokenizer (512 tokens) spends about one token per character
# of the tools' JSON in the prompt.
MAX_MODEL_LEN = 512  # the demo model's max_position_embeddings
ENGINE_FLAGS = ["--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "8"]

YES_NO = 'root ::= "yes" | "no"'
MESSAGES = [{"role": "user", "content": "Tell me a story about a cat."}]
PROMPT = "The quick brown fox"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOL_HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
]
LONG_PROMPT = "word " * (MAX_MODEL_LEN + 20)
GREEDY = {"temperature": 0}
STOP_TOKEN, STOP_TOKEN_TEXT = 453, " for"  # the second token greedy decoding answers MESSAGES with
# The demo model's weights are random: greedy constrained JSON is all whitespace, never closed;
# these seeds close PERSON within 120 tokens (as in tests/test_structured_outputs.py).
JSON_CHAT: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Describe a person as JSON."}],
    "temperature": 0.8,
    "seed": 3,
    "max_tokens": 120,
}
JSON_COMPLETION: dict[str, Any] = {"prompt": "The code is", "temperature": 0.8, "seed": 5, "max_tokens": 120}


@attrs.frozen
class Case:
    """One request. ``kind``: ``chat``, ``completion`` (openai client), or ``get``/``post`` (httpx)
    to ``path``. ``compare_values``: greedy or seeded, so both servers must produce the same output.
    ``check``: a validator of each choice's text (structured outputs), run on both answers."""

    name: str
    kind: str
    body: dict[str, Any]
    compare_values: bool = True
    path: str = ""
    check: Callable[[str], None] | None = None


def matches_schema(schema: dict[str, Any]) -> Callable[[str], None]:
    return lambda text: jsonschema.validate(json.loads(text), schema)


def matches_regex(pattern: str) -> Callable[[str], None]:
    def check(text: str) -> None:
        assert re.fullmatch(pattern, text), text

    return check


def one_of(*choices: str) -> Callable[[str], None]:
    def check(text: str) -> None:
        assert text in choices, text

    return check


def chat(name: str, compare_values: bool = True, check: Callable[[str], None] | None = None, **body: Any) -> Case:
    body = {"model": SERVED, "messages": MESSAGES, "max_tokens": 8, **GREEDY, **body}
    return Case(name, "chat", body, compare_values, check=check)


def completion(name: str, compare_values: bool = True, check: Callable[[str], None] | None = None, **body: Any) -> Case:
    body = {"model": SERVED, "prompt": PROMPT, "max_tokens": 8, **GREEDY, **body}
    return Case(name, "completion", body, compare_values, check=check)


NAMED = {"type": "function", "function": {"name": "get_weather"}}
TOOL_SAMPLING: dict[str, Any] = {"temperature": 0.8, "seed": 3, "max_tokens": 100}
SEEDED: dict[str, Any] = {"temperature": 0.8, "seed": 11}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

CASES: list[Case] = [
    # structured outputs (issue 19 item 2)
    chat("response_format json_schema", response_format=JSON_SCHEMA_FORMAT, **JSON_CHAT, check=matches_schema(PERSON)),
    chat(
        "response_format json_schema, streamed",
        response_format=JSON_SCHEMA_FORMAT,
        stream=True,
        **JSON_CHAT,
        check=matches_schema(PERSON),
    ),
    completion(
        "response_format json_schema on completions",
        extra_body={"response_format": JSON_SCHEMA_FORMAT},
        **JSON_COMPLETION,
        check=matches_schema(PERSON),
    ),
    chat("response_format json_object", response_format={"type": "json_object"}, max_tokens=12),
    chat(
        "structured_outputs json",
        extra_body={"structured_outputs": {"json": PERSON}},
        **JSON_CHAT,
        check=matches_schema(PERSON),
    ),
    completion(
        "structured_outputs json, streamed",
        extra_body={"structured_outputs": {"json": PERSON}},
        stream=True,
        **JSON_COMPLETION,
        check=matches_schema(PERSON),
    ),
    completion(
        "structured_outputs regex",
        extra_body={"structured_outputs": {"regex": CODE}},
        max_tokens=12,
        check=matches_regex(CODE),
    ),
    completion(
        "structured_outputs regex, streamed",
        extra_body={"structured_outputs": {"regex": CODE}},
        max_tokens=12,
        stream=True,
        check=matches_regex(CODE),
    ),
    chat(
        "structured_outputs choice",
        extra_body={"structured_outputs": {"choice": ["cat", "dog"]}},
        check=one_of("cat", "dog"),
    ),
    completion(
        "structured_outputs grammar", extra_body={"structured_outputs": {"grammar": YES_NO}}, check=one_of("yes", "no")
    ),
    chat("guided_json", extra_body={"guided_json": PERSON}, **JSON_CHAT),
    completion("guided_regex", extra_body={"guided_regex": CODE}, max_tokens=12),
    chat("guided_choice", extra_body={"guided_choice": ["cat", "dog"]}),
    completion("guided_grammar", extra_body={"guided_grammar": YES_NO}),
    # sampling and the rest of what clients send (item 4)
    chat("seed, top_k, min_p", **SEEDED, extra_body={"top_k": 20, "min_p": 0.05}),
    completion(
        "presence, frequency and repetition penalties",
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.3},
        max_tokens=12,
    ),
    chat("logit_bias", logit_bias={"300": 100}),
    completion(
        "stop with include_stop_str_in_output",
        stop=["e"],
        extra_body={"include_stop_str_in_output": True},
        max_tokens=16,
    ),
    completion("stop string", stop=["o", "a"], max_tokens=16),
    chat("stop_token_ids", extra_body={"stop_token_ids": [STOP_TOKEN]}),
    chat("stop string on chat", stop=[" as"]),
    # EOS (id 1) forced by logit_bias: min_tokens holds it off for 4 tokens
    completion("min_tokens before a forced EOS", extra_body={"min_tokens": 4}, logit_bias={"1": 100}),
    completion(
        "skip_special_tokens false",
        logit_bias={"1": 100},
        extra_body={"skip_special_tokens": False, "ignore_eos": True},
        max_tokens=3,
    ),
    chat("max_completion_tokens", max_completion_tokens=5, max_tokens=None),
    chat("logprobs with top_logprobs", logprobs=True, top_logprobs=3),
    completion("logprobs", logprobs=2),
    completion("echo", echo=True),
    completion("echo with logprobs", echo=True, logprobs=1),
    chat("user", user="client-7"),
    completion("token-id prompt (a text's ids)", prompt=None),  # ids filled in from the tokenizer
    chat("include_usage, streamed", stream=True, stream_options={"include_usage": True}),
    completion(
        "continuous_usage_stats, streamed",
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    ),
    chat(
        "continuous_usage_stats on chat, streamed",
        stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    ),
    chat("logprobs, streamed", stream=True, logprobs=True, top_logprobs=2),
    completion("stop string, streamed", stream=True, stop=["o"], max_tokens=16),
    chat("n=2 seeded", n=2, **SEEDED),
    completion("n=2 seeded, streamed", n=2, stream=True, **SEEDED),
    completion("prompt_logprobs", extra_body={"prompt_logprobs": 2}, max_tokens=2),
    chat("prompt_logprobs on chat", extra_body={"prompt_logprobs": 1}, max_tokens=2),
    # tools (item 3); seeded, since greedy constrained JSON from random weights never closes
    chat("tool_choice named", tools=[WEATHER], tool_choice=NAMED, **TOOL_SAMPLING),
    chat("tool_choice named, streamed", tools=[WEATHER], tool_choice=NAMED, stream=True, **TOOL_SAMPLING),
    chat("tool_choice required", tools=[WEATHER], tool_choice="required", **TOOL_SAMPLING),
    chat("tool_choice required, streamed", tools=[WEATHER], tool_choice="required", stream=True, **TOOL_SAMPLING),
    chat("tool_choice none", tools=[WEATHER], tool_choice="none"),
    chat("tool_choice auto", tools=[WEATHER], tool_choice="auto"),
    chat("tool_choice auto, streamed", tools=[WEATHER], stream=True),
    chat("a tool without a description", tools=[TIME]),
    chat("tool messages in the history", messages=TOOL_HISTORY, tools=[WEATHER]),
    # errors (item 5)
    chat("unknown model", model="no-such-model"),
    completion("unknown model on completions", model="no-such-model"),
    chat(
        "bad json schema",
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {"a": {"type": "no-such-type"}}}},
        },
    ),
    completion("invalid regex", extra_body={"structured_outputs": {"regex": "(["}}),
    completion("invalid grammar", extra_body={"structured_outputs": {"grammar": "root ::= ("}}),
    chat("stream_options without stream", stream_options={"include_usage": True}),
    chat("tool_choice without tools", tool_choice="required"),
    chat(
        "tool_choice naming a missing tool",
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "nope"}},
    ),
    completion("prompt too long", prompt=LONG_PROMPT),
    chat("chat prompt too long", messages=[{"role": "user", "content": LONG_PROMPT}]),
    completion("max_tokens over the context", max_tokens=MAX_MODEL_LEN),
    chat("n=2 greedy", n=2),
    completion("prompt_logprobs with stream", stream=True, extra_body={"prompt_logprobs": 1}),
    chat("top_logprobs over 20", logprobs=True, top_logprobs=21),
    # tokenizer routes
    Case("tokenize a prompt", "post", {"model": SERVED, "prompt": PROMPT}, path="/tokenize"),
    Case("tokenize messages", "post", {"model": SERVED, "messages": MESSAGES}, path="/tokenize"),
    Case(
        "tokenize messages with tools",
        "post",
        {"model": SERVED, "messages": MESSAGES, "tools": [WEATHER, TIME]},
        path="/tokenize",
    ),
    Case(
        "tokenize a tool history",
        "post",
        {"model": SERVED, "messages": TOOL_HISTORY, "tools": [WEATHER]},
        path="/tokenize",
    ),
    Case("detokenize", "post", {"model": SERVED, "tokens": [40, 41, 42, 300]}, path="/detokenize"),
    Case("version", "get", {}, compare_values=False, path="/version"),
]


@attrs.frozen
class Known:
    """A difference kept on purpose, asserted exactly (the test fails when it goes away too).

    ``aspect``: ``status`` (``vllm``/``ours``: the two HTTP statuses); ``param`` (both refuse the
    request, with these ``param``s); ``shape`` (the key paths only that side has); ``text``
    (vLLM ignores the field: ``ours`` is the validator our text passes); ``values`` (``ours``
    normalises both sides' :func:`values` to the same, and they must differ before it).
    ``row``: the first cell of its row in docs/frontend.md's table "Compared with vllm serve"."""

    aspect: str
    vllm: Any
    ours: Any
    row: str
    always: bool = True  # False: timing decides whether it shows in a run (then only normalised)


PARTIAL_TOKEN = Known(
    "values", '"" (no bytes)', lambda v: as_vllm_logprobs(v), "logprobs of a token holding part of a UTF-8 character"
)
STOP_STRING = (
    # The frontend counts every token of a worker message, also those after the match.
    Known(
        "values", "tokens up to the match", lambda v: {**v, "usage": None}, "usage after a stop string", always=False
    ),
)
NO_TEXT = {"text": None, "usage": None}
GUIDED = "`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`"
KNOWN_DIFFERENCES: dict[str, tuple[Known, ...]] = {
    "guided_json": (Known("text", "unconstrained", matches_schema(PERSON), GUIDED),),
    "guided_regex": (Known("text", "unconstrained", matches_regex(CODE), GUIDED),),
    "guided_choice": (Known("text", "unconstrained", one_of("cat", "dog"), GUIDED),),
    "guided_grammar": (Known("text", "unconstrained", one_of("yes", "no"), GUIDED),),
    "stop string": STOP_STRING,
    "stop with include_stop_str_in_output": STOP_STRING,
    "stop string, streamed": STOP_STRING,
    "stop string on chat": STOP_STRING,
    "continuous_usage_stats on chat, streamed": (
        Known(
            "values",
            "usage on the role chunk too",
            lambda v: {**v, "usage_in": "every chunk"},
            "`stream_options.continuous_usage_stats`",
        ),
    ),
    "logprobs with top_logprobs": (PARTIAL_TOKEN,),
    "logprobs": (PARTIAL_TOKEN,),
    "echo with logprobs": (PARTIAL_TOKEN,),
    "logprobs, streamed": (PARTIAL_TOKEN,),
    "prompt_logprobs": (PARTIAL_TOKEN,),
    "prompt_logprobs on chat": (PARTIAL_TOKEN,),
    # vLLM renders a tool through its own type: `"description": null` (16 more prompt tokens).
    "a tool without a description": (
        Known("values", "rendered with description null", lambda v: {**v, **NO_TEXT}, "a tool without `description`"),
    ),
    # vLLM renders an assistant's tool_calls through its own type: keys id, function, type.
    "tool messages in the history": (
        Known("values", "rendered in vLLM's key order", lambda v: {**v, **NO_TEXT}, "tool turns in `messages`"),
    ),
    "tokenize messages with tools": (
        Known(
            "values", "tools rendered", lambda v: {**v, "count": None, "tokens": None}, "`tools` in `POST /tokenize`"
        ),
    ),
    "tokenize a tool history": (
        Known(
            "values", "tools rendered", lambda v: {**v, "count": None, "tokens": None}, "`tools` in `POST /tokenize`"
        ),
    ),
    "top_logprobs over 20": (Known("param", "logprobs", "top_logprobs", "`top_logprobs` over 20"),),
    "version": (
        Known("shape", set(), {"dynamo_worker:string"}, "`POST /tokenize`, `POST /detokenize`, `GET /version`"),
    ),
}

# Differences in every answer, taken out of each comparison (test_the_global_differences_are_real
# checks they still exist): {key path: (the side that has it, its row in docs/frontend.md)}.
GLOBAL_SHAPE_DIFFERENCES = {
    "system_fingerprint:string": ("vllm", "`system_fingerprint`"),
    "usage.prompt_tokens_details:object": ("ours", "`usage.prompt_tokens_details`"),
    "usage.prompt_tokens_details.cached_tokens:number": ("ours", "`usage.prompt_tokens_details`"),
}
# vLLM 0.32 names an error's type after its exception class and puts the HTTP status in `code`;
# ours are OpenAI's types and codes (docs/frontend.md "Errors").
ERROR_TYPES = {"BadRequestError": "invalid_request_error", "NotFoundError": "invalid_request_error"}
ERROR_ROW = "error `type` / `code`"


@attrs.define
class Answer:
    """What one server answered: the status, the JSON body (or every streamed chunk's)."""

    status: int
    body: Any = None
    chunks: list[dict[str, Any]] = attrs.field(factory=list)


def send(client: openai.OpenAI, base: str, case: Case, token_prompt: list[int]) -> Answer:
    body = {k: v for k, v in case.body.items() if v is not None}
    if case.name.startswith("token-id prompt"):
        body["prompt"] = token_prompt
    if case.kind in ("get", "post"):
        resp = httpx.request(
            case.kind.upper(), base + case.path, json=body if case.kind == "post" else None, timeout=60
        )
        return Answer(resp.status_code, resp.json())
    create = client.chat.completions.create if case.kind == "chat" else client.completions.create
    try:
        if body.get("stream"):
            return Answer(200, chunks=[chunk.to_dict() for chunk in create(**body)])
        return Answer(200, create(**body).to_dict())
    except openai.APIStatusError as err:
        return Answer(err.status_code, err.response.json())


def ask_all(client: openai.OpenAI, base: str, token_prompt: list[int]) -> dict[str, Answer]:
    return {case.name: send(client, base, case, token_prompt) for case in CASES}


@pytest.fixture(scope="module")
def token_prompt(demo_model: str) -> list[int]:
    """PROMPT's token ids (with BOS), as both servers would encode it: a prompt of whole characters."""
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(demo_model, local_files_only=True).encode(PROMPT))


class ConformanceVllmServe(VllmServe):
    """``vllm serve`` with this module's engine and tool flags (benchmarks/servers.py starts and stops it)."""

    engine_flags = [*ENGINE_FLAGS, *TOOL_FLAGS]


def client_for(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def vllm_answers(
    demo_model: str, token_prompt: list[int], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Answer]:
    server = ConformanceVllmServe(demo_model, tmp_path_factory.mktemp("vllm-serve"), log=print)
    try:
        server.start(timeout=300)
        return ask_all(client_for(server.base_url), server.base_url, token_prompt)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def our_answers(
    vllm_answers: Any, nats_server: NatsServer, demo_model: str, token_prompt: list[int]
) -> dict[str, Answer]:
    """Started after ``vllm serve`` has stopped (``vllm_answers`` first)."""
    namespace, port = f"conf{free_port()}", free_port()
    common = ["--nats-url", nats_server.url, "--namespace", namespace]
    workers = [
        WorkerProcess(["--role", "frontend", *common, "--http-port", str(port), *TOOL_FLAGS]),
        WorkerProcess(
            ["--role", "decode", *common, "--model", demo_model, "--served-model-name", SERVED, *ENGINE_FLAGS],
            env=worker_env(),
        ),
    ]
    base = f"http://127.0.0.1:{port}"
    try:
        for worker in workers:
            worker.wait_for_log("serving", timeout=300)

        def served() -> bool:
            return SERVED in [m.id for m in client_for(base).models.list().data]

        wait_until(served, 30, interval=0.2, what="the frontend to list the model")
        return ask_all(client_for(base), base, token_prompt)
    finally:
        for worker in workers:
            worker.stop()


# -- comparing -----------------------------------------------------------------------------------

# Objects whose keys are data (token texts, token ids), not field names.
DATA_KEYED = re.compile(r"(^|\.)prompt_logprobs\[\]$|^choices\[\]\.logprobs\.top_logprobs\[\]$")


def kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    kinds: dict[type, str] = {str: "string", list: "list", dict: "object"}
    return kinds[type(value)]


def shape(value: Any, prefix: str = "") -> set[str]:
    """Every key path of ``value`` with its value's kind; list items merged under ``[]``; null = absent."""
    if value is None:
        return set()
    paths = {f"{prefix}:{kind_of(value)}"} if prefix else set()
    if isinstance(value, dict):
        for key, item in value.items():
            key = "<key>" if DATA_KEYED.search(prefix) else key
            paths |= shape(item, f"{prefix}.{key}" if prefix else key)
    elif isinstance(value, list):
        for item in value:
            paths |= shape(item, f"{prefix}[]")
    return paths


def answer_shape(answer: Answer) -> set[str]:
    return set().union(*(shape(part) for part in parts(answer)))


def parts(answer: Answer) -> list[dict[str, Any]]:
    """The streamed chunks, or the one body."""
    return answer.chunks or [answer.body]


def texts(answer: Answer) -> dict[int, str]:
    """Each choice's whole text (content on chat), streamed deltas joined."""
    out: dict[int, str] = {}
    for part in parts(answer):
        for choice in part.get("choices", []):
            piece = choice.get("text")
            if piece is None:
                piece = (choice.get("message") or choice.get("delta") or {}).get("content")
            out[choice["index"]] = out.get(choice["index"], "") + (piece or "")
    return out


def values(answer: Answer) -> dict[str, Any]:
    """What greedy and seeded requests must have alike: text, finish reasons, the final usage and
    which chunks carry one, tool calls, logprobs (rounded; streamed ones concatenated, since where
    a stream splits its chunks is not part of the contract), prompt logprobs; and the tokenizer
    routes' answers."""
    if answer.body is not None and "choices" not in answer.body:
        return answer.body  # /tokenize, /detokenize
    out: dict[str, Any] = {
        "text": texts(answer),
        "finish": {},
        "stop_reason": {},
        "usage": None,
        "tools": {},
        "logprobs": {},
        "prompt_logprobs": [],
    }
    with_usage = [bool(part.get("usage")) for part in parts(answer)]
    out["usage_in"] = "every chunk" if all(with_usage) else "last chunk" if with_usage[-1] else "some chunks"
    for part in parts(answer):
        if part.get("usage"):
            out["usage"] = {k: part["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
        if part.get("prompt_logprobs"):
            out["prompt_logprobs"].append(rounded(part["prompt_logprobs"]))
        for choice in part.get("choices", []):
            i = choice["index"]
            if choice.get("finish_reason"):
                out["finish"][i] = choice["finish_reason"]
                out["stop_reason"][i] = choice.get("stop_reason")
            if choice.get("logprobs"):
                merged = out["logprobs"].setdefault(i, {})
                for key, item in rounded(choice["logprobs"]).items():
                    merged[key] = merged.get(key, []) + item if isinstance(item, list) else item
            if choice.get("prompt_logprobs"):
                out["prompt_logprobs"].append(rounded(choice["prompt_logprobs"]))
            for call in (choice.get("message") or choice.get("delta") or {}).get("tool_calls") or []:
                fn = call.get("function") or {}
                entry = out["tools"].setdefault((i, call.get("index", 0)), {"name": "", "arguments": ""})
                entry["name"] += fn.get("name") or ""
                entry["arguments"] += fn.get("arguments") or ""
    return out


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


def as_vllm_logprobs(value: Any) -> Any:
    """Our logprobs as vLLM shows them: a token that is a lone U+FFFD (part of a character) as
    "" with no bytes, and completions' ``text_offset`` the running length of those texts."""
    if value == "\ufffd":
        return ""
    if isinstance(value, list):
        return [] if value == list("\ufffd".encode()) else [as_vllm_logprobs(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {as_vllm_logprobs(k): as_vllm_logprobs(v) for k, v in value.items()}
    if "text_offset" in out and out["text_offset"]:
        offsets = [out["text_offset"][0]]
        for token in out["tokens"][:-1]:
            offsets.append(offsets[-1] + len(token))
        out["text_offset"] = offsets
    return out


def assert_error_bodies_alike(vllm: Answer, ours: Answer, known: Known | None) -> None:
    for answer in (vllm, ours):
        assert set(answer.body) == {"error"}, answer.body
        assert {"message", "type", "param", "code"} <= set(answer.body["error"]), answer.body
    assert vllm.body["error"]["code"] == vllm.status  # ERROR_ROW: vLLM's code is the status
    assert ours.body["error"]["type"] == ERROR_TYPES[vllm.body["error"]["type"]]
    if known is not None and known.aspect == "param":
        assert (vllm.body["error"]["param"], ours.body["error"]["param"]) == (known.vllm, known.ours)
    elif vllm.body["error"]["param"] is not None:
        assert ours.body["error"]["param"] == vllm.body["error"]["param"]


def without_global_differences(paths: set[str]) -> set[str]:
    return paths - set(GLOBAL_SHAPE_DIFFERENCES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_same_answer_as_vllm_serve(
    case: Case, vllm_answers: dict[str, Answer], our_answers: dict[str, Answer]
) -> None:
    vllm, ours = vllm_answers[case.name], our_answers[case.name]
    known = {k.aspect: k for k in KNOWN_DIFFERENCES.get(case.name, ())}
    if "status" in known:
        assert (vllm.status, ours.status) == (known["status"].vllm, known["status"].ours), (vllm.body, ours.body)
        return
    assert ours.status == vllm.status, (vllm.body, ours.body)
    if vllm.status != 200:
        assert_error_bodies_alike(vllm, ours, known.get("param"))
        return
    vllm_shape = without_global_differences(answer_shape(vllm))
    our_shape = without_global_differences(answer_shape(ours))
    expected = (known["shape"].vllm, known["shape"].ours) if "shape" in known else (set(), set())
    assert (vllm_shape - our_shape, our_shape - vllm_shape) == expected
    if "text" in known:
        for text in texts(ours).values():
            known["text"].ours(text)  # ours is constrained...
        assert texts(vllm) != texts(ours)  # ... vLLM's is not
        return
    if case.check is not None:
        for answer in (vllm, ours):
            for text in texts(answer).values():
                case.check(text)
    if case.compare_values:
        if "values" in known:
            if known["values"].always:
                assert values(ours) != values(vllm)
            assert known["values"].ours(values(ours)) == known["values"].ours(values(vllm))
        else:
            assert values(ours) == values(vllm)


def test_the_stop_token_case_stops_on_its_token(our_answers: dict[str, Answer]) -> None:
    """The stop_token_ids case compares a text cut before a token that has text (vLLM leaves it
    out): it proves nothing unless the answer stopped there, which its stop_reason says."""
    assert values(our_answers["stop_token_ids"])["stop_reason"] == {0: STOP_TOKEN}
    assert STOP_TOKEN_TEXT.strip()


def test_the_global_differences_are_real(vllm_answers: dict[str, Answer], our_answers: dict[str, Answer]) -> None:
    """Each path of GLOBAL_SHAPE_DIFFERENCES is in no answer of the other side, and in some of its own."""
    seen: set[str] = set()
    for case in CASES:
        sides = {"vllm": answer_shape(vllm_answers[case.name]), "ours": answer_shape(our_answers[case.name])}
        for path, (side, _row) in GLOBAL_SHAPE_DIFFERENCES.items():
            assert path not in sides["ours" if side == "vllm" else "vllm"], (case.name, path)
            if path in sides[side]:
                seen.add(path)
    assert seen == set(GLOBAL_SHAPE_DIFFERENCES)


def test_every_known_difference_is_a_case_and_a_row_of_the_docs_table() -> None:
    names = {c.name for c in CASES}
    table = (ROOT / "docs" / "frontend.md").read_text().split("### Compared with `vllm serve` 0.32")[1]
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.split("\n### ")[0].splitlines() if line.startswith("|")]
    rows_needed = {k.row for ks in KNOWN_DIFFERENCES.values() for k in ks}
    rows_needed |= {row for _, row in GLOBAL_SHAPE_DIFFERENCES.values()}
    assert set(KNOWN_DIFFERENCES) <= names
    assert rows_needed | {ERROR_ROW} <= set(rows)
