"""Limits and back-pressure: past a limit the frontend answers 413/400/429 at once, then serves on.

A real frontend process in front of an echo worker serving the demo model's tokenizer (no
engine): the limits are the frontend's, so the engine is not the point.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import NatsServer, WorkerProcess, free_port, run_cli, wait_until

LIMITS = [
    "--max-concurrent-requests",
    "2",
    "--max-prompt-tokens",
    "40",
    "--max-completion-tokens",
    "8",
    "--max-request-bytes",
    "2048",
]


class Limited:
    def __init__(self, nats: NatsServer, model: str) -> None:
        common = ["--nats-url", nats.url, "--namespace", "limits"]
        self.http_port = free_port()
        # 0.3 s per token: 8 tokens hold a request for over 2 s, long enough to fill the slots.
        self.worker = WorkerProcess(["--role", "echo", *common, "--echo-model", model, "--echo-delay", "0.3"])
        self.frontend = WorkerProcess(["--role", "frontend", *common, "--http-port", str(self.http_port), *LIMITS])
        self.base = f"http://127.0.0.1:{self.http_port}"
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0)

    def post(self, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        req = urllib.request.Request(f"{self.base}/v1/completions", body, {"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.load(resp), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err), dict(err.headers)

    def metric(self, name: str, **labels: str) -> float:
        body = urllib.request.urlopen(f"{self.base}/metrics").read().decode()
        return sum(
            s.value
            for fam in text_string_to_metric_families(body)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )


@pytest.fixture(scope="module")
def limited(nats_server: NatsServer, demo_model: str) -> Iterator[Limited]:
    d = Limited(nats_server, demo_model)
    try:
        d.worker.wait_for_log("serving")
        d.frontend.wait_for_log("frontend listening")
        wait_until(lambda: d.client.models.list().data, 15, what="the echo model in the frontend")
        yield d
    finally:
        d.frontend.stop()
        d.worker.stop()


def completion(**fields: Any) -> bytes:
    return json.dumps({"model": "echo", "prompt": "the little bird", **fields}).encode()


def test_a_body_over_max_request_bytes_is_413(limited: Limited) -> None:
    status, body, _ = limited.post(completion(prompt="x" * 4000))
    assert status == 413 and "--max-request-bytes" in body["error"]["message"]


def test_a_prompt_over_max_prompt_tokens_is_400(limited: Limited) -> None:
    status, body, _ = limited.post(completion(prompt=" ".join(["bird"] * 60), max_tokens=2))
    assert status == 400
    assert (body["error"]["type"], body["error"]["param"]) == ("BadRequestError", "prompt")
    assert "--max-prompt-tokens" in body["error"]["message"]


def test_max_tokens_over_the_limit_is_400_and_no_max_tokens_gets_the_limit(limited: Limited) -> None:
    status, body, _ = limited.post(completion(max_tokens=9))
    assert status == 400 and body["error"]["param"] == "max_tokens"
    assert "--max-completion-tokens" in body["error"]["message"]
    # The same limit under the chat route's spelling.
    status, body, _ = _chat(
        limited, {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 50}
    )
    assert status == 400 and body["error"]["param"] == "max_completion_tokens"
    # Without max_tokens a request gets at most the limit (the echo worker would send the whole prompt).
    out = limited.client.completions.create(model="echo", prompt="one two three four five six seven eight nine ten")
    assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"


def _chat(limited: Limited, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(
        f"{limited.base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err), dict(err.headers)


def test_past_max_concurrent_requests_the_next_gets_429_with_retry_after(limited: Limited) -> None:
    results: list[int] = []

    def slow() -> None:
        out = limited.client.completions.create(
            model="echo", prompt="one two three four five six seven eight", max_tokens=8
        )
        results.append(out.usage.completion_tokens)

    before = limited.metric("dynamo_frontend_rejected_requests_total", reason="overloaded")
    holders = [threading.Thread(target=slow) for _ in range(2)]
    for t in holders:
        t.start()
    # Wait on the frontend's own gauge, not on client timing: both slots are taken.
    wait_until(
        lambda: limited.metric("dynamo_frontend_inflight_requests") == 2,
        30,
        interval=0.02,
        what="two requests in flight in the frontend",
    )
    status, body, headers = limited.post(completion(max_tokens=2))
    assert status == 429 and headers.get("Retry-After") == "1"
    assert (body["error"]["type"], body["error"]["code"]) == ("TooManyRequestsError", 429)
    with pytest.raises(openai.RateLimitError):
        limited.client.completions.create(model="echo", prompt="hi", max_tokens=2)
    for t in holders:
        t.join(60)
    # The requests holding the slots were not disturbed, and the slots are free again.
    assert results == [8, 8]
    assert limited.metric("dynamo_frontend_rejected_requests_total", reason="overloaded") == before + 2
    assert limited.client.completions.create(model="echo", prompt="hi", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-concurrent-requests", "0", "--max-concurrent-requests must be at least 1"),
        ("--max-prompt-tokens", "-1", "--max-prompt-tokens must be 0 or more"),
        ("--max-completion-tokens", "-5", "--max-completion-tokens must be 0 or more"),
        ("--api-key", " ", "--api-key is blank"),
    ],
)
def test_limit_flag_mistakes_are_one_line_errors(flag: str, value: str, message: str) -> None:
    out = run_cli("--role", "frontend", flag, value)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_a_503_for_a_model_without_workers_says_when_to_retry(limited: Limited) -> None:
    # Runs last: it stops the module's worker.
    limited.worker.stop()
    wait_until(lambda: limited.post(completion(max_tokens=2))[0] == 503, 30, what="the model to lose its worker")
    status, body, headers = limited.post(completion(max_tokens=2))
    assert status == 503 and headers.get("Retry-After") == "1"
    assert (body["error"]["type"], body["error"]["code"]) == ("ServiceUnavailableError", 503)
