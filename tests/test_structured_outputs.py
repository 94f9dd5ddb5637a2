"""Structured outputs through vLLM's own backends, on a real engine behind the frontend.

One stack (``dynamo-worker up``: nats-server, frontend, one decode worker on vLLM with the
random demo model) for the module. The demo model's weights are random, so only constrained
decoding can produce text that parses and validates: every test checks every output against its
schema or regex, streaming and not, and a test cannot pass by luck.

The same stack serves the other sampling fields that need the engine (``n``, ``prompt_logprobs``,
``echo`` with ``logprobs``), compared with vLLM's offline engine on the same model, run once
before the stack starts (two engines at once would share the 2 cores).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

from tests.engine_helpers import offline_outputs
from tests.test_up import Stack, up_stack

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
CODE = r"[A-Z]{3}-[0-9]{2,4}"


PROMPT_IDS = [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
SEEDED = {"n": 3, "seed": 21, "temperature": 0.8, "max_tokens": 8}


def chat_prompt_ids(model: str) -> list[int]:
    """MESSAGES as vllm serve renders them (the template with the generation prompt, no extra BOS)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def offline(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """vLLM's offline answers: seeded n=3 choices, and the prompt logprobs of both prompts."""
    chat_ids = chat_prompt_ids(demo_model)
    seeded, plain, chat = offline_outputs(
        demo_model,
        [
            {"prompt": PROMPT_IDS, "params": SEEDED},
            {"prompt": PROMPT_IDS, "params": {"temperature": 0, "max_tokens": 1, "prompt_logprobs": 3}},
            {"prompt": chat_ids, "params": {"temperature": 0, "max_tokens": 1, "prompt_logprobs": 3}},
        ],
        tmp_path_factory.mktemp("offline"),
    )
    return {
        "seeded": seeded,
        "prompt_logprobs": plain["prompt_logprobs"],
        "chat_ids": chat_ids,
        "chat_prompt_logprobs": chat["prompt_logprobs"],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, demo_model: str, offline: Any) -> Iterator[Stack]:
    # The session's demo model (the one `up` would generate: same recipe, same seed), so that the
    # offline engine above answers for the very model served.
    # Tools as vllm serve takes them: pythonic is one of vLLM's parsers that force required/named
    # calls with the JSON schema built from the tools (tests at the end of this module).
    with up_stack(
        tmp_path_factory.mktemp("so"),
        "--model",
        demo_model,
        "--served-model-name",
        "demo",
        "--max-num-seqs",
        "8",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "pythonic",
    ) as s:
        yield s


def chat_text(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, str | None]:
    resp = client.chat.completions.create(
        model="demo",
        messages=MESSAGES,
        max_tokens=kwargs.pop("max_tokens", 120),
        temperature=0.8,
        seed=3,
        stream=stream,
        **kwargs,
    )
    if not stream:
        return resp.choices[0].message.content or "", resp.choices[0].finish_reason
    chunks = [c for c in resp if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def completion_text(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, str | None]:
    resp = client.completions.create(
        model="demo",
        prompt="The code is",
        max_tokens=kwargs.pop("max_tokens", 40),
        temperature=kwargs.pop("temperature", 0.8),
        seed=5,
        stream=stream,
        **kwargs,
    )
    if not stream:
        return resp.choices[0].text, resp.choices[0].finish_reason
    chunks = [c for c in resp if c.choices]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_output_validates(stack: Stack, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for text, finish in (
        chat_text(stack.client, stream, response_format=fmt),
        completion_text(stack.client, stream, max_tokens=120, extra_body={"response_format": fmt}),
    ):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def completes_to_a_json_object(prefix: str) -> bool:
    """Whether ``prefix`` is the start of some JSON object: closed by the shortest endings that
    finish a literal, a pending key or value, an open string and the open brackets."""
    in_string, escaped, stack = False, False, []
    for ch in prefix:
        if in_string:
            escaped, in_string = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            stack.pop()
    body = re.sub(r"\\(u[0-9a-fA-F]{0,3})?$", "", prefix) if in_string else prefix.rstrip()
    closers = "".join(reversed(stack))
    for middle in ("", "null", ":null", '"k":null', "rue", "ue", "e", "ull", "ll", "l", "alse", "lse", "se", "0"):
        candidate = body + ('"' if in_string else "") + middle + closers
        for fix in (candidate, candidate.replace(",}", "}").replace(",]", "]")):
            try:
                if isinstance(json.loads(fix), dict):
                    return True
            except json.JSONDecodeError:
                pass
    return False


def test_the_json_prefix_check_can_fail() -> None:
    assert completes_to_a_json_object('{"a": [1, tr')
    assert completes_to_a_json_object('{"a": "x\\u00')
    assert not completes_to_a_json_object("Sure! {")
    assert not completes_to_a_json_object('{"a" 1')


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_object_output_is_a_json_object(stack: Stack, stream: bool) -> None:
    """An arbitrary object has no length bound, and random weights rarely close one: cut by
    max_tokens, the text must still be the start of a JSON object."""
    text, finish = chat_text(stack.client, stream, response_format={"type": "json_object"}, max_tokens=60)
    assert text.startswith("{") and completes_to_a_json_object(text), text
    if finish == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["structured_outputs", "guided_json"])
def test_a_json_schema_as_vllms_extra_fields_validates(stack: Stack, stream: bool, field: str) -> None:
    body = {"structured_outputs": {"json": PERSON}} if field == "structured_outputs" else {"guided_json": PERSON}
    for text, finish in (
        chat_text(stack.client, stream, extra_body=body),
        completion_text(stack.client, stream, max_tokens=120, extra_body=body),
    ):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "body",
    [{"structured_outputs": {"regex": CODE}}, {"guided_regex": CODE}],
    ids=["structured_outputs", "guided_regex"],
)
def test_regex_output_fully_matches(stack: Stack, stream: bool, body: dict[str, Any]) -> None:
    for text, finish in (
        completion_text(stack.client, stream, extra_body=body),
        chat_text(stack.client, stream, extra_body=body),
    ):
        assert finish == "stop" and re.fullmatch(CODE, text), text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "body",
    [{"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}}, {"guided_choice": ["alpha", "beta", "gamma"]}],
    ids=["structured_outputs", "guided_choice"],
)
def test_choice_output_is_one_of_the_choices(stack: Stack, stream: bool, body: dict[str, Any]) -> None:
    for text, _ in (
        completion_text(stack.client, stream, extra_body=body),
        chat_text(stack.client, stream, extra_body=body),
    ):
        assert text in ("alpha", "beta", "gamma")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["structured_outputs", "guided_grammar"])
def test_grammar_output_is_in_the_language(stack: Stack, stream: bool, field: str) -> None:
    grammar = 'root ::= "light is " ("on" | "off") "."'
    body = (
        {"structured_outputs": {"grammar": grammar}} if field == "structured_outputs" else {"guided_grammar": grammar}
    )
    text, finish = completion_text(stack.client, stream, extra_body=body)
    assert finish == "stop" and re.fullmatch(r"light is (on|off)\.", text), text


BAD_CONSTRAINTS = [
    pytest.param("/v1/completions", {"guided_regex": "[a-"}, "guided_regex", id="invalid-regex"),
    pytest.param(
        "/v1/completions",
        {"structured_outputs": {"regex": "(unclosed"}},
        "structured_outputs",
        id="invalid-regex-structured-outputs",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}},
        "response_format",
        id="invalid-schema",
    ),
    pytest.param("/v1/completions", {"guided_json": "{not json"}, "guided_json", id="schema-not-json"),
    pytest.param(
        "/v1/chat/completions",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "[a-"}},
            }
        },
        "response_format",
        id="schema-with-an-invalid-pattern",
    ),
    pytest.param(
        "/v1/completions", {"guided_grammar": "root ::= ( unbalanced"}, "guided_grammar", id="invalid-grammar"
    ),
]


