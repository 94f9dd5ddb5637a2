"""``--kv-eviction active-inactive`` (:mod:`dynamo_worker.engine.kv_eviction`): vLLM's own block pool
keeps the prefixes requests reuse over blocks no request asks for again, and a worker started with
the flag runs it in its engine.

The pool tests drive vLLM's ``KVCacheManager`` in this process (no engine); the last test starts
one decode worker with a small KV cache behind a frontend and checks the engine process evicts
by the two lists, on the cached tokens vLLM reports.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest

from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.runtime import Runtime
from dynamo_worker.engine import kv_eviction
from tests.configure_helpers import configure
from tests.helpers import NatsServer, WorkerProcess, free_port
from tests.vllm_block_pool import BS, VllmPool, use_eviction


def tenant_trace(pool: VllmPool, steps: int, seed: int = 3) -> tuple[int, int, int]:
    """Four tenants' 6-block system prompts, each request with a one-off message of 2-5 blocks,
    one at a time on a pool of 40 blocks (the prompts alone take 24). Returns vLLM's cached
    tokens, prompt tokens, and the most cached tokens possible (every prompt after each
    tenant's first), after a warm-up of 20 requests."""
    rng = random.Random(seed)
    systems = [[rng.randint(1, 999) for _ in range(6 * BS)] for _ in range(4)]
    cached = queried = ceiling = 0
    seen: set[int] = set()
    for step in range(steps):
        tenant = rng.randrange(4)
        prompt = systems[tenant] + [rng.randint(1, 999) for _ in range(rng.randint(2, 5) * BS)]
        hit = pool.step(f"r{step}", prompt)
        pool.decode()
        pool.free(f"r{step}")
        if step >= 20:
            cached, queried = cached + hit, queried + len(prompt)
            ceiling += 6 * BS if tenant in seen else 0
        seen.add(tenant)
    return cached, queried, ceiling


def test_reused_system_prompts_outlive_one_off_messages_where_lru_evicts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    rates = {}
    for policy in kv_eviction.POLICIES:
        use_eviction(policy, monkeypatch)
        cached, queried, ceiling = tenant_trace(VllmPool(40), 300)
        rates[policy] = (cached / queried, cached / ceiling)
    # Measured: lru 51.0% of prompt tokens (81.3% of what the system prompts allow);
    # active-inactive 62.7%, every system prompt hit after the warm-up.
    assert rates["active-inactive"][1] == 1.0, rates
    assert rates["lru"][1] <= 0.85, rates
    assert rates["active-inactive"][0] >= rates["lru"][0] + 0.08, rates
    # The figures docs/routing.md gives (the trace and vLLM's pool are deterministic).
    assert [round(100 * r, 1) for r in (*rates["lru"], rates["active-inactive"][0])] == [51.0, 81.3, 62.7], rates


def test_the_active_list_keeps_at_most_its_share_so_a_new_prefix_can_be_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four old prefixes fill the active list (its share of the pool); a new prefix, sent every
    third request amid one-off prompts, is evicted from the short inactive list before its second
    request, which computes it again: its hash is among the recently evicted (the ghosts), so it
    is marked reused, joins the active list and pushes the oldest old prefix out."""
    use_eviction("active-inactive", monkeypatch)
    pool = VllmPool(40)  # active list: at most 32 blocks
    rng = random.Random(5)
    old = [[rng.randint(1, 999) for _ in range(8 * BS)] for _ in range(4)]  # 32 blocks
    step = 0

    def send(prompt: list[int]) -> int:
        nonlocal step
        step += 1
        hit = pool.step(f"s{step}", prompt)
        pool.decode()
        pool.free(f"s{step}")
        return hit

    for prefix in old:
        send(prefix + [1])
        assert send(prefix + [2]) == 8 * BS  # hit: its blocks are now reused, active when freed
    queue = pool.manager.block_pool.free_block_queue
    assert isinstance(queue, kv_eviction.ActiveInactiveQueue)
    assert queue.active.num_free_blocks == 32
    new = [rng.randint(1, 999) for _ in range(6 * BS)]
    hits = []
    for _ in range(6):
        hits.append(send(new + [rng.randint(1, 999) for _ in range(BS)]))
        for _ in range(2):
            send([rng.randint(1, 999) for _ in range(5 * BS)])
    assert hits == [0, 0] + [6 * BS] * 4, hits  # without the ghosts: never a hit
    assert queue.active.num_free_blocks <= queue.active_max == 32
    assert send(old[0] + [3]) < 8 * BS  # the least recently used old prefix aged out
    # The free queue counts what vLLM counts, every free block once.
    free = queue.get_all_free_blocks()
    assert (
        len(free)
        == len({b.block_id for b in free})
        == queue.num_free_blocks
        == pool.manager.block_pool.get_num_free_blocks()
    )


def test_a_prefix_cache_reset_leaves_nothing_marked_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    use_eviction("active-inactive", monkeypatch)
    pool = VllmPool(20)
    prefix = list(range(1, 4 * BS + 1))
    for step in range(2):
        pool.step(f"r{step}", prefix + [99])
        pool.decode()
        pool.free(f"r{step}")
    queue = pool.manager.block_pool.free_block_queue
    assert queue.reused and queue.active.num_free_blocks == 4
    assert pool.manager.reset_prefix_cache()
    assert not queue.reused and queue.active.num_free_blocks == 0
    assert queue.num_free_blocks == 19  # all but the null block


def test_without_the_variable_the_installed_pool_is_vllms_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

    use_eviction("lru", monkeypatch)
    assert type(VllmPool(8).manager.block_pool.free_block_queue) is FreeKVCacheBlockQueue
    monkeypatch.setenv(kv_eviction.EVICTION_ENV, "lfu")
    with pytest.raises(ValueError, match="DYN_KV_EVICTION='lfu': expected one of lru, active-inactive"):
        kv_eviction.configured_policy()


def test_the_flag_is_refused_where_the_engine_could_not_apply_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.delenv(kv_eviction.EVICTION_ENV, raising=False)
    args = SimpleNamespace(enable_prefix_caching=False)
    with pytest.raises(
        UsageError, match="--kv-eviction active-inactive needs prefix caching: drop --no-enable-prefix-caching"
    ):
        kv_eviction.configure("active-inactive", args)
    args.enable_prefix_caching = True
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver")
    with pytest.raises(UsageError, match="leaves out dynamo_worker_kv_eviction.*add it to VLLM_PLUGINS"):
        kv_eviction.configure("active-inactive", args)
    monkeypatch.setenv("VLLM_PLUGINS", "lora_filesystem_resolver,dynamo_worker_kv_eviction")
    assert kv_eviction.configure("active-inactive", args) == "active-inactive"
    assert kv_eviction.configured_policy() == "active-inactive"
    assert kv_eviction.configure("lru", args) == "lru"
    assert kv_eviction.configured_policy() == "lru"


@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_the_flag_on_a_worker_command_line(
    role: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Through the real parser and configure hooks (no engine): the policy is recorded and handed
    to the engine's environment; with prefix caching off it is a one-line error."""
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    monkeypatch.delenv(kv_eviction.EVICTION_ENV, raising=False)
    line = ["--role", role, "--model", "Qwen/Qwen3-0.6B"]  # a hub name: only parsed, never loaded
    if role == "prefill":
        line += ["--connector", "example", "--kv-shared-storage", str(tmp_path)]
    done = configure([*line, "--kv-eviction", "active-inactive"], caplog)
    assert done.ctx.resolved_config["kv_eviction"] == "active-inactive"
    assert os.environ[kv_eviction.EVICTION_ENV] == "active-inactive"
    assert configure(line, caplog).ctx.resolved_config["kv_eviction"] == "lru"
    assert kv_eviction.EVICTION_ENV not in os.environ
    with pytest.raises(UsageError, match="^--kv-eviction active-inactive needs prefix caching"):
        configure([*line, "--kv-eviction", "active-inactive", "--no-enable-prefix-caching"], caplog)
    with pytest.raises(SystemExit):  # argparse: invalid choice
        configure([*line, "--kv-eviction", "lfu"], caplog)


def test_an_ec_encoder_given_the_flag_warns_and_ignores_it(
    vlm: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """``up`` hands the workers' flags to an ec-encoder too, whose engine keeps no KV cache."""
    monkeypatch.delenv(kv_eviction.EVICTION_ENV, raising=False)
    line = ["--role", "ec-encoder", "--model", vlm, "--enable-multimodal", "--ec-storage-path", str(tmp_path)]
    done = configure([*line, "--kv-eviction", "active-inactive"], caplog)
    assert "--kv-eviction: the ec-encoder role's engine keeps no KV cache; ignored" in done.warnings
    assert done.ctx.resolved_config["kv_eviction"] == "lru"
    assert kv_eviction.EVICTION_ENV not in os.environ


# ---- one worker with the flag, behind a frontend -------------------------------------------------

BLOCK = 32  # vLLM's CPU attention takes multiples of 32


def prompt_of(seed: int, blocks: int) -> list[int]:
    rng = random.Random(seed)
    return [0] + [rng.randrange(3, 512) for _ in range(blocks * BLOCK - 1)]


class Deployment(NamedTuple):
    decode: WorkerProcess
    base: str  # the frontend's URL
    nats_url: str
    namespace: str


@pytest.fixture(scope="module")
def worker(nats_server: NatsServer, demo_model: str) -> Iterator[Deployment]:
    namespace = f"kve{uuid.uuid4().hex[:8]}"
    common = ["--nats-url", nats_server.url, "--namespace", namespace]
    http = free_port()
    frontend = WorkerProcess(["--role", "frontend", *common, "--http-port", str(http), "--router-mode", "kv"])
    decode = WorkerProcess(
        [
            "--role",
            "decode",
            "--model",
            demo_model,
            *common,
            "--served-model-name",
            "tiny",
            "--enforce-eager",
            "--block-size",
            str(BLOCK),
            "--max-model-len",
            "256",
            "--max-num-seqs",
            "2",
            "--num-gpu-blocks-override",
            "24",
            "--kv-eviction",
            "active-inactive",
            "--health-check-idle",
            "3600",
        ]  # fmt: skip
    )
    try:
        frontend.wait_for_log("frontend listening")
        decode.wait_for_log("serving", timeout=300)
        yield Deployment(decode, f"http://127.0.0.1:{http}", nats_server.url, namespace)
    finally:
        decode.stop()
        frontend.stop()


def cached_tokens(base: str, prompt: list[int]) -> int:
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0}).encode()
    req = urllib.request.Request(f"{base}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        usage: dict[str, Any] = json.load(resp)["usage"]
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def test_a_worker_started_with_the_flag_keeps_a_reused_prefix_through_one_off_prompts(
    worker: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """23 usable blocks: a 4-block prefix sent twice, then six one-off prompts of 5 blocks (30
    blocks, more than the cache), then the prefix again: the engine kept it. vLLM's own LRU,
    given the same requests in this process, has evicted it."""
    decode, base = worker.decode, worker.base
    prefix = prompt_of(1, 4)
    one_offs = [prompt_of(100 + i, 5) for i in range(6)]
    assert cached_tokens(base, prefix + [7]) == 0
    assert cached_tokens(base, prefix + [8]) == 4 * BLOCK
    for prompt in one_offs:
        assert cached_tokens(base, prompt) == 0
    assert cached_tokens(base, prefix + [9]) == 4 * BLOCK
    assert "KV cache eviction: active-inactive lists" in decode.log()  # logged by the engine process

    # The same requests on vLLM's own pool (LRU), as many blocks, scheduled one at a time.
    use_eviction("lru", monkeypatch)
    lru = VllmPool(24, block_size=BLOCK)
    results = []
    for rid, prompt in enumerate([prefix + [7], prefix + [8], *one_offs, prefix + [9]]):
        results.append(lru.step(f"r{rid}", prompt))
        lru.free(f"r{rid}")
    assert results[1] == 4 * BLOCK and results[-1] == 0, results


def test_the_workers_discovery_record_says_how_it_evicts(worker: Deployment) -> None:
    """What the frontend's eviction forecast reads (``kv_eviction``), beside the capacity."""

    async def record() -> dict[str, Any]:
        rt = await Runtime.connect(worker.nats_url, worker.namespace)
        try:
            [instance] = await rt.client("backend", "generate").wait_for_instances(10)
            return dict(instance.data)
        finally:
            await rt.close()

    data = asyncio.run(record())
    assert data["kv_eviction"] == "active-inactive"
    assert data["kv_capacity_blocks"] == 24 and data["kv_events"] is True
