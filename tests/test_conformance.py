"""Conformance with ``vllm serve``: the same requests to ``vllm serve`` and to our stack, compared.

One ``vllm serve`` and one stack (nats-server, a frontend, one decode worker) on the demo model,
each with the same engine flags and the same tool flags (``--enable-auto-tool-choice
--tool-call-parser pythonic``). They run one after the other, never together (two engines would
share the 2 cores): ``vllm serve`` starts, answers every case, stops; then our stack does the
same. Each case is then one test comparing the two answers:

* **acceptance**: the same HTTP status; for an error, both bodies are OpenAI's
  ``{"error": {"message", "type", "param", "code"}}`` with the same ``type`` (vLLM's exception
  name, e.g. ``BadRequestError``), ``code`` the status, and the same ``param`` where vLLM sets one;
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

The same stack then answers the field tests at the end (issue 19 item 1): every field of the
frontend's request structs and of the worker's ``generate`` message changes the answer or is
refused naming it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
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
CONVERSATION = [*MESSAGES, {"role": "assistant", "content": "Once upon a time"}]
# A 1x1 PNG as a data URL: an image part that needs no network.
PNG = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
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
    completion("max_tokens left out", max_tokens=None),  # vLLM's CompletionRequest default: 16
    completion("max_tokens null", max_tokens=None, extra_body={"max_tokens": None}),
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
    # how the chat template renders the prompt, token restrictions, no model (issue 19)
    chat("add_generation_prompt false", extra_body={"add_generation_prompt": False}),
    chat(
        "continue_final_message",
        messages=CONVERSATION,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    ),
    chat("chat_template_kwargs", extra_body={"chat_template_kwargs": {"bos_token": "<|x|>"}}),
    chat("add_special_tokens on chat", extra_body={"add_special_tokens": True}),
    completion("add_special_tokens false", extra_body={"add_special_tokens": False}),
    completion("allowed_token_ids", extra_body={"allowed_token_ids": [300, 301, 302, 453]}),
    chat("allowed_token_ids on chat", extra_body={"allowed_token_ids": [300, 301, 302]}),
    Case("chat without model", "post", {"messages": MESSAGES, "max_tokens": 8, **GREEDY}, path="/v1/chat/completions"),
    Case("completion without model", "post", {"prompt": PROMPT, "max_tokens": 8, **GREEDY}, path="/v1/completions"),
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
    chat("continue_final_message with add_generation_prompt", extra_body={"continue_final_message": True}),
    chat("chat_template_kwargs setting tokenize", extra_body={"chat_template_kwargs": {"tokenize": True}}),
    completion("allowed_token_ids empty", extra_body={"allowed_token_ids": []}),
    completion("allowed_token_ids out of the vocabulary", extra_body={"allowed_token_ids": [5, 100000]}),
    chat(
        "an image for a text-only model",
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {"url": PNG}}],
            }
        ],
    ),
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


GUIDED = "`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`"
KNOWN_DIFFERENCES: dict[str, tuple[Known, ...]] = {
    "guided_json": (Known("text", "unconstrained", matches_schema(PERSON), GUIDED),),
    "guided_regex": (Known("text", "unconstrained", matches_regex(CODE), GUIDED),),
    "guided_choice": (Known("text", "unconstrained", one_of("cat", "dog"), GUIDED),),
    "guided_grammar": (Known("text", "unconstrained", one_of("yes", "no"), GUIDED),),
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


@attrs.frozen
class OurStack:
    """Our frontend's base URL, and the NATS server and namespace its decode worker serves on."""

    base: str
    nats_url: str
    namespace: str


@pytest.fixture(scope="module")
def our_stack(vllm_answers: Any, nats_server: NatsServer, demo_model: str) -> Iterator[OurStack]:
    """Started after ``vllm serve`` has stopped (``vllm_answers`` first); kept for the module's
    field tests (below), which need the same engine."""
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
        yield OurStack(base, nats_server.url, namespace)
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture(scope="module")
def our_answers(our_stack: OurStack, token_prompt: list[int]) -> dict[str, Answer]:
    return ask_all(client_for(our_stack.base), our_stack.base, token_prompt)


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


