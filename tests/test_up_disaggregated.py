"""``dynamo-worker up --prefill-workers 1 --decode-workers 1``: a disaggregated stack from one command.

One stack for the module (nats-server, frontend, one prefill and one decode worker on vLLM, the
file-based KV connector in the log directory).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import DYNAMO_WORKER, free_port, wait_until, worker_env
from tests.test_up import Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("up-pd")
    port, log_dir, cache, out = free_port(), base / "logs", base / "cache", base / "up.out"
    env = worker_env(XDG_CACHE_HOME=str(cache))
    with open(out, "w") as stdout:
        proc = subprocess.Popen([DYNAMO_WORKER, "up", "--prefill-workers", "1", "--decode-workers", "1",
                                 "--http-port", str(port), "--log-dir", str(log_dir), "--namespace", f"uppd{port}",
                                 "--max-num-seqs", "16", "--max-model-len", "256"],
                                stdout=stdout, stderr=subprocess.STDOUT, text=True, env=env,
                                stdin=subprocess.DEVNULL)
    s = Stack(proc, port, log_dir, cache, out)

    def ready() -> bool:
        assert proc.poll() is None, out.read_text()
        return "ready in" in out.read_text()

    try:
        wait_until(ready, 300, interval=0.5, what="dynamo-worker up to be ready")
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(90)


def test_up_starts_prefill_and_decode_sharing_a_kv_directory_and_serves_disaggregated(stack: Stack) -> None:
    manifest = stack.manifest()
    assert {"nats", "frontend", "prefill-0", "decode-0"} <= set(manifest)
    assert "1 prefill worker(s) and 1 decode worker(s)" in stack.out.read_text()
    shared = Path(stack.log_dir) / "kv-shared"
    assert shared.is_dir() and not any(shared.iterdir())
    rng = random.Random(4)
    prompt = [5] + [rng.randrange(3, 500) for _ in range(149)]  # 128 tokens travel through the files
    status, body = stack.post("/v1/completions", json.dumps(
        {"model": "demo", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 8, body
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 128}
    assert any(shared.iterdir()), "the prefill worker wrote no KV files into the shared directory"
    metrics = urllib.request.urlopen(f"{stack.base}/metrics").read().decode()
    assert 'dynamo_frontend_disaggregated_requests_total{model="demo"} 1.0' in metrics
    wait_until(lambda: stack.worker_metric("vllm:external_prefix_cache_hits_total") == 128, 10,
               what="the decode engine to count the transferred tokens")


def test_sigterm_stops_the_disaggregated_stack(stack: Stack) -> None:
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(90) == 0
    assert "stopped." in stack.out.read_text()
