"""A two-rank data-parallel deployment on one machine: rank 0 serves both ranks, rank 1 waits."""

from __future__ import annotations

import asyncio
import signal
import urllib.request
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime
from tests.engine_helpers import ENGINE_FLAGS
from tests.helpers import NatsServer, WorkerProcess, free_kv_event_port, free_port, worker_env

PROMPT = [1, 40, 41, 42, 43, 44]


async def test_rank_0_serves_both_ranks_and_rank_1_only_waits(nats_server: NatsServer, demo_model: str) -> None:
    namespace = f"dp{uuid.uuid4().hex[:8]}"
    dp = [
        "--data-parallel-size",
        "2",
        "--data-parallel-address",
        "127.0.0.1",
        "--data-parallel-rpc-port",
        str(free_port()),
    ]
    common = [
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
        *ENGINE_FLAGS,
        *dp,
    ]
    # The ranks must agree on the KV-event ports (base + rank): pick them, not the default.
    env = worker_env(DYN_VLLM_KV_EVENT_PORT=str(free_kv_event_port(2)))
    follower = WorkerProcess([*common, "--data-parallel-rank", "1"], env=env)
    port = free_port()
    leader = WorkerProcess([*common, "--data-parallel-rank", "0", "--system-port", str(port)], env=env)
    rt = await Runtime.connect(nats_server.url, namespace)
    try:
        await asyncio.to_thread(follower.wait_for_log, "not the leader", 300)
        await asyncio.to_thread(leader.wait_for_log, "serving", 300)
        client = rt.client("backend", "generate")
        [record] = await client.wait_for_instances(10)
        assert record.data["data_parallel_size"] == 2
        await asyncio.sleep(1)
        assert len(client.instances()) == 1, "only the leader is discoverable"
        answers = []
        for rank in (0, 1):
            request = {
                "token_ids": PROMPT,
                "sampling_options": {"temperature": 0.0},
                "stop_conditions": {"max_tokens": 6, "ignore_eos": True},
                "routing": {"dp_rank": rank},
            }
            answers.append([t for chunk in [c async for c in client.generate(request)] for t in chunk["token_ids"]])
        # Same model on both ranks, greedy: the same answer from each rank's engine.
        assert answers[0] == answers[1] and len(answers[0]) == 6
        # Each rank's engine served one: vLLM labels its metrics with the engine (rank) index.
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        served: dict[str, float] = {}
        for fam in text_string_to_metric_families(body):
            for sample in fam.samples:
                if sample.name == "vllm:request_success_total":  # one sample per finish reason
                    engine = sample.labels.get("engine", "")
                    served[engine] = served.get(engine, 0) + sample.value
        assert served.get("0", 0) >= 1 and served.get("1", 0) >= 1, served
        with pytest.raises(RequestError, match="routing.dp_rank must be an integer in 0..1"):
            bad = {"token_ids": PROMPT, "routing": {"dp_rank": 5}}
            [c async for c in client.generate(bad)]
        assert "data-parallel rank 1 is not the leader: serving no endpoints" in follower.log()
        for worker in (leader, follower):
            worker.signal(signal.SIGTERM)
        assert await asyncio.to_thread(leader.wait, 90) == 0
        assert await asyncio.to_thread(follower.wait, 90) == 0
    finally:
        await rt.close()
        leader.stop()
        follower.stop()
