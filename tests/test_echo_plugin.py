"""The example third-party role in plugins/echo, installed like a user's plugin, driven end to end
through the package's testing helper (dynamo_worker.testing: fixtures run_role and dynamo_nats),
as a role author's own tests would be."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from importlib.metadata import distribution

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_worker.plugin import RequestError
from dynamo_worker.testing import RunningRole


def test_the_example_plugin_is_an_installed_distribution() -> None:
    dist = distribution("dynamo-worker-echo")
    assert [ep.name for ep in dist.entry_points if ep.group == "dynamo_worker.roles"] == ["echo"]


async def test_sigterm_with_requests_in_flight_loses_none_and_exits_0(run_role) -> None:
    worker: RunningRole = run_role("echo", "--graceful-shutdown-timeout", "20")
    # The runtime's client, no frontend: nothing retries or migrates, so a stream the worker
    # cut would raise here (checked: with --graceful-shutdown-timeout 0.01 this test fails with
    # "worker shut down before the request finished").
    async with worker.client("generate") as client:
        tokens = list(range(20))

        async def one() -> list[int]:
            return [x["token_ids"][0] async for x in client.generate({"token_ids": tokens, "delay": 0.05})]

        calls = [asyncio.create_task(one()) for _ in range(8)]
        await asyncio.sleep(0.3)  # every stream is mid-way (20 x 50 ms = 1 s each)
        worker.signal(signal.SIGTERM)
        results = await asyncio.gather(*calls)
        assert results == [tokens] * 8
        assert await asyncio.to_thread(worker.wait, 30) == 0
        # Withdrawn before draining: the instance left discovery.
        assert not client.instances()
    log = worker.log()
    assert "SIGTERM received: draining" in log and "stopped (exit 0)" in log
    assert "did not finish in time" not in log


async def test_a_second_signal_exits_at_once(run_role) -> None:
    worker = run_role("echo", "--graceful-shutdown-timeout", "60")
    async with worker.client("generate") as client:
        call = asyncio.create_task(anext(aiter(client.generate({"token_ids": list(range(100)), "delay": 0.5}))))
        await call
        worker.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        start = time.monotonic()
        worker.signal(signal.SIGINT)
        status = await asyncio.to_thread(worker.wait, 10)
        assert status == 128 + signal.SIGINT and time.monotonic() - start < 2


async def test_bad_requests_get_structured_errors_and_the_role_keeps_serving(run_role) -> None:
    worker = run_role("echo")
    async with worker.client("generate") as client:
        for bad in ({"token_ids": "abc"}, [1, 2], {"token_ids": [1], "delay": -1}):
            with pytest.raises(RequestError) as err:
                [x async for x in client.generate(bad)]
            assert err.value.code == "bad_request"
        assert [x async for x in client.generate({"token_ids": [7, 8]})] == [
            {"token_ids": [7]},
            {"token_ids": [8], "finish_reason": "stop"},
        ]
        cut = {"token_ids": [7, 8, 9], "stop_conditions": {"max_tokens": 2}}
        assert [x async for x in client.generate(cut)] == [
            {"token_ids": [7]},
            {"token_ids": [8], "finish_reason": "length"},
        ]

    body = urllib.request.urlopen(f"{worker.system_url}/metrics").read().decode()
    samples = {
        (s.name, s.labels.get("error_type", "")): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }
    assert samples[("dynamo_component_requests_total", "")] == 5
    assert samples[("dynamo_component_errors_total", "bad_request")] == 3
    assert samples[("echo_tokens_total", "")] == 4
    assert samples[("dynamo_component_inflight_requests", "")] == 0
    assert urllib.request.urlopen(f"{worker.system_url}/live").status == 200


async def test_health_is_503_while_shutting_down(run_role) -> None:
    worker = run_role("echo", "--graceful-shutdown-timeout", "5")
    assert urllib.request.urlopen(f"{worker.system_url}/health").status == 200
    # Keep one request in flight so the worker stays in its drain phase for a while.
    async with worker.client("generate") as client:
        stream = client.generate({"token_ids": list(range(10)), "delay": 0.3})
        await anext(stream)
        worker.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        with pytest.raises(urllib.error.HTTPError) as err:
            await asyncio.to_thread(urllib.request.urlopen, f"{worker.system_url}/health")
        assert err.value.code == 503
        assert b"shutting down" in err.value.read()
        assert len([x async for x in stream]) == 9


async def test_metrics_aggregate_across_processes_with_prometheus_multiproc_dir(run_role, tmp_path) -> None:
    worker = run_role("echo", env={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    async with worker.client("generate") as client:
        assert len([x async for x in client.generate({"token_ids": [1, 2, 3]})]) == 3
    body = urllib.request.urlopen(f"{worker.system_url}/metrics").read().decode()
    samples = {
        s.name: s.value for fam in text_string_to_metric_families(body) for s in fam.samples if not s.labels.get("pid")
    }
    assert samples["dynamo_component_requests_total"] == 1 and samples["echo_tokens_total"] == 3
    assert any(p.suffix == ".db" for p in tmp_path.iterdir())  # values live in the shared files
