"""Structured outputs through vLLM's own backends, on a real engine behind the frontend.

One stack (``dynamo-worker up``: nats-server, frontend, one decode worker on vLLM with the
random demo model) for the module. The demo model's weights are random, so only constrained
decoding can produce text that parses and validates: every test checks every output against its
schema or regex, streaming and not, and a test cannot pass by luck.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import openai
import pytest

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


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with up_stack(tmp_path_factory.mktemp("so"), "--max-num-seqs", "8") as s:
        yield s


def chat_text(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, str | None]:
    resp = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=kwargs.pop("max_tokens", 120),
                                          temperature=0.8, seed=3, stream=stream, **kwargs)
    if not stream:
        return resp.choices[0].message.content or "", resp.choices[0].finish_reason
    chunks = [c for c in resp if c.choices]
    return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason


def completion_text(client: openai.OpenAI, stream: bool, **kwargs: Any) -> tuple[str, str | None]:
    resp = client.completions.create(model="demo", prompt="The code is", max_tokens=kwargs.pop("max_tokens", 40),
                                     temperature=kwargs.pop("temperature", 0.8), seed=5, stream=stream, **kwargs)
    if not stream:
        return resp.choices[0].text, resp.choices[0].finish_reason
    chunks = [c for c in resp if c.choices]
    return "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_response_format_json_schema_output_validates(stack: Stack, stream: bool) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for text, finish in (chat_text(stack.client, stream, response_format=fmt),
                         completion_text(stack.client, stream, max_tokens=120, extra_body={"response_format": fmt})):
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
    for text, finish in (chat_text(stack.client, stream, extra_body=body),
                         completion_text(stack.client, stream, max_tokens=120, extra_body=body)):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body", [{"structured_outputs": {"regex": CODE}}, {"guided_regex": CODE}],
                         ids=["structured_outputs", "guided_regex"])
def test_regex_output_fully_matches(stack: Stack, stream: bool, body: dict[str, Any]) -> None:
    for text, finish in (completion_text(stack.client, stream, extra_body=body),
                         chat_text(stack.client, stream, extra_body=body)):
        assert finish == "stop" and re.fullmatch(CODE, text), text


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body", [{"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}},
                                  {"guided_choice": ["alpha", "beta", "gamma"]}],
                         ids=["structured_outputs", "guided_choice"])
def test_choice_output_is_one_of_the_choices(stack: Stack, stream: bool, body: dict[str, Any]) -> None:
    for text, _ in (completion_text(stack.client, stream, extra_body=body),
                    chat_text(stack.client, stream, extra_body=body)):
        assert text in ("alpha", "beta", "gamma")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("field", ["structured_outputs", "guided_grammar"])
def test_grammar_output_is_in_the_language(stack: Stack, stream: bool, field: str) -> None:
    grammar = 'root ::= "light is " ("on" | "off") "."'
    body = {"structured_outputs": {"grammar": grammar}} if field == "structured_outputs" else {"guided_grammar": grammar}
    text, finish = completion_text(stack.client, stream, extra_body=body)
    assert finish == "stop" and re.fullmatch(r"light is (on|off)\.", text), text


BAD_CONSTRAINTS = [
    pytest.param("/v1/completions", {"guided_regex": "[a-"}, "guided_regex", id="invalid-regex"),
    pytest.param("/v1/completions", {"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs",
                 id="invalid-regex-structured-outputs"),
    pytest.param("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "no-such-type"}}}}, "response_format", id="invalid-schema"),
    pytest.param("/v1/completions", {"guided_json": "{not json"}, "guided_json", id="schema-not-json"),
    pytest.param("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "[a-"}}}}, "response_format",
                 id="schema-with-an-invalid-pattern"),
    pytest.param("/v1/completions", {"guided_grammar": "root ::= ( unbalanced"}, "guided_grammar",
                 id="invalid-grammar"),
]


@pytest.mark.parametrize(("path", "extra", "param"), BAD_CONSTRAINTS)
def test_a_constraint_vllm_cannot_compile_is_a_400_naming_the_field(stack: Stack, path: str,
                                                                    extra: dict[str, Any], param: str) -> None:
    body = {"model": "demo", "max_tokens": 4, **extra}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "x"})
    status, answer = stack.post(path, json.dumps(body).encode())
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
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
    _, tokens = stack.post("/tokenize", json.dumps({"model": "demo", "prompt": " garden",
                                                    "add_special_tokens": False}).encode())
    token = tokens["tokens"][-1]
    _, expected = stack.post("/detokenize", json.dumps({"model": "demo", "tokens": [token] * 5}).encode())
    for stream in (False, True):
        text, finish = completion_text(stack.client, stream, max_tokens=5, temperature=0,
                                       logit_bias={str(token): 100})
        assert (text, finish) == (expected["prompt"], "length")
    plain, _ = completion_text(stack.client, False, max_tokens=5, temperature=0)
    assert plain != expected["prompt"]
