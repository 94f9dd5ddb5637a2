"""Disaggregated prefill/decode on the real vLLM engine (CPU, the demo model), with vLLM's
file-based ExampleConnector: one prefill worker, one decode worker and a frontend.

One deployment for the module (engine start-up is the slow part); the tests run in file order
and the last one kills the prefill worker. The reference is vLLM's offline engine without any
connector (aggregated), computed before the workers start.

The example connector moves whole KV blocks only (128 tokens on CPU), the first
``(prompt_len - 2) // 128 * 128`` tokens: prompts here are 150 tokens long, so 128 of them
travel through the connector and the decode worker computes the other 22.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_worker.core.runtime import Runtime
from tests.engine_helpers import ENGINE_FLAGS, offline_greedy
from tests.helpers import (
    NatsServer,
    WorkerProcess,
    free_kv_event_port,
    free_port,
    run_cli,
    wait_until,
    worker_env,
)

PROMPT_LEN = 150
TRANSFERRED = 128  # (150 - 2) // 128 * 128: the tokens whose KV the connector moves
MAX_TOKENS = 16
_rng = random.Random(6)
# Disaggregated prompts (first four), prompts for the fallback test (three), one whose KV files
# the test corrupts; all distinct from their first token, so none shares a cached prefix.
PROMPTS = [[3 + i] + [_rng.randrange(3, 500) for _ in range(PROMPT_LEN - 1)] for i in range(8)]
DISAGG, FALLBACK, CORRUPTED = PROMPTS[:4], PROMPTS[4:7], PROMPTS[7]
COMMON = ["--served-model-name", "tiny", "--lease-ttl", "2", *ENGINE_FLAGS]


@pytest.fixture(scope="module")
def reference(demo_model: str, tmp_path_factory: pytest.TempPathFactory) -> list[list[int]]:
    return offline_greedy(demo_model, PROMPTS, MAX_TOKENS, tmp_path_factory.mktemp("offline"))


class Deployment:
    def __init__(self, nats: NatsServer, model: str, tmp: Path) -> None:
        self.nats, self.namespace = nats, f"pd{uuid.uuid4().hex[:8]}"
        self.storage = tmp / "kv-shared"
        self.storage.mkdir()
        self.http_port, self.prefill_port, self.decode_port = free_port(), free_port(), free_port()
        base = [
            "--model",
            model,
            "--nats-url",
            nats.url,
            "--namespace",
            self.namespace,
            *COMMON,
            "--connector",
            "example",
            "--kv-shared-storage",
            str(self.storage),
        ]
        self.prefill = WorkerProcess(
            ["--role", "prefill", *base, "--system-port", str(self.prefill_port)],
            env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port())),
        )
        self.decode = WorkerProcess(
            ["--role", "decode", *base, "--system-port", str(self.decode_port)],
            env=worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port())),
        )
        self.frontend = WorkerProcess(
            [
                "--role",
                "frontend",
                "--nats-url",
                nats.url,
                "--namespace",
                self.namespace,
                "--http-port",
                str(self.http_port),
                "--lease-ttl",
                "2",
            ]
        )
        self.base = f"http://127.0.0.1:{self.http_port}"

    async def runtime(self) -> Runtime:
        return await Runtime.connect(self.nats.url, self.namespace)

    @staticmethod
    def metric(url: str, name: str, **labels: str) -> float:
        body = urllib.request.urlopen(f"{url}/metrics").read().decode()
        return sum(
            s.value
            for fam in text_string_to_metric_families(body)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def external_hits(self) -> float:
        """vLLM's count of prompt tokens the decode engine took from the KV connector."""
        return self.metric(f"http://127.0.0.1:{self.decode_port}", "vllm:external_prefix_cache_hits_total")

    def frontend_metric(self, name: str, **labels: str) -> float:
        return self.metric(self.base, name, **labels)

    def complete(self, prompt: list[int]) -> dict[str, Any]:
        body = json.dumps(
            {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        ).encode()
        req = urllib.request.Request(f"{self.base}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.load(resp)

    def stop(self) -> None:
        for worker in (self.prefill, self.decode, self.frontend):
            worker.stop()


@pytest.fixture(scope="module")
def deployment(
    reference: Any, nats_server: NatsServer, demo_model: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    d = Deployment(nats_server, demo_model, tmp_path_factory.mktemp("pd"))
    try:
        d.frontend.wait_for_log("serving")
        d.prefill.wait_for_log("serving", timeout=300)
        d.decode.wait_for_log("serving", timeout=300)
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def texts(demo_model: str, reference: list[list[int]]) -> list[str]:
    """The reference token ids as the frontend's completion text: the tokenizer's decoding, less a
    character the output stops inside (as vLLM drops it).

    Not vLLM's own text: these random prompts can end inside a UTF-8 character, and then vLLM's
    detokenizer (a DecodeStream seeded with the prompt) returns a different text from the same
    token ids (2 of these 8 prompts; the frontend follows the tokenizer, docs/frontend.md)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model, local_files_only=True)
    return [tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd") for ids in reference]


def greedy(prompt: list[int], **extra: Any) -> dict[str, Any]:
    return {
        "token_ids": prompt,
        "sampling_options": {"temperature": 0.0},
        "stop_conditions": {"max_tokens": MAX_TOKENS, "ignore_eos": True},
        **extra,
    }


async def test_the_prefill_worker_registers_its_own_component_endpoints_and_canary(deployment: Deployment) -> None:
    rt = await deployment.runtime()
    try:
        [record] = await rt.client("prefill", "generate").wait_for_instances(10)
        assert record.role == "prefill" and record.data["model"] == "tiny" and record.data["kind"] == "prefill"
        assert [r.role for r in await rt.client("backend", "generate").wait_for_instances(10)] == ["decode"]
        url = f"http://127.0.0.1:{deployment.prefill_port}/health"
        health = json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(url).read()))
        assert health["status"] == "healthy" and health["endpoints"] == ["clear_kv_blocks", "generate", "kv_blocks"]
        client = rt.client("prefill", "clear_kv_blocks")
        await client.wait_for_instances(10)
        assert [x async for x in client.generate({})] == [{"status": "success", "message": "KV cache cleared"}]
    finally:
        await rt.close()


async def test_prefill_then_decode_by_hand_gives_the_aggregated_tokens(
    deployment: Deployment, reference: list[list[int]]
) -> None:
    """The wire protocol itself: one prefill chunk, then decode with it as prefill_result."""
    prompt, expected = DISAGG[0], reference[0]
    rt = await deployment.runtime()
    try:
        prefill = rt.client("prefill", "generate")
        await prefill.wait_for_instances(10)
        [chunk] = [c async for c in prefill.generate(greedy(prompt))]
        assert len(chunk["token_ids"]) == 1 and chunk["token_ids"][0] == expected[0]
        assert "disaggregated_params" in chunk and chunk["finish_reason"] == "length"
        assert chunk["completion_usage"]["prompt_tokens"] == PROMPT_LEN
        assert any(deployment.storage.iterdir()), "the prefill wrote no KV files"
        before = deployment.external_hits()
        decode = rt.client("backend", "generate")
        await decode.wait_for_instances(10)
        prefill_result = {"disaggregated_params": chunk["disaggregated_params"]}
        chunks = [c async for c in decode.generate(greedy(prompt, prefill_result=prefill_result))]
        assert [t for c in chunks for t in c["token_ids"]] == expected
        assert chunks[-1]["completion_usage"]["prompt_tokens_details"] == {"cached_tokens": TRANSFERRED}
        wait_until(
            lambda: deployment.external_hits() == before + TRANSFERRED,
            10,
            what="the decode engine to count the transferred tokens",
        )
    finally:
        await rt.close()


async def test_the_decode_output_comes_from_the_transferred_kv(
    deployment: Deployment, reference: list[list[int]]
) -> None:
    """Negative control: zero the KV files the prefill wrote, and the decode output changes."""
    import safetensors.torch
    import torch

    before = set(deployment.storage.iterdir())
    rt = await deployment.runtime()
    try:
        prefill = rt.client("prefill", "generate")
        await prefill.wait_for_instances(10)
        [chunk] = [c async for c in prefill.generate(greedy(CORRUPTED))]
        [folder] = set(deployment.storage.iterdir()) - before  # this prompt's KV, one file per layer
        files = sorted(folder.glob("*.safetensors"))
        assert files
        for path in files:
            kv = safetensors.torch.load_file(str(path))["kv_cache"]
            assert kv.shape[0] == TRANSFERRED and kv.abs().sum() > 0
            safetensors.torch.save_file({"kv_cache": torch.zeros_like(kv)}, str(path))
        decode = rt.client("backend", "generate")
        prefill_result = {"disaggregated_params": chunk["disaggregated_params"]}
        chunks = [c async for c in decode.generate(greedy(CORRUPTED, prefill_result=prefill_result))]
        assert [t for c in chunks for t in c["token_ids"]] != reference[7]
    finally:
        await rt.close()


def test_the_frontend_serves_disaggregated_with_the_aggregated_output(deployment: Deployment, texts: list[str]) -> None:
    d = deployment
    assert len(set(texts[:4])) == 4, "control: different prompts must give different output"
    hits, disagg = d.external_hits(), d.frontend_metric("dynamo_frontend_disaggregated_requests_total")
    for i, prompt in enumerate(DISAGG[1:], start=1):  # prompts the decode worker has never seen
        body = d.complete(prompt)
        assert body["choices"][0]["text"] == texts[i]
        # Prompt tokens the decode engine did not compute: all from the connector (a fresh prompt
        # has no local prefix-cache hit), and vLLM's connector counter says the same.
        assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": TRANSFERRED}
    assert d.frontend_metric("dynamo_frontend_disaggregated_requests_total") == disagg + 3
    wait_until(lambda: d.external_hits() == hits + 3 * TRANSFERRED, 10, what="3 transfers on the decode engine")
    assert d.frontend_metric("dynamo_frontend_prefill_fallbacks_total") == 0


async def test_killing_the_prefill_worker_falls_back_to_aggregated_without_client_errors(
    deployment: Deployment, texts: list[str]
) -> None:
    d = deployment
    expected = dict(zip(map(tuple, PROMPTS), texts))

    async def one(prompt: list[int]) -> str:
        return (await asyncio.to_thread(d.complete, prompt))["choices"][0]["text"]

    async def load(stop: asyncio.Event) -> list[tuple[list[int], str]]:
        done = []
        while not stop.is_set():
            for prompt in DISAGG:  # prefilled before: the connector has their KV files either way
                done.append((prompt, await one(prompt)))
        return done

    stop = asyncio.Event()
    running = [asyncio.create_task(load(stop)) for _ in range(2)]
    await asyncio.sleep(1.0)
    os.killpg(d.prefill.pid, signal.SIGKILL)  # the worker and its engine core, mid-run
    await asyncio.to_thread(d.prefill.wait, 30)
    await asyncio.sleep(3.0)  # its lease (2 s) runs out meanwhile; requests keep flowing
    stop.set()
    results = [r for task in running for r in await task]
    assert len(results) > 4 and all(text == expected[tuple(p)] for p, text in results)

    # Now nothing can prefill: fresh prompts are served aggregated, loading nothing from the
    # connector, and every one of them is counted as a fallback.
    hits, fallbacks = d.external_hits(), d.frontend_metric("dynamo_frontend_prefill_fallbacks_total")
    assert fallbacks > 0
    for prompt in FALLBACK:
        assert await one(prompt) == expected[tuple(prompt)]
    assert d.frontend_metric("dynamo_frontend_prefill_fallbacks_total", reason="no_prefill_worker") >= 3
    assert d.frontend_metric("dynamo_frontend_prefill_fallbacks_total") == fallbacks + 3
    assert d.external_hits() == hits


def test_connector_flag_mistakes_are_one_line_errors() -> None:
    nats = ["--nats-url", "nats://127.0.0.1:1", "--model", "/tmp"]
    cases = [
        (["--role", "prefill"], "the prefill role needs a KV connector"),
        (["--is-prefill-worker", "--connector", "none"], "the prefill role needs a KV connector"),
        (
            [
                "--role",
                "decode",
                "--connector",
                "example",
                "--kv-transfer-config",
                '{"kv_connector":"ExampleConnector","kv_role":"kv_both"}',
            ],
            "Cannot specify both",
        ),
        (["--role", "decode", "--connector", "example"], "--connector example needs --kv-shared-storage"),
        (
            ["--role", "prefill", "--connector", "example", "--kv-shared-storage", "/no/such/dir"],
            "--kv-shared-storage /no/such/dir: no such directory",
        ),
        (["--role", "decode", "--kv-shared-storage", "/tmp"], "--kv-shared-storage is only used with --connector"),
        (["--role", "decode", "--connector", "bogus"], "--connector: invalid choice: 'bogus'"),
    ]
    for args, message in cases:
        out = run_cli(*args, *nats)
        assert out.returncode == 2, (args, out.stderr)
        last = out.stderr.strip().splitlines()[-1]
        assert last.startswith("dynamo-worker: error:") and message in last, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_nixl_with_tensor_parallel_size_1_forces_the_mp_executor_unless_set() -> None:
    from types import SimpleNamespace

    from dynamo_worker.engine import kv_transfer

    nixl = SimpleNamespace(kv_connector="NixlConnector", kv_role="kv_both", kv_connector_extra_config={})
    options = SimpleNamespace(connector=None, kv_shared_storage=None)
    had_host = "VLLM_NIXL_SIDE_CHANNEL_HOST" in os.environ
    try:
        args = SimpleNamespace(kv_transfer_config=nixl, tensor_parallel_size=1, distributed_executor_backend=None)
        decided = kv_transfer.configure(options, args, role="prefill", required=True)
        assert args.distributed_executor_backend == "mp" and decided["distributed_executor_backend_forced"]
        assert decided["from"] == "--kv-transfer-config" and decided["kv_role"] == "kv_both"
        assert os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"]
        for tp, backend in ((1, "ray"), (2, None)):  # the user's choice, or tensor parallelism: unchanged
            args = SimpleNamespace(
                kv_transfer_config=nixl, tensor_parallel_size=tp, distributed_executor_backend=backend
            )
            kv_transfer.configure(options, args, role="decode", required=False)
            assert args.distributed_executor_backend == backend
        none = SimpleNamespace(connector="none", kv_shared_storage=None)
        args = SimpleNamespace(kv_transfer_config=None, tensor_parallel_size=1, distributed_executor_backend=None)
        assert kv_transfer.configure(none, args, role="decode", required=False) is None
        assert args.kv_transfer_config is None
    finally:
        if not had_host:
            os.environ.pop("VLLM_NIXL_SIDE_CHANNEL_HOST", None)


class _FakeClient:
    """A Client over fixed instances whose ``direct`` replays a script per instance (no NATS)."""

    def __init__(self, component: str, scripts: dict[str, Any]) -> None:
        from dynamo_worker.core.discovery import InstanceRecord

        self.records = [
            InstanceRecord("ns", component, "generate", iid, component, 1, "h", {"model": "tiny"}) for iid in scripts
        ]
        self.scripts = scripts
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def instances(self, where: Any = None) -> list[Any]:
        return [r for r in self.records if where is None or where(r)]

    def pick(self, policy: str = "round_robin", where: Any = None) -> Any:
        return self.instances(where)[0]

    async def direct(self, payload: dict[str, Any], instance_id: str) -> Any:
        self.sent.append((instance_id, payload))
        for item in self.scripts[instance_id]:
            if isinstance(item, Exception):
                raise item
            yield item

    async def direct_batches(self, payload: dict[str, Any], instance_id: str) -> Any:
        async for item in self.direct(payload, instance_id):
            yield [item]


async def test_a_migrated_stream_continues_aggregated_and_a_failed_prefill_falls_back() -> None:
    from dynamo_worker.core.request_plane import RequestError
    from dynamo_worker.frontend.disaggregation import PrefillRouter
    from dynamo_worker.frontend.router import Router

    gone = RequestError("unavailable", "instance left", retryable=True)
    transfer = {"kv_transfer_params": {"do_remote_prefill": True}}
    prefill = _FakeClient("prefill", {"p1": [{"token_ids": [7], "disaggregated_params": transfer}]})
    decode = _FakeClient(
        "backend",
        {"d1": [{"token_ids": [1]}, {"token_ids": [2]}, gone], "d2": [{"token_ids": [3], "finish_reason": "length"}]},
    )
    fallbacks: list[tuple[str, str]] = []
    prefills = PrefillRouter(prefill, on_fallback=lambda m, r: fallbacks.append((m, r)))  # type: ignore[arg-type]
    router = Router(decode, migration_limit=1, prefill=prefills)  # type: ignore[arg-type]
    payload = {"token_ids": [5, 6], "stop_conditions": {"max_tokens": 3}}
    out = [t for item in [i async for i in router.generate("tiny", payload)] for t in item["token_ids"]]
    assert out == [1, 2, 3]
    (_, sent1), (_, sent2) = decode.sent
    assert sent1["prefill_result"]["disaggregated_params"] == transfer  # decoded with the prefill's KV
    assert "prefill_result" not in sent2 and sent2["token_ids"] == [5, 6, 1, 2]  # migrated: aggregated
    assert prefill.sent == [("p1", payload)] and fallbacks == []

    prefill.scripts["p1"] = [gone]  # the prefill fails: aggregated, counted
    decode.sent.clear()
    decode.scripts["d1"] = [{"token_ids": [1, 2, 3], "finish_reason": "length"}]
    assert [i async for i in router.generate("tiny", payload)][-1]["token_ids"] == [1, 2, 3]
    assert "prefill_result" not in decode.sent[0][1] and fallbacks == [("tiny", "prefill_failed")]
