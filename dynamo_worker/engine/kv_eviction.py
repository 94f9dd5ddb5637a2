"""``--kv-eviction active-inactive``: a prefix cache that keeps reused blocks over one-off ones.

vLLM keeps every free cached block in one LRU queue (``vllm/v1/core/block_pool.py``). A block
hit by a thousand requests (a tenant's system prompt) and a block no request will ask for again
(the tail of one conversation) are equal there: whichever was freed longer ago goes first. Under
cache pressure that is the wrong way round. On issue 17's chat trace a worker holding three
tenants' system prompts evicts the prompt of the tenant idle for a few requests, because every
request in between freed history blocks younger than it (docs/routing.md, "What is left"). A
router cannot reorder an engine's eviction; this module does, on the worker.

The policy is the page cache's two lists (Linux's active and inactive lists; the segmented LRU of
the caching literature; proposed for vLLM in vllm-project/vllm#40268):

* a cached block that a request *hits* (vLLM's ``BlockPool.touch``) is marked reused, and so is
  a block whose content was evicted not long ago (its hash is among the last evicted, as many
  as the pool has blocks: 2Q's ghost list) and is computed again: a prefix requested more often
  than the inactive list lasts is still told from a one-off;
* a freed block goes to the tail of the **active** list if it is marked, else to the tail of the
  **inactive** list (unhashed blocks to its head, as vLLM does);
* allocation pops the inactive list first and the active list only when the inactive one is
  empty, each from its head (least recently freed first);
* the active list holds at most ``ACTIVE_SHARE`` of the pool's blocks: past that its oldest block
  moves to the inactive tail, where it is evicted unless a request hits it again. So a prefix
  nobody uses any more ages out, and a new prefix always finds room to be hit a second time.

Within each list the order is vLLM's, so a request's blocks still go last block first and a
cached block keeps its ancestors. The frontend's eviction forecast (``frontend/kv_forecast.py``)
models the same two lists when the worker says in discovery that it runs them.

Installed in vLLM's engine-core process by a ``vllm.general_plugins`` entry point
(:func:`vllm_plugin`), which vLLM loads in every engine process it spawns, and in the worker's
own process by :func:`configure` (which a forked engine process inherits); the worker turns it on
through ``DYN_KV_EVICTION`` in the environment the engine inherits. Without that variable the
plugin changes nothing, so installing this package leaves other vLLM users' engines as they were.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from dynamo_worker.core.errors import UsageError

# Under vLLM's logger: in the engine-core process only vLLM's logging is configured.
log = logging.getLogger(f"vllm.{__name__}")

#: The environment variable the worker sets for its engine: ``lru`` (vLLM's) or ``active-inactive``.
EVICTION_ENV = "DYN_KV_EVICTION"
POLICIES = ("lru", "active-inactive")
#: Its entry point's name in ``vllm.general_plugins`` (pyproject.toml), as ``VLLM_PLUGINS`` names it.
PLUGIN_NAME = "dynamo_worker_kv_eviction"
#: The most of a pool's blocks the active list keeps free (the segmented LRU's usual 80%).
ACTIVE_SHARE = 0.8


class ActiveInactiveQueue:
    """vLLM's ``FreeKVCacheBlockQueue`` interface over two of them: inactive first, then active.

    ``reused`` holds the ids of cached blocks hit since they were cached; a block popped for
    allocation (its cached content evicted) loses the mark, and its hash joins ``ghosts``.
    """

    def __init__(self, free_blocks: list[Any], pool_blocks: int, active_share: float = ACTIVE_SHARE) -> None:
        from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

        self.inactive = FreeKVCacheBlockQueue(free_blocks)
        self.active = FreeKVCacheBlockQueue([])
        self.active_max = int(pool_blocks * active_share)
        self.reused: set[int] = set()
        self._in_active: set[int] = set()
        # Hashes (vLLM's, with their KV-cache group) of the last evicted blocks, oldest first.
        self.ghosts: OrderedDict[Any, None] = OrderedDict()
        self.ghosts_max = pool_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.inactive.num_free_blocks + self.active.num_free_blocks

    def popleft(self) -> Any:
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[Any]:
        from_inactive = min(n, self.inactive.num_free_blocks)
        popped = self.inactive.popleft_n(from_inactive) + self.active.popleft_n(n - from_inactive)
        for block in popped:
            self._in_active.discard(block.block_id)
            self.reused.discard(block.block_id)
            if block.block_hash is not None:  # about to be evicted (BlockPool.get_new_blocks)
                self.ghosts[block.block_hash] = None
        while len(self.ghosts) > self.ghosts_max:
            self.ghosts.popitem(last=False)
        return popped

    def remove(self, block: Any) -> None:
        if block.block_id in self._in_active:
            self._in_active.discard(block.block_id)
            self.active.remove(block)
        else:
            self.inactive.remove(block)

    def append(self, block: Any) -> None:
        self.append_n([block])

    def append_n(self, blocks: list[Any]) -> None:
        for block in blocks:  # computed again soon after its eviction: reused
            if block.block_hash is not None and block.block_hash in self.ghosts:
                del self.ghosts[block.block_hash]
                self.reused.add(block.block_id)
        active = [b for b in blocks if b.block_id in self.reused]
        self.inactive.append_n([b for b in blocks if b.block_id not in self.reused])
        self.active.append_n(active)
        self._in_active.update(b.block_id for b in active)
        while self.active.num_free_blocks > self.active_max:
            self.deactivate(self.active.popleft())

    def deactivate(self, block: Any) -> None:
        """Move a block of the active list to the inactive tail (out of either list first)."""
        self._in_active.discard(block.block_id)
        self.inactive.append(block)

    def prepend_n(self, blocks: list[Any]) -> None:
        self.inactive.prepend_n(blocks)

    def get_all_free_blocks(self) -> list[Any]:
        return self.inactive.get_all_free_blocks() + self.active.get_all_free_blocks()

    def iter_blocks_after(self, cursor: Any | None) -> Iterator[Any]:
        """Free blocks in eviction order after ``cursor`` (all of them for None)."""
        if cursor is not None and cursor.block_id in self._in_active:
            return self.active.iter_blocks_after(cursor)
        return itertools.chain(self.inactive.iter_blocks_after(cursor), self.active.iter_blocks_after(None))

    def forget_reuse(self) -> None:
        """After a prefix-cache reset: no block is cached, so none is reused."""
        while self.active.num_free_blocks:
            self.deactivate(self.active.popleft())
        self.reused.clear()
        self.ghosts.clear()


_installed = False


def install() -> None:
    """Make every ``BlockPool`` created from now on with prefix caching use the two lists while
    ``DYN_KV_EVICTION`` says ``active-inactive`` (read at each pool's creation)."""
    global _installed
    if _installed:
        return
    from vllm.v1.core.block_pool import BlockPool

    original_init, original_touch, original_reset = BlockPool.__init__, BlockPool.touch, BlockPool.reset_prefix_cache

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if self.enable_caching and configured_policy() == "active-inactive":
            free = self.free_block_queue.get_all_free_blocks()
            self.free_block_queue = ActiveInactiveQueue(free, self.num_gpu_blocks)

    def touch(self: Any, blocks: Any) -> None:
        queue = self.free_block_queue
        if isinstance(queue, ActiveInactiveQueue):
            queue.reused.update(b.block_id for b in blocks if b.block_hash is not None and not b.is_null)
        original_touch(self, blocks)

    def reset_prefix_cache(self: Any) -> bool:
        done = original_reset(self)
        if done and isinstance(self.free_block_queue, ActiveInactiveQueue):
            self.free_block_queue.forget_reuse()
        return done

    BlockPool.__init__, BlockPool.touch, BlockPool.reset_prefix_cache = __init__, touch, reset_prefix_cache
    _installed = True


def configured_policy() -> str:
    """The policy ``DYN_KV_EVICTION`` names (``lru`` when unset); ValueError for another value."""
    policy = os.environ.get(EVICTION_ENV, "lru") or "lru"
    if policy not in POLICIES:
        raise ValueError(f"{EVICTION_ENV}={policy!r}: expected one of {', '.join(POLICIES)}")
    return policy


def configure(policy: str, engine_args: Any) -> str:
    """Hand ``--kv-eviction`` to the engine (through its environment); returns the policy.

    UsageError when the engine could not apply it: prefix caching off (nothing is cached, so
    nothing is reused), or ``VLLM_PLUGINS`` naming a set of plugins without this one."""
    if policy == "lru":
        os.environ.pop(EVICTION_ENV, None)
        return policy
    if not engine_args.enable_prefix_caching:
        raise UsageError(
            f"--kv-eviction {policy} needs prefix caching: drop --no-enable-prefix-caching or use --kv-eviction lru"
        )
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and PLUGIN_NAME not in allowed.split(","):
        raise UsageError(
            f"--kv-eviction {policy}: VLLM_PLUGINS={allowed!r} leaves out {PLUGIN_NAME}, the vLLM plugin "
            f"that applies it; add it to VLLM_PLUGINS"
        )
    os.environ[EVICTION_ENV] = policy
    # Here too: an engine process forked from this one inherits the patched class (and vLLM's
    # "plugins loaded" flag, so it would not load the plugin itself); a spawned one loads it.
    install()
    return policy


def vllm_plugin() -> None:
    """vLLM's ``vllm.general_plugins`` hook: install the two lists when the worker asked for them."""
    if configured_policy() == "active-inactive":
        install()
        log.info("KV cache eviction: active-inactive lists (%s of the blocks at most active)", ACTIVE_SHARE)