def assert_error_bodies_alike(vllm: Answer, ours: Answer, known: Known | None) -> None:
    for answer in (vllm, ours):
        assert set(answer.body) == {"error"}, answer.body
        assert {"message", "type", "param", "code"} <= set(answer.body["error"]), answer.body
    assert vllm.body["error"]["code"] == ours.body["error"]["code"] == vllm.status
    assert ours.body["error"]["type"] == vllm.body["error"]["type"]
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


def test_the_max_tokens_cases_end_at_vllms_default(our_answers: dict[str, Answer]) -> None:
    """Completions without max_tokens (or with null) compare an answer cut at vLLM's default of 16
    tokens: they prove nothing unless it was cut there (the same values as vLLM's, checked above)."""
    for name in ("max_tokens left out", "max_tokens null"):
        got = values(our_answers[name])
        assert (got["finish"], got["usage"]["completion_tokens"]) == ({0: "length"}, 16), name


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
    assert rows_needed <= set(rows)


# -- every field has an effect (issue 19 item 1) -------------------------------------------------
#
# Every field of the frontend's request structs and of the worker's generate message (nested
# structs too, found through msgspec) has an entry below: a request with the field set, compared
# with the same request without it, must get another answer (text, token ids, logprobs, usage,
# finish reason, shape), or be refused naming the field. A new field fails
# test_every_field_is_in_a_table until it gets an entry. The few whose effect the random demo
# model cannot show say why (UNSEEN), and so do the documented no-ops (NO_OP: accepted, the same
# answer). On this engine (the conformance module's, started once).


@attrs.frozen
class Probe:
    """``base`` (added to the endpoint's plain request) without, then with ``field`` (a body, or a
    function of the plain answer giving one). ``refused``: the status and param of the refusal
    (the worker: its error code and a name its message must contain) instead of an answer."""

    field: dict[str, Any] | Callable[[Any], dict[str, Any]]
    base: dict[str, Any] = attrs.field(factory=dict)
    refused: tuple[Any, str] | None = None


EOS_FORCED = {"logit_bias": {"1": 100}}  # EOS is token 1 on the demo model
ONE_TOKEN = {"logit_bias": {"300": 100}}
SAMPLED = {"temperature": 1.0, "seed": 1}
YES_SCHEMA = {"enum": ["yes"]}

