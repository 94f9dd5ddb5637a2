"""LoRA adapters on a real decode worker, and through the frontend; first, without an engine,
the checks of the adapter path a ``load_lora`` request names.

One real vLLM engine (CPU, the tiny demo model, ``--enable-lora --lora-dirs DIR``), a real
frontend process, and beside the real worker a scripted fake worker serving the same base model
without adapters (:class:`tests.frontend_helpers.FakeDecodeWorker`): requests naming an adapter
must reach only the worker that holds it. Adapters are tiny PEFT-layout adapters written by
:func:`tests.lora_helpers.write_demo_lora`.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime
from dynamo_worker.engine.lora import LoraManager
from tests.engine_helpers import ENGINE_FLAGS
from tests.frontend_helpers import FakeDecodeWorker, LoopThread
from tests.helpers import NatsServer, WorkerProcess, free_port, wait_until
from tests.lora_helpers import write_adapter_files, write_demo_lora

PROMPT = [0, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]
TOKENS = 12


# ---- the path checks, no engine ------------------------------------------------------------------


class EngineNeverCalled:
    """A LoraManager's engine for requests the path checks must refuse (reaching it would give
    another message: ``cannot load LoRA adapter``)."""

    async def add_lora(self, request: Any) -> None:
        raise AssertionError(f"the engine was asked to load {request.lora_path}")


def manager_for(allowed: Path) -> LoraManager:
    return LoraManager(
        EngineNeverCalled(),
        enabled=True,
        allowed_dirs=[allowed.resolve()],
        capacity=2,
        base_names={"tiny"},
        record=None,
    )


def refusal_of(allowed: Path, uri: str) -> str:
    manager = manager_for(allowed)

    async def collect() -> list[dict[str, Any]]:
        return [reply async for reply in manager.load_lora({"lora_name": "x", "source": {"uri": uri}}, None)]

    async def go() -> list[dict[str, Any]]:
        try:
            return await asyncio.wait_for(collect(), 10)
        except asyncio.TimeoutError:
            # A check blocked on a FIFO in a thread nothing can cancel: give it EOF, then fail.
            for fifo in (p for p in allowed.rglob("*") if p.is_fifo()):
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:  # ENXIO: nobody reads this one
                    continue
            pytest.fail(f"checking {uri} blocked")

    [reply] = asyncio.run(go())
    assert reply["status"] == "error", reply
    return reply["message"]


@pytest.fixture
def lora_tree(tmp_path: Path) -> dict[str, Path]:
    """--lora-dirs ``allowed`` and, outside it, a complete adapter ``secret`` (it exists: only the
    check refuses it); inside, links and special files next to adapter files."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    secret = write_adapter_files(outside / "secret")
    write_adapter_files(allowed / "good")
    (allowed / "out-link").symlink_to(secret, target_is_directory=True)
    linked_file = write_adapter_files(allowed / "linked-file")
    (linked_file / "adapter_model.safetensors").unlink()
    (linked_file / "adapter_model.safetensors").symlink_to(secret / "adapter_model.safetensors")
    fifo_config = write_adapter_files(allowed / "fifo-config")
    (fifo_config / "adapter_config.json").unlink()
    os.mkfifo(fifo_config / "adapter_config.json")
    os.mkfifo(allowed / "pipe")
    return {"allowed": allowed.resolve(), "secret": secret.resolve()}


def test_an_adapter_that_exists_outside_lora_dirs_is_refused(lora_tree: dict[str, Path]) -> None:
    secret = lora_tree["secret"]
    assert (secret / "adapter_config.json").is_file()
    assert refusal_of(lora_tree["allowed"], str(secret)) == f"{secret} is outside the directories --lora-dirs allows"
    assert (
        refusal_of(lora_tree["allowed"], secret.as_uri()) == f"{secret} is outside the directories --lora-dirs allows"
    )


def test_dot_dot_out_of_lora_dirs_is_refused(lora_tree: dict[str, Path]) -> None:
    uri = f"{lora_tree['allowed']}/../outside/secret"
    assert refusal_of(lora_tree["allowed"], uri) == f"{uri}: '..' leads outside the directories --lora-dirs allows"


def test_a_symlink_in_lora_dirs_pointing_outside_is_refused(lora_tree: dict[str, Path]) -> None:
    link = lora_tree["allowed"] / "out-link"
    assert refusal_of(lora_tree["allowed"], str(link)) == (
        f"{link}: a symbolic link leads outside the directories --lora-dirs allows"
    )


