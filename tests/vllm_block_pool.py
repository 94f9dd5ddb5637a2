"""vLLM's own KV-cache manager on CPU, driven step by step as a worker's scheduler drives it.

For tests of what the engine caches and evicts without starting an engine: the block pool,
prefix caching and KV events are vLLM's; the scheduling (one prefill per step, the running
requests' decode first) is the one the forecast's tests assume.
"""

from __future__ import annotations

from typing import Any

import msgspec

BS = 4  # tokens per block


class VllmPool:
    """vLLM's KV-cache manager for one worker, prefix caching and events on."""

    def __init__(self, num_blocks: int, block_size: int = BS) -> None:
        import torch
        from vllm import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_manager import KVCacheManager
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
        from vllm.v1.request import Request

        init_none_hash(sha256)
        spec = FullAttentionSpec(block_size=block_size, num_kv_heads=1, head_size=8, dtype=torch.float32)
        config = KVCacheConfig(
            num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)]
        )
        self.manager = KVCacheManager(
            config,
            max_model_len=256,
            scheduler_block_size=block_size,
            hash_block_size=block_size,
            enable_kv_cache_events=True,
        )
        hasher = get_request_block_hasher(block_size, sha256)
        self._request = lambda rid, tokens: Request(
            rid, tokens, SamplingParams(max_tokens=2), None, block_hasher=hasher
        )
        self.requests: dict[str, Any] = {}
        self.prefilled: list[Any] = []  # requests whose decode step has not run yet
        self.seq = 0

    def step(self, rid: str, tokens: list[int]) -> int:
        """One scheduler step: the running requests' decode, then this request's prefill; its
        cached prompt tokens."""
        self.decode()
        request = self.requests[rid] = self._request(rid, tokens)
        blocks, cached, _ = self.manager.get_computed_blocks(request)
        assert self.manager.allocate_slots(request, len(tokens) - cached, cached, blocks) is not None
        request.num_computed_tokens = len(tokens)
        self.prefilled.append(request)
        return cached

    def decode(self) -> None:
        """The decode step of the requests prefilled in the last step (their second token)."""
        for request in self.prefilled:
            request.append_output_token_ids(1)  # the token its prefill sampled, computed now
            assert self.manager.allocate_slots(request, 1) is not None
            request.num_computed_tokens += 1
        self.prefilled.clear()

    def free(self, rid: str) -> None:
        request = self.requests.pop(rid)
        if request in self.prefilled:  # ended after its prefill's token (max_tokens 1)
            self.prefilled.remove(request)
        self.manager.free(request)

    def events(self) -> list[dict[str, Any]]:
        return msgspec.to_builtins(self.manager.take_events())


def use_eviction(policy: str, monkeypatch: Any) -> None:
    """vLLM block pools created from now on in this process evict by ``policy`` (``lru``, vLLM's
    own, or the worker's ``--kv-eviction active-inactive``), until the test ends."""
    from dynamo_worker.engine import kv_eviction

    kv_eviction.install()  # idempotent; the pools read DYN_KV_EVICTION when created
    monkeypatch.setenv(kv_eviction.EVICTION_ENV, policy)