@pytest.mark.parametrize(("path", "extra", "param"), BAD_CONSTRAINTS)
def test_a_constraint_vllm_cannot_compile_is_a_400_naming_the_field(
    stack: Stack, path: str, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "demo", "max_tokens": 4, **extra}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "x"})
    status, answer = stack.post(path, json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "BadRequestError"
    # The worker is still there and its engine alive.
    text, _ = completion_text(stack.client, False, extra_body={"guided_regex": CODE})
    assert re.fullmatch(CODE, text), text


def test_a_cut_inside_a_multibyte_character_drops_the_partial_bytes(stack: Stack) -> None:
    """max_tokens ends generation inside a character the demo tokenizer spells in bytes: the
    text ends before that character (as vLLM's does), never in U+FFFD."""
    target = "日本語のテキスト"
    full, _ = completion_text(stack.client, False, max_tokens=60, extra_body={"guided_regex": target})
    assert full == target
    texts = [""]
    for n in range(1, 10):
        text, finish = completion_text(stack.client, False, max_tokens=n, extra_body={"guided_regex": target})
        assert finish == "length" and "\ufffd" not in text and target.startswith(text), (n, text)
        texts.append(text)
    # Some token completed no character: generation stopped inside one at least once.
    assert any(texts[n] == texts[n - 1] for n in range(1, len(texts))), texts


def test_logit_bias_reaches_the_sampler(stack: Stack) -> None:
    """A +100 bias on one token makes greedy decoding pick it every time (the routes that find
    its id and its text are /tokenize and /detokenize, as with vllm serve)."""
    _, tokens = stack.post(
        "/tokenize", json.dumps({"model": "demo", "prompt": " garden", "add_special_tokens": False}).encode()
    )
    token = tokens["tokens"][-1]
    _, expected = stack.post("/detokenize", json.dumps({"model": "demo", "tokens": [token] * 5}).encode())
    for stream in (False, True):
        text, finish = completion_text(stack.client, stream, max_tokens=5, temperature=0, logit_bias={str(token): 100})
        assert (text, finish) == (expected["prompt"], "length")
    plain, _ = completion_text(stack.client, False, max_tokens=5, temperature=0)
    assert plain != expected["prompt"]


def token_texts(stack: Stack, ids: list[int]) -> set[str]:
    """Each token's text as logprobs name it (the frontend decodes single tokens as /detokenize does)."""
    return {stack.post("/detokenize", json.dumps({"model": "demo", "tokens": [t]}).encode())[1]["prompt"] for t in ids}


def test_allowed_token_ids_restrict_every_sampled_token(stack: Stack) -> None:
    """vLLM's allowed_token_ids on both endpoints: every token sampled (at temperature 1, so the
    sampler has the whole vocabulary to choose from) is one of the allowed; EOS is not, so the
    answer runs to max_tokens."""
    allowed = [300, 301, 302, 453]
    texts = token_texts(stack, allowed)
    assert len(texts) == len(allowed)  # distinct texts: a token's text names its id
    sampled = {"max_tokens": 12, "temperature": 1.0, "seed": 7}
    got = stack.client.completions.create(
        model="demo", prompt="The code is", logprobs=0, extra_body={"allowed_token_ids": allowed}, **sampled
    )
    tokens = got.choices[0].logprobs.tokens
    assert len(tokens) == 12 and set(tokens) <= texts and got.choices[0].finish_reason == "length", tokens
    chat = stack.client.chat.completions.create(
        model="demo", messages=MESSAGES, logprobs=True, extra_body={"allowed_token_ids": allowed}, **sampled
    )
    chat_tokens = [entry.token for entry in chat.choices[0].logprobs.content]
    assert len(chat_tokens) == 12 and set(chat_tokens) <= texts, chat_tokens
    # control: the same seed without the restriction samples other tokens
    plain = stack.client.completions.create(model="demo", prompt="The code is", logprobs=0, **sampled)
    assert not set(plain.choices[0].logprobs.tokens) <= texts


CONVERSATION = [*MESSAGES, {"role": "assistant", "content": "Once upon a time"}]


@pytest.mark.parametrize(
    "fields",
    [
        {"add_generation_prompt": False},
        {"add_generation_prompt": False, "continue_final_message": True},
        {"add_special_tokens": True},
        {"chat_template_kwargs": {"bos_token": "<|x|>"}},
    ],
    ids=["no-generation-prompt", "continue-final-message", "add-special-tokens", "chat-template-kwargs"],
)
def test_chat_rendering_fields_reach_the_engine_as_tokenize_renders_them(stack: Stack, fields: dict[str, Any]) -> None:
    """The prompt the engine ran (usage.prompt_tokens) is the one /tokenize renders with the same
    fields, and another than without them; the answer is the engine's greedy continuation of it."""
    body = {"model": "demo", "messages": CONVERSATION}
    _, plain = stack.post("/tokenize", json.dumps(body).encode())
    _, rendered = stack.post("/tokenize", json.dumps({**body, **fields}).encode())
    assert rendered["tokens"] != plain["tokens"]
    chat = stack.client.chat.completions.create(
        model="demo", messages=CONVERSATION, max_tokens=4, temperature=0, extra_body=fields
    )
    assert chat.usage.prompt_tokens == rendered["count"]
    same = stack.client.completions.create(model="demo", prompt=rendered["tokens"], max_tokens=4, temperature=0)
    assert chat.choices[0].message.content == same.choices[0].text


def test_model_may_be_left_out_and_images_to_this_text_only_model_are_refused(stack: Stack) -> None:
    status, answer = stack.post(
        "/v1/chat/completions", json.dumps({"messages": MESSAGES, "max_tokens": 3, "temperature": 0}).encode()
    )
    assert status == 200 and answer["model"] == "demo" and answer["usage"]["completion_tokens"] == 3, answer
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    status, answer = stack.post(
        "/v1/chat/completions",
        json.dumps({"model": "demo", "messages": [{"role": "user", "content": [image]}]}).encode(),
    )
    assert status == 400 and answer["error"]["param"] == "messages[0].content[0]", answer
    assert "not a multimodal model" in answer["error"]["message"]


# ---- n, prompt_logprobs, echo with logprobs: as vLLM's offline engine answers ---------------------


@pytest.mark.parametrize("stream", [False, True])
def test_n_seeded_choices_are_the_ones_vllm_samples(stack: Stack, offline: dict[str, Any], stream: bool) -> None:
    """Choice i is sampled with seed + i, as vLLM's own n: the same three texts as its offline engine."""
    expected = [c["text"] for c in offline["seeded"]["choices"]]
    assert len(set(expected)) == 3, "control: seeded choices must differ"
    resp = stack.client.completions.create(
        model="demo",
        prompt=PROMPT_IDS,
        stream=stream,
        **SEEDED,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    )
    if stream:
        chunks = list(resp)
        texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
        usage = chunks[-1].usage
    else:
        texts = [c.text for c in sorted(resp.choices, key=lambda c: c.index)]
        usage = resp.usage
    assert texts == expected
    assert usage.prompt_tokens == len(PROMPT_IDS)
    assert usage.completion_tokens == sum(len(c["ids"]) for c in offline["seeded"]["choices"])


def test_n_on_chat_and_greedy_n_refused_as_vllm_does(stack: Stack) -> None:
    chat = stack.client.chat.completions.create(model="demo", messages=MESSAGES, n=2, seed=4, max_tokens=6)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content != chat.choices[1].message.content
    with pytest.raises(openai.BadRequestError) as err:  # vLLM 0.32: "n must be 1 when using greedy sampling"
        stack.client.completions.create(model="demo", prompt="x", n=2, temperature=0, max_tokens=2)
    assert err.value.body["param"] == "n"


def assert_prompt_logprobs_equal(got: list[Any], expected: list[Any]) -> None:
    assert len(got) == len(expected) and got[0] is None and expected[0] is None
    for position, (ours, theirs) in enumerate(zip(got[1:], expected[1:], strict=True), 1):
        assert list(ours) == list(theirs), position  # the same token ids, in vLLM's order
        for token, (logprob, rank) in theirs.items():
            assert ours[token]["logprob"] == pytest.approx(logprob, abs=1e-4), (position, token)
            assert ours[token]["rank"] == rank and isinstance(ours[token]["decoded_token"], str)


def test_prompt_logprobs_equal_vllms(stack: Stack, offline: dict[str, Any]) -> None:
    completion = stack.client.completions.create(
        model="demo", prompt=PROMPT_IDS, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 3}
    ).model_dump()
    assert_prompt_logprobs_equal(completion["choices"][0]["prompt_logprobs"], offline["prompt_logprobs"])
    chat = stack.client.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=2, temperature=0, extra_body={"prompt_logprobs": 3}
    ).model_dump()
    assert chat["usage"]["prompt_tokens"] == len(offline["chat_ids"])
    assert_prompt_logprobs_equal(chat["prompt_logprobs"], offline["chat_prompt_logprobs"])


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_puts_the_prompts_logprobs_first(
    stack: Stack, offline: dict[str, Any], stream: bool
) -> None:
    resp = stack.client.completions.create(
        model="demo", prompt=PROMPT_IDS, max_tokens=3, temperature=0, echo=True, logprobs=2, stream=stream
    )
    parts = [c.choices[0] for c in resp if c.choices and c.choices[0].logprobs] if stream else [resp.choices[0]]
    token_logprobs = [v for c in parts for v in c.logprobs.token_logprobs]
    tops = [t for c in parts for t in c.logprobs.top_logprobs]
    expected = offline["prompt_logprobs"]
    assert len(token_logprobs) == len(PROMPT_IDS) + 3
    assert token_logprobs[0] is None and tops[0] is None  # the first prompt token has none
    for i, token in enumerate(PROMPT_IDS[1:], 1):
        assert token_logprobs[i] == pytest.approx(expected[i][str(token)][0], abs=1e-4), i
        assert 2 <= len(tops[i]) <= 3  # its own and the top 2
    assert all(isinstance(v, float) for v in token_logprobs[len(PROMPT_IDS) :])
    _, decoded = stack.post("/detokenize", json.dumps({"model": "demo", "tokens": PROMPT_IDS}).encode())
    assert "".join(c.text for c in parts).startswith(decoded["prompt"])


