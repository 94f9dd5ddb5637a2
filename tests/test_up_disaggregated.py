"""``dynamo-worker up --prefill-workers 1 --decode-workers 1``: a disaggregated stack from one command.

One stack for the module (nats-server, frontend, one prefill and one decode worker on vLLM, the
file-based KV connector in the log directory), with ``--router-mode kv``: the frontend picks
prefill workers by their KV events too.
"""

from __future__ import annotations

import json
import random
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.test_up import Stack, up_stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with up_stack(
        tmp_path_factory.mktemp("up-pd"),
        "--prefill-workers",
        "1",
        "--decode-workers",
        "1",
        "--max-num-seqs",
        "16",
        "--max-model-len",
        "256",
        "--router-mode",
        "kv",
    ) as s:
        yield s


def test_up_starts_prefill_and_decode_sharing_a_kv_directory_and_serves_disaggregated(stack: Stack) -> None:
    manifest = stack.manifest()
    assert {"nats", "frontend", "prefill-0", "decode-0"} <= set(manifest)
    assert "1 prefill worker(s) and 1 decode worker(s)" in stack.out.read_text()
    shared = Path(stack.log_dir) / "kv-shared"
    assert shared.is_dir() and not any(shared.iterdir())
    rng = random.Random(4)
    prompt = [5] + [rng.randrange(3, 500) for _ in range(149)]  # 128 tokens travel through the files
    status, body = stack.post(
        "/v1/completions",
        json.dumps({"model": "demo", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).encode(),
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 8, body
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 128}
    assert any(shared.iterdir()), "the prefill worker wrote no KV files into the shared directory"
    metrics = urllib.request.urlopen(f"{stack.base}/metrics").read().decode()
    assert 'dynamo_frontend_disaggregated_requests_total{model="demo"} 1.0' in metrics
    wait_until(
        lambda: stack.worker_metric("vllm:external_prefix_cache_hits_total") == 128,
        10,
        what="the decode engine to count the transferred tokens",
    )


def test_with_router_mode_kv_the_prefill_workers_blocks_are_indexed_and_predicted(stack: Stack) -> None:
    rng = random.Random(9)
    prompt = [5] + [rng.randrange(3, 500) for _ in range(149)]  # one full 128-token block
    body = {"model": "demo", "prompt": prompt, "max_tokens": 2, "temperature": 0}
    assert stack.post("/v1/completions", json.dumps(body).encode())[0] == 200
    # The prefill worker's KV events reach the frontend's prefill index (not only the decode one's).
    wait_until(
        lambda: stack.frontend_metric("dynamo_frontend_kv_index_blocks", component="prefill") >= 1,
        15,
        what="the prefill worker's block in the frontend's prefill index",
    )
    predicted = stack.frontend_metric("dynamo_frontend_kv_predicted_cached_tokens_total")
    status, again = stack.post("/v1/completions", json.dumps({**body, "prompt": prompt + [7]}).encode())
    assert status == 200, again
    # Both routers predicted the block: the prefill worker's cache (its own events) and the
    # decode worker's (it stored the transferred block); 128 tokens each.
    assert stack.frontend_metric("dynamo_frontend_kv_predicted_cached_tokens_total") - predicted == 2 * 128


def test_sigterm_stops_the_disaggregated_stack(stack: Stack) -> None:
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(90) == 0
    assert "stopped." in stack.out.read_text()