def test_an_adapter_file_linked_from_outside_lora_dirs_is_refused(lora_tree: dict[str, Path]) -> None:
    weights = lora_tree["allowed"] / "linked-file" / "adapter_model.safetensors"
    assert refusal_of(lora_tree["allowed"], str(weights.parent)) == (
        f"{weights}: a symbolic link leads outside the directories --lora-dirs allows"
    )


def test_a_fifo_in_lora_dirs_is_refused_without_blocking(lora_tree: dict[str, Path]) -> None:
    pipe = lora_tree["allowed"] / "pipe"
    assert refusal_of(lora_tree["allowed"], str(pipe)) == f"{pipe} is not a directory"
    config = lora_tree["allowed"] / "fifo-config" / "adapter_config.json"
    # vLLM's engine would open it and block for good.
    assert refusal_of(lora_tree["allowed"], str(config.parent)) == f"{config} is not a regular file (a FIFO)"


def test_an_adapter_inside_lora_dirs_passes_the_checks(lora_tree: dict[str, Path]) -> None:
    # The control for the refusals above (load_lora then hands this path to the engine).
    allowed = lora_tree["allowed"]
    assert manager_for(allowed)._resolve(str(allowed / "good")) == allowed / "good"
    assert manager_for(allowed)._resolve(f"{allowed}/linked-file/../good") == allowed / "good"


# ---- a real worker --------------------------------------------------------------------------------


class Deployment:
    def __init__(
        self, nats_url: str, namespace: str, adapters: Path, outside: Path, frontend: str, fake: FakeDecodeWorker
    ) -> None:
        self.nats_url, self.namespace = nats_url, namespace
        self.adapters, self.outside, self.frontend, self.fake = adapters, outside, frontend, fake

    async def runtime(self) -> Runtime:
        return await Runtime.connect(self.nats_url, self.namespace)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.frontend}/v1", api_key="x", max_retries=0, timeout=60)

    def models(self) -> dict[str, dict[str, Any]]:
        body = json.loads(urllib.request.urlopen(f"{self.frontend}/v1/models", timeout=10).read())
        return {m["id"]: m for m in body["data"]}