# Fields both endpoints take (_Common), probed on each.
COMMON_PROBES: dict[str, Probe] = {
    "model": Probe({"model": "no-such-model"}, refused=(404, "model")),
    "max_tokens": Probe({"max_tokens": 3}),
    "temperature": Probe({"temperature": 1.5}, {"seed": 1}),
    "top_p": Probe({"top_p": 0.01}, SAMPLED),
    "top_k": Probe({"top_k": 1}, SAMPLED),
    "min_p": Probe({"min_p": 0.99}, SAMPLED),
    "seed": Probe({"seed": 2}, SAMPLED),
    "stop": Probe({"stop": ["e", " as"]}, {"max_tokens": 16}),  # " as": chat's greedy text has no "e"
    "stop_token_ids": Probe({"stop_token_ids": [300]}, ONE_TOKEN),
    "ignore_eos": Probe({"ignore_eos": True}, EOS_FORCED),
    "min_tokens": Probe({"min_tokens": 4}, EOS_FORCED),
    "presence_penalty": Probe({"presence_penalty": 2.0}, {"max_tokens": 24}),
    "frequency_penalty": Probe({"frequency_penalty": 2.0}, {"max_tokens": 24}),
    "repetition_penalty": Probe({"repetition_penalty": 2.0}, {"max_tokens": 24}),
    "n": Probe({"n": 2}, SAMPLED),
    "stream": Probe({"stream": True}),
    "stream_options": Probe({"stream_options": {"include_usage": True}}, {"stream": True}),
    "user": Probe({"user": "client-7"}),
    "logit_bias": Probe(ONE_TOKEN),
    "skip_special_tokens": Probe({"skip_special_tokens": False}, {**EOS_FORCED, "ignore_eos": True, "max_tokens": 3}),
    "include_stop_str_in_output": Probe({"include_stop_str_in_output": True}, {"stop": ["e", " as"], "max_tokens": 16}),
    "prompt_logprobs": Probe({"prompt_logprobs": 1}),
    "response_format": Probe({"response_format": {"type": "json_object"}}),
    "structured_outputs": Probe({"structured_outputs": {"choice": ["cat", "dog"]}}),
    "guided_json": Probe({"guided_json": YES_SCHEMA}),
    "guided_regex": Probe({"guided_regex": "[0-9]{3}"}),
    "guided_choice": Probe({"guided_choice": ["cat", "dog"]}),
    "guided_grammar": Probe({"guided_grammar": YES_NO}),
    "allowed_token_ids": Probe({"allowed_token_ids": [300]}),
}
TEXT_PART = {"role": "user", "content": [{"type": "text", "text": "Tell me a story."}]}
FRONTEND_PROBES: dict[str, Probe] = {
    **{f"completions.{name}": probe for name, probe in COMMON_PROBES.items()},
    **{f"chat.{name}": probe for name, probe in COMMON_PROBES.items()},
    "completions.prompt": Probe({"prompt": "A different beginning"}),
    "completions.logprobs": Probe({"logprobs": 1}),
    "completions.echo": Probe({"echo": True}),
    "completions.suffix": Probe({"suffix": "the end"}, refused=(400, "suffix")),
    "completions.best_of": Probe({"best_of": 2}, refused=(400, "best_of")),
    "completions.add_special_tokens": Probe({"add_special_tokens": False}),  # no BOS: one prompt token fewer
    "chat.add_generation_prompt": Probe({"add_generation_prompt": False}),
    "chat.continue_final_message": Probe({"continue_final_message": True}, {"add_generation_prompt": False}),
    "chat.add_special_tokens": Probe({"add_special_tokens": True}),  # a second BOS
    "chat.chat_template_kwargs": Probe({"chat_template_kwargs": {"bos_token": "<|x|>"}}),
    "chat.messages": Probe({"messages": [{"role": "user", "content": "What is the time?"}]}),
    "chat.max_completion_tokens": Probe({"max_completion_tokens": 3}),
    "chat.logprobs": Probe({"logprobs": True}),
    "chat.top_logprobs": Probe({"top_logprobs": 3}, {"logprobs": True}),
    "chat.tools": Probe({"tools": [WEATHER]}),  # rendered into the prompt: more prompt tokens
    "chat.tool_choice": Probe({"tool_choice": NAMED}, {"tools": [WEATHER], **TOOL_SAMPLING}),
    "StreamOptions.include_usage": Probe({"stream_options": {"include_usage": True}}, {"stream": True}),
    "StreamOptions.continuous_usage_stats": Probe(
        {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        {"stream": True, "stream_options": {"include_usage": True}},
    ),
    "ChatMessage.role": Probe({"messages": [{"role": "system", "content": MESSAGES[0]["content"]}]}),
    "ChatMessage.content": Probe({"messages": [{"role": "user", "content": "Something else."}]}),
    "ChatMessage.name": Probe({"messages": [{**MESSAGES[0], "name": "ann"}]}),
    "ChatMessage.tool_calls": Probe(
        {"messages": [{**m, "content": m["content"] or ""} for m in TOOL_HISTORY]},
        {
            "tools": [WEATHER],
            "messages": [{k: v or "" for k, v in m.items() if k != "tool_calls"} for m in TOOL_HISTORY],
        },
    ),
    "ChatMessage.tool_call_id": Probe(
        {"messages": TOOL_HISTORY},
        {"tools": [WEATHER], "messages": [{k: v for k, v in m.items() if k != "tool_call_id"} for m in TOOL_HISTORY]},
    ),
    "ContentPart.type": Probe(
        {"messages": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}]},
        refused=(400, "messages[0].content[0]"),
    ),
    "ContentPart.text": Probe(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "Something else."}]}]},
        {"messages": [TEXT_PART]},
    ),
    "ResponseFormat.type": Probe({"response_format": {"type": "json_object"}}, {"response_format": {"type": "text"}}),
    "ResponseFormat.json_schema": Probe(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "yes", "schema": YES_SCHEMA}}},
        {"response_format": {"type": "json_object"}},
    ),
    "JsonSchema.json_schema": Probe(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {"enum": ["no"]}}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": YES_SCHEMA}}},
    ),
    "JsonSchema.name": Probe(
        {"response_format": {"type": "json_schema", "json_schema": {"name": "other", "schema": YES_SCHEMA}}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": YES_SCHEMA}}},
    ),
    "JsonSchema.description": Probe(
        {"response_format": {"type": "json_schema", "json_schema": {"description": "d", "schema": YES_SCHEMA}}},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": YES_SCHEMA}}},
    ),
    "JsonSchema.strict": Probe(
        {"response_format": {"type": "json_schema", "json_schema": {"strict": True, "schema": YES_SCHEMA}}},
        {"response_format": {"type": "json_schema", "json_schema": {"schema": YES_SCHEMA}}},
    ),
}
# Accepted, and the same answer: documented in docs/frontend.md ("Parameters"), as vllm serve.
NO_OP = {
    "completions.user": "OpenAI's end-user id for abuse monitoring; vllm serve ignores it too",
    "chat.user": "OpenAI's end-user id for abuse monitoring; vllm serve ignores it too",
    "JsonSchema.name": "a label of the schema; vllm serve constrains by the schema alone too",
    "JsonSchema.description": "a label of the schema; vllm serve constrains by the schema alone too",
    "JsonSchema.strict": "the schema is always enforced, as by vllm serve",
}
# Passed on, with an effect the demo model cannot show (each has its own check named here).
UNSEEN = {
    "ChatMessage.name": "passed to the chat template as vLLM does; the demo template renders no names "
    "(test_names_and_tool_call_ids_reach_the_template)",
    "ChatMessage.tool_call_id": "passed to the chat template as vLLM does; the demo template renders no "
    "tool_call_id (test_names_and_tool_call_ids_reach_the_template)",
}