# ---- tools: tool_choice required / a named function, forced by the schema vLLM builds from the tools ----


# Small on purpose: the demo tokenizer spends about a token per character of JSON, the tools are in
# the prompt (about 170 tokens each here), and the model's context is 512 tokens.
# A pattern, not just maxLength: xgrammar lets a raw control character into a JSON string, which
# strict JSON (and json.loads) refuses.
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,6}$"}},
    "required": ["city"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"h24": {"type": "boolean"}},
    "required": ["h24"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": WEATHER}}
CLOCK_TOOL = {"type": "function", "function": {"name": "clock", "parameters": CLOCK}}
NOW_TOOL = {"type": "function", "function": {"name": "now"}}  # no parameters: vLLM asks for an object
SCHEMAS = {"weather": WEATHER, "clock": CLOCK, "now": {"type": "object"}}


def tool_calls(
    client: openai.OpenAI, stream: bool, tools: list[dict[str, Any]], **kwargs: Any
) -> tuple[list[tuple[str, str]], str | None]:
    """(name, arguments) of each call, streamed deltas joined by index, and the finish reason."""
    resp = client.chat.completions.create(
        model="demo",
        messages=kwargs.pop("messages", MESSAGES),
        tools=tools,
        max_tokens=kwargs.pop("max_tokens", 120),
        temperature=0.8,
        seed=7,
        stream=stream,
        **kwargs,
    )
    if not stream:
        choice = resp.choices[0]
        return [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []], choice.finish_reason
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in resp:
        for choice in chunk.choices:
            assert not choice.delta.content, choice.delta  # forced calls stream as tool_calls only
            for tc in choice.delta.tool_calls or []:
                call = calls.setdefault(tc.index, ["", ""])
                call[0] += (tc.function.name or "") if tc.function else ""
                call[1] += (tc.function.arguments or "") if tc.function else ""
            finish = choice.finish_reason or finish
    return [(name, args) for name, args in calls.values()], finish


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_yields_a_call_that_validates(stack: Stack, stream: bool) -> None:
    calls, finish = tool_calls(
        stack.client, stream, [CLOCK_TOOL], tool_choice={"type": "function", "function": {"name": "clock"}}
    )
    assert [name for name, _ in calls] == ["clock"] and finish == "stop"  # vllm serve: stop for a named call
    jsonschema.validate(json.loads(calls[0][1]), CLOCK)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_yields_calls_that_validate(stack: Stack, stream: bool) -> None:
    # Room to write: xgrammar lets the random model pad JSON with whitespace.
    calls, finish = tool_calls(
        stack.client,
        stream,
        [WEATHER_TOOL, NOW_TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=230,
    )
    assert len(calls) == 1 and finish == "tool_calls", calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_tool_turns_in_the_history_are_accepted_and_rendered(stack: Stack) -> None:
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": json.dumps({"city": "Oslo"})},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 and snowing"},
    ]
    calls, _ = tool_calls(
        stack.client,
        False,
        [WEATHER_TOOL],
        messages=history,
        max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "weather"}},
    )
    jsonschema.validate(json.loads(calls[0][1]), WEATHER)
    # The tools and the tool turns are in the prompt the engine saw (as vllm serve renders them).
    sizes = [
        stack.client.chat.completions.create(model="demo", max_tokens=1, **body).usage.prompt_tokens
        for body in (
            {"messages": MESSAGES},
            {"messages": MESSAGES, "tools": [WEATHER_TOOL], "tool_choice": "none"},
            {"messages": history, "tools": [WEATHER_TOOL], "tool_choice": "none"},
        )
    ]
    assert sizes[0] < sizes[1] < sizes[2], sizes


def test_auto_tool_choice_parses_the_models_text(stack: Stack) -> None:
    """The random model writes no pythonic call: auto returns its text as content, no call."""
    choice, plain = (
        stack.client.chat.completions.create(
            model="demo", messages=MESSAGES, tools=[WEATHER_TOOL], max_tokens=8, temperature=0, **extra
        ).choices[0]
        for extra in ({}, {"tool_choice": "none"})
    )
    assert not choice.message.tool_calls and choice.finish_reason == "length"
    assert choice.message.content == plain.message.content and plain.message.content