@pytest.fixture(scope="module")
def deployment(
    demo_model: str, nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    namespace = f"lora{uuid.uuid4().hex[:8]}"
    adapters = tmp_path_factory.mktemp("adapters")
    for seed, name in enumerate(("a1", "a2", "a3", "a4"), start=1):
        write_demo_lora(adapters / name, demo_model, seed=seed)
    (adapters / "broken").mkdir()
    (adapters / "broken" / "adapter_config.json").write_text("{not json")
    outside = write_demo_lora(tmp_path_factory.mktemp("not-allowed") / "a9", demo_model, seed=9)
    worker = WorkerProcess(
        [
            "--role",
            "decode",
            "--model",
            demo_model,
            "--served-model-name",
            "tiny",
            "--nats-url",
            nats_server.url,
            "--namespace",
            namespace,
            "--enable-lora",
            "--max-lora-rank",
            "8",
            "--lora-dirs",
            str(adapters),
            *ENGINE_FLAGS,
        ]
    )
    http_port = free_port()
    frontend = WorkerProcess(
        ["--role", "frontend", "--nats-url", nats_server.url, "--namespace", namespace, "--http-port", str(http_port)]
    )
    loop = LoopThread()
    fake = FakeDecodeWorker(nats_server.url, namespace, "tiny", demo_model)
    try:
        loop.run(fake.start())
        frontend.wait_for_log("frontend listening on", 60)
        worker.wait_for_log("serving", timeout=240)
        yield Deployment(nats_server.url, namespace, adapters, outside, f"http://127.0.0.1:{http_port}", fake)
    finally:
        worker.stop()
        frontend.stop()
        loop.run(fake.stop())
        loop.close()


def greedy(model: str | None = None, prompt: list[int] = PROMPT, max_tokens: int = TOKENS) -> dict[str, Any]:
    request: dict[str, Any] = {
        "token_ids": prompt,
        "sampling_options": {"temperature": 0.0},
        "stop_conditions": {"max_tokens": max_tokens, "ignore_eos": True},
    }
    if model is not None:
        request["model"] = model
    return request


async def call(rt: Runtime, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
    client = rt.client("backend", endpoint)
    await client.wait_for_instances(10)
    [reply] = [x async for x in client.generate(payload)]
    return reply


async def real_worker(rt: Runtime) -> str:
    """The instance id of the real decode worker (the one with a lora list in its record)."""
    client = rt.client("backend", "generate")
    await client.wait_for_instances(10, count=2)
    [record] = client.instances(lambda r: "loras" in r.data)
    return record.instance_id


async def generate(rt: Runtime, instance_id: str, request: dict[str, Any]) -> list[int]:
    client = rt.client("backend", "generate")
    return [t async for chunk in client.direct(request, instance_id) for t in chunk["token_ids"]]


async def load(rt: Runtime, deployment: Deployment, name: str, directory: str | None = None) -> dict[str, Any]:
    uri = str(deployment.adapters / (directory or name))
    return await call(rt, "load_lora", {"lora_name": name, "source": {"uri": uri}})


async def test_an_adapter_loads_is_listed_and_changes_the_output(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        worker = await real_worker(rt)
        reply = await load(rt, deployment, "a1")
        assert reply["status"] == "success" and reply["lora_name"] == "a1" and reply["lora_id"] > 0
        # Loading it again is harmless; another directory under the same name is refused.
        assert (await load(rt, deployment, "a1"))["lora_id"] == reply["lora_id"]
        clash = await load(rt, deployment, "a1", "a2")
        assert clash["status"] == "error" and "unload it first" in clash["message"]
        listed = await call(rt, "list_loras", {})
        assert listed["status"] == "success" and listed["loras"]["a1"] == reply["lora_id"]

        base = await generate(rt, worker, greedy())
        adapted = await generate(rt, worker, greedy("a1"))
        assert len(base) == len(adapted) == TOKENS
        assert adapted != base, "control: the adapter must change the greedy output"
        assert await generate(rt, worker, greedy("a1")) == adapted
        assert await generate(rt, worker, greedy("tiny")) == base
    finally:
        await rt.close()


@pytest.mark.parametrize(
    "request_, message",
    [
        ({"lora_name": "x", "source": {"uri": "broken"}}, "cannot load LoRA adapter 'x'"),
        ({"lora_name": "x", "source": {"uri": "OUTSIDE"}}, "outside the directories --lora-dirs allows"),
        ({"lora_name": "x", "source": {"uri": "missing"}}, "is not a directory"),
        ({"lora_name": "x", "source": {"uri": "s3://bucket/a1"}}, "only local directories"),
        ({"lora_name": "tiny", "source": {"uri": "a1"}}, "is the base model's name"),
        ({"lora_name": "x"}, "load_lora needs"),
    ],
)
async def test_an_adapter_that_cannot_load_is_an_error_and_the_worker_keeps_serving(
    deployment: Deployment, request_: dict[str, Any], message: str
) -> None:
    if "source" in request_ and "://" not in request_["source"]["uri"]:
        uri = request_["source"]["uri"]
        request_ = {
            **request_,
            "source": {"uri": str(deployment.outside if uri == "OUTSIDE" else deployment.adapters / uri)},
        }
    rt = await deployment.runtime()
    try:
        worker = await real_worker(rt)
        reply = await call(rt, "load_lora", request_)
        assert reply["status"] == "error" and message in reply["message"], reply
        assert "x" not in (await call(rt, "list_loras", {}))["loras"]
        # A request naming it never reaches vLLM (a bad adapter there would kill the engine).
        with pytest.raises(RequestError) as err:
            await generate(rt, worker, greedy("x"))
        assert err.value.code == "not_found"
        assert len(await generate(rt, worker, greedy(max_tokens=2))) == 2
    finally:
        await rt.close()


async def test_base_and_adapter_requests_in_one_batch_get_their_unbatched_answers(deployment: Deployment) -> None:
    """The CPU mixed-batch bug: base requests batched with adapter requests got adapter weights."""
    rt = await deployment.runtime()
    try:
        worker = await real_worker(rt)
        for name in ("a1", "a2"):
            assert (await load(rt, deployment, name))["status"] == "success"
        models = [None, "a1", "a2"]
        alone = {m: await generate(rt, worker, greedy(m, max_tokens=32)) for m in models}
        assert len({tuple(v) for v in alone.values()}) == 3, "control: each model answers differently"
        batch = [m for m in models for _ in range(3)]
        together = await asyncio.gather(*(generate(rt, worker, greedy(m, max_tokens=32)) for m in batch))
        for model, got in zip(batch, together):
            assert got == alone[model], f"{model or 'base'} answered differently inside a mixed batch"
    finally:
        await rt.close()


async def test_the_frontend_lists_adapters_and_sends_them_only_to_workers_that_hold_them(
    deployment: Deployment,
) -> None:
    rt = await deployment.runtime()
    try:
        worker = await real_worker(rt)
        assert (await load(rt, deployment, "a1"))["status"] == "success"
        expected = await generate(rt, worker, greedy("a1", max_tokens=8))
    finally:
        await rt.close()
    wait_until(lambda: "a1" in deployment.models(), 10, what="a1 in /v1/models")
    card = deployment.models()["a1"]
    assert card["parent"] == "tiny" and card["object"] == "model"
    client = deployment.openai()
    seen_by_fake = len(deployment.fake.requests)
    for _ in range(4):  # round-robin would alternate between the two workers if both qualified
        resp = client.completions.create(model="a1", prompt=PROMPT, max_tokens=8, temperature=0)
        assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 8
        assert resp.model == "a1"
    assert [r for r in deployment.fake.requests[seen_by_fake:] if r.get("model") == "a1"] == []
    # The adapter's text is the real worker's adapter output.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(deployment.fake.model_path)
    # rstrip: like vLLM, the frontend drops a character the output stops inside (not U+FFFD).
    assert resp.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True).rstrip("\ufffd")
    # The base model is still served by both workers.
    for _ in range(2):
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=2)
    assert len(deployment.fake.requests) > seen_by_fake
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)