# The worker's generate message (dynamo_worker.core.generate), sent to the decode worker directly.
WORKER_BASE: dict[str, Any] = {
    "model": SERVED,
    "token_ids": [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50],
    "sampling_options": {"temperature": 0.0},
    "stop_conditions": {"max_tokens": 8},
}
W_SAMPLED = {"sampling_options": {"temperature": 1.0, "seed": 1}}
W_EOS = {"sampling_options": {"temperature": 0.0, "logit_bias": {"1": 100.0}}}
W_ONE = {"sampling_options": {"temperature": 0.0, "logit_bias": {"300": 100.0}}}
# The same, asking the worker for text too (what text-shaping options act on).
W_EOS_TEXT = {"sampling_options": {**W_EOS["sampling_options"], "detokenize": True}}
W_ONE_TEXT = {"sampling_options": {**W_ONE["sampling_options"], "detokenize": True}}
BAD = "bad_request"


def guided(**spec: Any) -> dict[str, Any]:
    return {"sampling_options": {"temperature": 0.0, "guided_decoding": spec}}


WORKER_PROBES: dict[str, Probe] = {
    "GenerateRequest.token_ids": Probe({"token_ids": [1, 60, 61, 62]}),
    "GenerateRequest.model": Probe({"model": "no-such-model"}, refused=("not_found", "no-such-model")),
    "GenerateRequest.stop_conditions": Probe({"stop_conditions": {"max_tokens": 3}}),
    "GenerateRequest.sampling_options": Probe({"sampling_options": {"temperature": 1.0, "seed": 1}}),
    "GenerateRequest.output_options": Probe({"output_options": {"logprobs": 1}}),
    "GenerateRequest.eos_token_ids": Probe({"eos_token_ids": [300]}, W_ONE),
    "GenerateRequest.mdc_sum": Probe({"mdc_sum": "abc"}, refused=(BAD, "mdc_sum")),
    "GenerateRequest.annotations": Probe({"annotations": ["formatted_prompt"]}, refused=(BAD, "annotations")),
    "GenerateRequest.router_config_override": Probe(
        {"router_config_override": {"overlap_score_weight": 2.0}}, refused=(BAD, "router_config_override")
    ),
    "GenerateRequest.bootstrap_info": Probe(
        {"bootstrap_info": {"bootstrap_host": "127.0.0.1"}}, refused=(BAD, "bootstrap_info")
    ),
    "GenerateRequest.extra_args": Probe({"extra_args": {"x": 1}}, refused=(BAD, "extra_args")),
    # This worker has no KV connector (the disaggregated tests give a prefill_result its effect).
    "GenerateRequest.prefill_result": Probe(
        {"prefill_result": {"disaggregated_params": {"kv_transfer_params": {"x": 1}}}},
        refused=(BAD, "prefill_result"),
    ),
    "GenerateRequest.routing": Probe({"routing": {"dp_rank": 1}}, refused=(BAD, "routing.dp_rank")),
    "GenerateRequest.prompt_embeds": Probe({"prompt_embeds": "AAAA"}, refused=(BAD, "prompt_embeds")),
    "GenerateRequest.multi_modal_data": Probe({"multi_modal_data": {"image": []}}, refused=(BAD, "multi_modal_data")),
    "StopConditions.max_tokens": Probe({"stop_conditions": {"max_tokens": 3}}),
    "StopConditions.min_tokens": Probe({"stop_conditions": {"max_tokens": 8, "min_tokens": 4}}, W_EOS),
    "StopConditions.stop": Probe({"stop_conditions": {"max_tokens": 8, "stop": [" "]}}),
    "StopConditions.stop_token_ids": Probe({"stop_conditions": {"max_tokens": 8, "stop_token_ids": [300]}}, W_ONE),
    "StopConditions.stop_token_ids_hidden": Probe(
        {"stop_conditions": {"max_tokens": 8, "stop_token_ids_hidden": [300]}}, W_ONE
    ),
    "StopConditions.include_stop_str_in_output": Probe(
        {"stop_conditions": {"include_stop_str_in_output": True}},
        {**W_ONE_TEXT, "stop_conditions": {"max_tokens": 8, "stop_token_ids": [300]}},
    ),
    "StopConditions.ignore_eos": Probe({"stop_conditions": {"max_tokens": 8, "ignore_eos": True}}, W_EOS),
    "StopConditions.max_thinking_tokens": Probe(
        {"stop_conditions": {"max_tokens": 8, "max_thinking_tokens": 4}}, refused=(BAD, "max_thinking_tokens")
    ),
    "SamplingOptions.n": Probe({"sampling_options": {"temperature": 1.0, "n": 2}}, refused=(BAD, "sampling_options.n")),
    "SamplingOptions.best_of": Probe(
        {"sampling_options": {"temperature": 1.0, "best_of": 2}}, refused=(BAD, "sampling_options.best_of")
    ),
    "SamplingOptions.presence_penalty": Probe(
        {"sampling_options": {"temperature": 0.0, "presence_penalty": 2.0}}, {"stop_conditions": {"max_tokens": 32}}
    ),
    "SamplingOptions.frequency_penalty": Probe(
        {"sampling_options": {"temperature": 0.0, "frequency_penalty": 2.0}}, {"stop_conditions": {"max_tokens": 32}}
    ),
    "SamplingOptions.repetition_penalty": Probe({"sampling_options": {"temperature": 0.0, "repetition_penalty": 2.0}}),
    "SamplingOptions.temperature": Probe({"sampling_options": {"temperature": 1.5, "seed": 1}}),
    "SamplingOptions.top_p": Probe({"sampling_options": {"temperature": 1.0, "seed": 1, "top_p": 0.01}}, W_SAMPLED),
    "SamplingOptions.top_k": Probe({"sampling_options": {"temperature": 1.0, "seed": 1, "top_k": 1}}, W_SAMPLED),
    "SamplingOptions.min_p": Probe({"sampling_options": {"temperature": 1.0, "seed": 1, "min_p": 0.99}}, W_SAMPLED),
    "SamplingOptions.use_beam_search": Probe(
        {"sampling_options": {"use_beam_search": True}}, refused=(BAD, "use_beam_search")
    ),
    "SamplingOptions.length_penalty": Probe(
        {"sampling_options": {"length_penalty": 0.5}}, refused=(BAD, "length_penalty")
    ),
    "SamplingOptions.seed": Probe({"sampling_options": {"temperature": 1.0, "seed": 2}}, W_SAMPLED),
    "SamplingOptions.guided_decoding": Probe(guided(choice=["cat", "dog"])),
    "SamplingOptions.detokenize": Probe({"sampling_options": {"detokenize": True}}),
    "SamplingOptions.include_stop_str_in_output": Probe(
        {"sampling_options": {"include_stop_str_in_output": True}},
        {**W_ONE_TEXT, "stop_conditions": {"max_tokens": 8, "stop_token_ids": [300]}},
    ),
    "SamplingOptions.allowed_token_ids": Probe({"sampling_options": {"temperature": 0.0, "allowed_token_ids": [300]}}),
    "SamplingOptions.bad_words_token_ids": Probe(
        lambda plain: {"sampling_options": {"temperature": 0.0, "bad_words_token_ids": [[plain["tokens"][0]]]}}
    ),
    "SamplingOptions.logit_bias": Probe(W_ONE),
    "GuidedDecoding.json": Probe(guided(json=YES_SCHEMA)),
    "GuidedDecoding.regex": Probe(guided(regex="[0-9]{3}")),
    "GuidedDecoding.choice": Probe(guided(choice=["cat", "dog"])),
    "GuidedDecoding.grammar": Probe(guided(grammar=YES_NO)),
    "GuidedDecoding.json_object": Probe(guided(json_object=True)),
    "GuidedDecoding.structural_tag": Probe(
        guided(
            structural_tag=json.dumps(
                {
                    "type": "structural_tag",
                    "structures": [{"begin": "<f>", "schema": YES_SCHEMA, "end": "</f>"}],
                    "triggers": ["<f>"],
                }
            )
        )
    ),
    "GuidedDecoding.backend": Probe(guided(choice=["a"], backend="xgrammar"), refused=(BAD, "backend")),
    "GuidedDecoding.whitespace_pattern": Probe(
        guided(json=PERSON, whitespace_pattern=r"[ ]?"), refused=(BAD, "whitespace_pattern")
    ),
    # vLLM reads these two from the engine's --structured-outputs-config only (false here).
    "GuidedDecoding.disable_any_whitespace": Probe(
        guided(json=PERSON, disable_any_whitespace=True), refused=(BAD, "disable_any_whitespace")
    ),
    "GuidedDecoding.disable_additional_properties": Probe(
        guided(json={"type": "object"}, disable_additional_properties=True),
        refused=(BAD, "disable_additional_properties"),
    ),
    "OutputOptions.logprobs": Probe({"output_options": {"logprobs": 1}}),
    "OutputOptions.skip_special_tokens": Probe(
        {"output_options": {"skip_special_tokens": False}},
        {**W_EOS_TEXT, "stop_conditions": {"max_tokens": 3, "ignore_eos": True}},
    ),
    "OutputOptions.formatted_prompt": Probe(
        {"output_options": {"formatted_prompt": True}}, refused=(BAD, "formatted_prompt")
    ),
    "OutputOptions.return_tokens_as_token_ids": Probe(
        {"output_options": {"return_tokens_as_token_ids": True}}, refused=(BAD, "return_tokens_as_token_ids")
    ),
    "OutputOptions.prompt_logprobs": Probe({"output_options": {"prompt_logprobs": 1}}),
}
WORKER_UNSEEN = {
    "GuidedDecoding.structural_tag": "constrains only after a trigger string, which the random model never writes",
}


