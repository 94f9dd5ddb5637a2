"""Size limits agree end to end: every size a request or a response can have is served or ends in a
clear 413, never a 500 or an idle timeout, on both request planes.

The request plane's limit is one setting, the NATS server's ``max_payload`` (the TCP plane takes
it too; ``up`` raises it in its nats-server's configuration). Each stack here is a real
nats-server, an echo worker (a TCP worker answers on both planes) and two frontend processes,
one calling over NATS, one over TCP, with the default ``--max-request-bytes`` (4 MiB).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from dynamo_worker.core.runtime import Runtime
from tests.helpers import NatsServer, WorkerProcess, free_port, wait_until

MIB = 1024 * 1024
PLANES = ("nats", "tcp")


class SizedStack:
    def __init__(self, max_payload: int | None, model: str) -> None:
        self.nats = NatsServer(max_payload=max_payload)
        self.nats.start()
        common = ["--nats-url", self.nats.url, "--namespace", "sizes"]
        self.worker = WorkerProcess(["--role", "echo", *common, "--request-plane", "tcp", "--echo-model", model])
        self.frontends: dict[str, WorkerProcess] = {}
        self.ports: dict[str, int] = {}
        for plane in PLANES:
            self.ports[plane] = free_port()
            self.frontends[plane] = WorkerProcess(
                ["--role", "frontend", *common, "--request-plane", plane, "--http-port", str(self.ports[plane])]
            )

    def wait_ready(self) -> None:
        self.worker.wait_for_log("serving")
        for plane, frontend in self.frontends.items():
            frontend.wait_for_log("frontend listening")
            wait_until(lambda p=plane: "echo" in self.models(p), 20, what=f"the echo model in the {plane} frontend")

    def models(self, plane: str) -> list[str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports[plane]}/v1/models", timeout=5) as resp:
            return [m["id"] for m in json.load(resp)["data"]]

    def chat(self, plane: str, body: bytes) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.ports[plane]}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def stop(self) -> None:
        for p in [*self.frontends.values(), self.worker]:
            p.stop()
        self.nats.cleanup()


def chat_body(size: int, model: str = "echo") -> bytes:
    """A chat request of about ``size`` bytes whose size travels to the worker: a long
    ``stop_token_ids`` list (the frontend passes it on in the request's stop conditions)."""
    head = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    base = len(json.dumps({**head, "stop_token_ids": []}))
    ids = [7] * ((size - base) // 3)  # "7, " per id
    body = json.dumps({**head, "stop_token_ids": ids}).encode()
    assert abs(len(body) - size) < 16
    return body


@pytest.fixture(scope="module")
def default_bus(demo_model: str) -> Iterator[SizedStack]:
    """nats-server's default max_payload: 1 MiB, below the frontend's 4 MiB body limit."""
    stack = SizedStack(None, demo_model)
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def raised_bus(demo_model: str) -> Iterator[SizedStack]:
    """max_payload 8 MiB, as ``up`` configures its nats-server: every body the frontend accepts fits."""
    stack = SizedStack(8 * MIB, demo_model)
    try:
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


def test_the_frontend_warns_at_start_up_that_its_body_limit_is_above_the_request_planes(
    default_bus: SizedStack, raised_bus: SizedStack
) -> None:
    for frontend in default_bus.frontends.values():
        assert "is above the request plane's 1048576-byte limit" in frontend.log()
    for frontend in raised_bus.frontends.values():
        assert "is above the request plane's" not in frontend.log()


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("size", [int(1.5 * MIB), int(3.5 * MIB)], ids=["1.5MiB", "3.5MiB"])
def test_a_body_over_the_request_planes_limit_is_413_and_the_worker_serves_on(
    default_bus: SizedStack, plane: str, size: int
) -> None:
    status, body = default_bus.chat(plane, chat_body(size))
    assert status == 413, body
    assert (body["error"]["type"], body["error"]["code"]) == ("RequestEntityTooLargeError", 413)
    assert "over its 1048576-byte limit" in body["error"]["message"]
    status, body = default_bus.chat(plane, chat_body(1000))
    assert status == 200 and body["choices"][0]["message"]["content"]


@pytest.mark.parametrize("plane", PLANES)
@pytest.mark.parametrize("size", [int(1.5 * MIB), int(3.5 * MIB)], ids=["1.5MiB", "3.5MiB"])
def test_the_same_bodies_are_served_when_the_bus_carries_them(raised_bus: SizedStack, plane: str, size: int) -> None:
    status, body = raised_bus.chat(plane, chat_body(size))
    assert status == 200, body
    assert body["usage"]["completion_tokens"] >= 1


def test_a_body_over_max_request_bytes_is_413_before_anything_is_sent(raised_bus: SizedStack) -> None:
    status, body = raised_bus.chat("tcp", chat_body(int(4.5 * MIB)))
    assert status == 413 and "--max-request-bytes" in body["error"]["message"]


@pytest.mark.parametrize("plane", PLANES)
async def test_a_response_frame_over_the_limit_is_413_not_a_timeout(
    default_bus: SizedStack, demo_model: str, plane: str
) -> None:
    """A worker whose answer would not fit in a message: the client gets a 413 at once (the
    frame's place on the stream holds the error), and the frontend serves on."""

    async def oversized(request: Any, context: Any) -> AsyncIterator[dict[str, Any]]:
        yield {"token_ids": [7], "padding": "x" * (MIB + 1)}

    worker = await Runtime.connect(default_bus.nats.url, "sizes", request_plane="tcp")
    try:
        await worker.serve_endpoint("backend", "generate", oversized)
        await worker.publish(
            "backend",
            "generate",
            "decode",
            {"model": "oversized", "model_path": demo_model, "max_model_len": 256, "eos_token_ids": []},
        )
        await asyncio.to_thread(wait_until, lambda: "oversized" in default_bus.models(plane), 20)
        status, body = await asyncio.to_thread(default_bus.chat, plane, chat_body(1000, "oversized"))
        assert status == 413, body
        assert "over the request plane's 1048576-byte limit" in body["error"]["message"]
        status, _ = await asyncio.to_thread(default_bus.chat, plane, chat_body(1000))
        assert status == 200
    finally:
        await worker.close()


def test_an_encode_worker_whose_embeddings_cannot_fit_refuses_to_start(vlm: str) -> None:
    """The tiny Blip2's image is 4 x 128 float32 embeddings, about 3.8 KB on the wire: a bus that
    carries 2 KB could never deliver one, so the worker says so at start-up (a real vision
    model's embeddings are megabytes, over nats-server's default 1 MiB)."""
    small = NatsServer(max_payload=2048)
    small.start()
    try:
        worker = WorkerProcess(
            ["--role", "encode", "--enable-multimodal", "--nats-url", small.url, "--namespace", "sizes", "--model", vlm]
        )
        assert worker.wait(60) == 2
        last = worker.log().strip().splitlines()[-1]
        assert "one image's embeddings take about 3756 bytes on the request plane, over its 2048-byte limit" in last
        assert "max_payload" in last and "Traceback" not in worker.log()
    finally:
        small.cleanup()