async def test_unloading_removes_the_adapter_from_the_worker_and_the_frontend(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        worker = await real_worker(rt)
        assert (await load(rt, deployment, "a3"))["status"] == "success"
        wait_until(lambda: "a3" in deployment.models(), 10, what="a3 in /v1/models")
        reply = await call(rt, "unload_lora", {"lora_name": "a3"})
        assert reply["status"] == "success" and reply["lora_name"] == "a3"
        assert "a3" not in (await call(rt, "list_loras", {}))["loras"]
        with pytest.raises(RequestError) as err:
            await generate(rt, worker, greedy("a3"))
        assert err.value.code == "not_found"
        again = await call(rt, "unload_lora", {"lora_name": "a3"})
        assert again["status"] == "error" and "not found. Available LoRAs" in again["message"]
    finally:
        await rt.close()
    wait_until(lambda: "a3" not in deployment.models(), 10, what="a3 gone from /v1/models")
    with pytest.raises(openai.NotFoundError):
        deployment.openai().completions.create(model="a3", prompt=PROMPT, max_tokens=2)


async def test_unloading_waits_for_the_requests_using_the_adapter(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        worker = await real_worker(rt)
        assert (await load(rt, deployment, "a2"))["status"] == "success"
        started = asyncio.Event()

        async def long_request() -> list[int]:
            out: list[int] = []
            async for chunk in rt.client("backend", "generate").direct(greedy("a2", max_tokens=200), worker):
                out.extend(chunk["token_ids"])
                started.set()
            return out

        running = asyncio.create_task(long_request())
        await asyncio.wait_for(started.wait(), 30)
        reply = await call(rt, "unload_lora", {"lora_name": "a2"})
        assert reply["status"] == "success"
        assert running.done() and len(running.result()) == 200  # it ran to the end on its adapter
    finally:
        await rt.close()


async def test_the_worker_holds_at_most_max_loras_minus_one_adapters_on_cpu(deployment: Deployment) -> None:
    # --max-loras defaults to 4 on CPU: three adapters, one slot always free (the mixed-batch bug).
    rt = await deployment.runtime()
    try:
        worker = await real_worker(rt)
        for name in ("a1", "a2", "a3"):
            assert (await load(rt, deployment, name))["status"] == "success"
        full = await load(rt, deployment, "a4")
        assert full["status"] == "error" and "--max-loras" in full["message"]
        assert (await call(rt, "list_loras", {}))["count"] == 3
        assert (await call(rt, "unload_lora", {"lora_name": "a3"}))["status"] == "success"
        assert (await load(rt, deployment, "a4"))["status"] == "success"
        assert len(await generate(rt, worker, greedy("a4", max_tokens=2))) == 2
        assert (await call(rt, "unload_lora", {"lora_name": "a4"}))["status"] == "success"
    finally:
        await rt.close()
