"""Data parallelism across worker processes: one leader serves every rank; the others only compute.

Dynamo launches one worker per data-parallel rank with ``--data-parallel-rank N`` and lets only
rank 0 serve endpoints. In vLLM 0.32 ``--data-parallel-rank`` means "external load balancing",
which vLLM refuses for dense models, so we translate the Dynamo-style launch into vLLM's own
multi-process data parallelism (what ``vllm serve --headless`` does on other nodes):

* rank 0, the **leader**, runs ``AsyncLLM`` over all ``--data-parallel-size`` ranks with
  ``data_parallel_size_local=1``: its front end reaches the other ranks' engine cores through
  the handshake at ``--data-parallel-address``/``--data-parallel-rpc-port``, and a request can
  be pinned to a rank (``routing.dp_rank`` in ``generate``);
* rank N > 0, a **follower**, starts only its engine core (``CoreEngineProcManager``, headless),
  serves no endpoints, logs that it is not the leader, and waits for a signal.

vLLM is imported inside the functions.
"""

from __future__ import annotations

import logging
from typing import Any

from dynamo_worker.core.errors import EngineDead, UsageError

log = logging.getLogger(__name__)


def assign_rank(engine_args: Any) -> int | None:
    """Rewrite ``engine_args`` for a Dynamo-style per-rank launch; return this process's rank.

    Returns None (and changes nothing) for a single-process launch.
    """
    rank = engine_args.data_parallel_rank
    if rank is None:
        return None
    size = engine_args.data_parallel_size
    if not 0 <= rank < size:
        raise UsageError(f"--data-parallel-rank {rank} must be between 0 and --data-parallel-size - 1 ({size - 1})")
    engine_args.data_parallel_rank = None
    if engine_args.data_parallel_size_local is None:
        engine_args.data_parallel_size_local = 1
    if rank > 0:
        engine_args.data_parallel_start_rank = rank
    return rank


class HeadlessEngines:
    """A follower's engine cores, started without a front end (vLLM's headless mode)."""

    def __init__(self, engine_args: Any) -> None:
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.network_utils import get_tcp_uri
        from vllm.v1.engine.utils import CoreEngineProcManager
        from vllm.v1.executor import Executor

        config = engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=True)
        parallel = config.parallel_config
        self.rank = parallel.data_parallel_rank
        self.manager = CoreEngineProcManager(
            local_engine_count=parallel.data_parallel_size_local,
            start_index=parallel.data_parallel_rank,
            local_start_index=0,
            vllm_config=config,
            local_client=False,
            handshake_address=get_tcp_uri(parallel.data_parallel_master_ip, parallel.data_parallel_rpc_port),
            executor_class=Executor.get_class(config),
            log_stats=not engine_args.disable_log_stats,
        )

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.manager.processes if p.pid is not None]

    def check(self) -> None:
        """:class:`EngineDead` if an engine-core process has exited."""
        dead = [p for p in self.manager.processes if p.exitcode is not None]
        if dead:
            raise EngineDead(
                "data-parallel engine core(s) exited: " + ", ".join(f"pid {p.pid} status {p.exitcode}" for p in dead)
            )

    def shutdown(self) -> None:
        self.manager.shutdown()  # vLLM's default grace, then it kills the process tree