def struct_fields(*roots: type) -> set[str]:
    """``Struct.field`` of every field of ``roots`` and of the Structs nested in them (msgspec's view)."""
    import msgspec

    found: set[str] = set()
    seen: set[type] = set()

    def walk(t: Any) -> None:
        if isinstance(t, msgspec.inspect.StructType):
            if t.cls in seen:
                return
            seen.add(t.cls)
            for f in t.fields:
                found.add(f"{t.cls.__name__}.{f.name}")
                walk(f.type)
        for child in ("types", "item_type", "key_type", "value_type"):
            inner = getattr(t, child, None)
            for item in inner if isinstance(inner, tuple) else [inner] if inner is not None else []:
                walk(item)

    for info in msgspec.inspect.multi_type_info(roots):
        walk(info)
    return found


def frontend_fields() -> set[str]:
    from dynamo_worker.frontend.protocol import ChatRequest, CompletionRequest

    top = {"CompletionRequest": "completions", "ChatRequest": "chat", "_Common": None}
    return {
        f"{top[name]}.{field}" if name in top else f"{name}.{field}"
        for name, field in (path.split(".") for path in struct_fields(CompletionRequest, ChatRequest))
    }


def test_every_field_is_in_a_table() -> None:
    from dynamo_worker.core.generate import PreprocessedRequest

    assert frontend_fields() == set(FRONTEND_PROBES)
    assert struct_fields(PreprocessedRequest) == set(WORKER_PROBES)
    assert set(NO_OP) | set(UNSEEN) <= set(FRONTEND_PROBES) and set(WORKER_UNSEEN) <= set(WORKER_PROBES)
    # The documented no-ops are in the docs' parameter list as such.
    params = (ROOT / "docs" / "frontend.md").read_text().split("### Parameters")[1].split("\n### ")[0]
    assert "`user` (accepted and ignored" in params and "`name`, `description` and `strict`" in params


def merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, nested objects merged (so a probe adds one sampling option)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def frontend_answer(stack: OurStack, endpoint: str, body: dict[str, Any]) -> tuple[int, Any]:
    """(status, error body) or (200, the answer as the conformance comparison sees it). Sent with
    httpx: the openai client takes vLLM's extensions only in ``extra_body``."""
    path = "/v1/completions" if endpoint == "completion" else "/v1/chat/completions"
    resp = httpx.post(stack.base + path, json=body, timeout=120)
    if resp.status_code != 200:
        return resp.status_code, resp.json()["error"]
    if resp.headers["content-type"].startswith("text/event-stream"):
        events = [line[len("data: ") :] for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        answer = Answer(200, chunks=[json.loads(event) for event in events[:-1]])
    else:
        answer = Answer(200, resp.json())
    # values() tells only whether the last chunk has usage; continuous usage puts it on text chunks too.
    usage_with_choices = any(part.get("usage") and part.get("choices") for part in parts(answer))
    return 200, (answer_shape(answer), values(answer), usage_with_choices)


@pytest.mark.parametrize("name", sorted(FRONTEND_PROBES))
def test_a_frontend_field_changes_the_answer_or_is_refused(our_stack: OurStack, name: str) -> None:
    probe = FRONTEND_PROBES[name]
    endpoint = "completion" if name.startswith("completions.") else "chat"
    plain = {"model": SERVED, "max_tokens": 8, "temperature": 0, **probe.base}
    plain.update({"prompt": PROMPT} if endpoint == "completion" else {"messages": plain.get("messages", MESSAGES)})
    status, without = frontend_answer(our_stack, endpoint, plain)
    assert status == 200, without
    field = probe.field(without) if callable(probe.field) else probe.field
    status, with_field = frontend_answer(our_stack, endpoint, {**plain, **field})
    if probe.refused is not None:
        assert (status, with_field["param"]) == probe.refused, with_field
        return
    assert status == 200, with_field
    if name in NO_OP:
        assert with_field == without, NO_OP[name]
    elif name not in UNSEEN:
        assert with_field != without


def test_names_and_tool_call_ids_reach_the_template() -> None:
    """What UNSEEN says: both are in the messages the chat template gets, as vLLM hands them over."""
    from dynamo_worker.frontend.protocol import parse_chat, template_messages

    req = parse_chat(
        json.dumps({"model": SERVED, "messages": [{**MESSAGES[0], "name": "ann"}, *TOOL_HISTORY]}).encode()
    )
    rendered = template_messages(req.messages)
    assert rendered[0]["name"] == "ann" and rendered[-1]["tool_call_id"] == "call_1"


async def worker_answer(stack: OurStack, body: dict[str, Any]) -> tuple[str, Any]:
    """("ok", tokens, finish and stop reasons, logprobs, usage) or (the error's code, its message)."""
    from dynamo_worker.plugin import RequestError, Runtime

    runtime = await Runtime.connect(stack.nats_url, stack.namespace)
    try:
        client = runtime.client("backend", "generate")
        await client.wait_for_instances(30)
        try:
            chunks = [chunk async for chunk in client.generate(body)]
        except RequestError as err:
            return err.code, err.message
    finally:
        await runtime.close()
    # Per token, not per message: how the worker batches tokens into messages is timing.
    return "ok", {
        "tokens": [t for c in chunks for t in c["token_ids"]],
        "text": "".join(c.get("text") or "" for c in chunks),
        "finish": [(c.get("finish_reason"), c.get("stop_reason")) for c in chunks if c.get("finish_reason")],
        "logprobs": rounded([v for c in chunks for v in c.get("log_probs") or []]),
        "top_logprobs": rounded([v for c in chunks for v in c.get("top_logprobs") or []]),
        "prompt_logprobs": rounded([c["prompt_logprobs"] for c in chunks if c.get("prompt_logprobs")]),
        "usage": [c.get("completion_usage") for c in chunks if c.get("completion_usage")],
    }


@pytest.mark.parametrize("name", sorted(WORKER_PROBES))
def test_a_worker_field_changes_the_answer_or_is_refused(our_stack: OurStack, name: str) -> None:
    import asyncio

    probe = WORKER_PROBES[name]
    plain = merged(WORKER_BASE, probe.base)
    outcome, without = asyncio.run(worker_answer(our_stack, plain))
    assert outcome == "ok", without
    field = probe.field(without) if callable(probe.field) else probe.field
    outcome, with_field = asyncio.run(worker_answer(our_stack, merged(plain, field)))
    if probe.refused is not None:
        code, named = probe.refused
        assert outcome == code and named in with_field, with_field
        return
    assert outcome == "ok", with_field
    if name not in WORKER_UNSEEN:
        assert with_field != without


def test_the_worker_refuses_what_it_cannot_honour_in_this_request() -> None:
    """The refusals the probes above cannot reach on a worker without a KV connector and with
    vLLM's default --structured-outputs-config: each depends on the request or the worker."""
    from types import SimpleNamespace

    from dynamo_worker.core.generate import GuidedDecoding
    from dynamo_worker.core.request_plane import RequestError
    from dynamo_worker.engine.protocol import check_engine_wide_options, finish_reason, parse_request

    def refusal(body: dict[str, Any], **worker: Any) -> str | None:
        try:
            parse_request({"token_ids": [1, 2, 3], **body}, vocab_size=512, max_model_len=64, **worker)
        except RequestError as err:
            assert err.code == BAD
            return err.message
        return None

    # Text-shaping options without text to shape; with detokenize they shape vLLM's text (probes).
    for body in (
        {"stop_conditions": {"include_stop_str_in_output": True}},
        {"sampling_options": {"include_stop_str_in_output": True}},
        {"output_options": {"skip_special_tokens": False}},
    ):
        name = next(iter(body)) + "." + next(iter(next(iter(body.values()))))
        assert name in (refusal(body) or ""), body
        detokenized = merged(body, {"sampling_options": {"detokenize": True}})
        assert refusal(detokenized) is None
    assert refusal({"output_options": {"skip_special_tokens": True}}) is None  # vLLM's default
    # prefill_result: only with a connector, and only in the shape a prefill worker answers with.
    transfer = {"disaggregated_params": {"kv_transfer_params": {"x": 1}}}
    assert "no KV connector" in (refusal({"prefill_result": transfer}) or "")
    assert refusal({"prefill_result": transfer}, kv_connector=True) is None
    assert "kv_transfer_params" in (refusal({"prefill_result": {"x": 1}}, kv_connector=True) or "")
    null_params = {"disaggregated_params": {"kv_transfer_params": None}}  # vLLM's ExampleConnector's answer
    assert refusal({"prefill_result": null_params}, kv_connector=True) is None
    assert "eos_token_ids: 600" in (refusal({"eos_token_ids": [600]}) or "")
    # Engine-wide structured-output options: the worker's own value is accepted, the other refused.
    config = SimpleNamespace(disable_any_whitespace=True, disable_additional_properties=False)
    check_engine_wide_options(GuidedDecoding(json={}, disable_any_whitespace=True), config)
    check_engine_wide_options(GuidedDecoding(json={}, disable_additional_properties=False), config)
    with pytest.raises(RequestError, match="disable_additional_properties is false for every request"):
        check_engine_wide_options(GuidedDecoding(json={}, disable_additional_properties=True), config)
    # A stop on one of the request's EOS ids is an eos, as on the model's own.
    assert finish_reason("stop", 300, [300]) == "eos" and finish_reason("stop", 300, [2]) == "stop"
