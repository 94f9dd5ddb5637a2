"""Where the model runs on CPU: in vLLM's engine-core process (``uni``) unless told otherwise.

vLLM's CPU platform turns ``--distributed-executor-backend uni`` into ``mp`` while
``VLLM_ENABLE_V1_MULTIPROCESSING`` is on (its default), so a CPU engine is two processes below
the one serving requests: the EngineCore (scheduler) and a Worker (the model), which pass every
step through a shared-memory queue that both sides busy-poll (``sched_yield``) for a second
after each message. On a machine with few cores those two polling processes leave the serving
processes little CPU: on this 2-core machine the in-process model runner served 1.2-1.9x the
tokens per second (docs/performance.md, "Changes and experiments on 2026-12-02 (fourth session)").

So on CPU, with an engine of world size 1 (no tensor, pipeline or data parallelism) and no
``--distributed-executor-backend`` given, the worker runs the model in the EngineCore process
(``uni``); an explicit ``uni`` is honoured the same way. Both are done by turning
``VLLM_ENABLE_V1_MULTIPROCESSING`` off in the worker's environment: ``AsyncLLM`` still runs its
engine core in a process of its own (it always does); what the variable changes is the CPU
platform's override above (and vLLM's synchronous ``LLMEngine``, which workers do not use).
``--distributed-executor-backend mp`` keeps vLLM's layout, which binds the model's OpenMP
threads to cores of their own: the better choice on a large machine with cores to spare. A
``VLLM_CPU_OMP_THREADS_BIND`` naming CPU lists (not ``auto`` or ``nobind``) keeps it too, since
only that layout applies the lists.

With ``uni``, the OpenMP thread count is the engine process's (vLLM sets none): unless
``OMP_NUM_THREADS`` is set, it is set here to what vLLM's ``mp`` layout gives its Worker, the
usable CPUs less one kept for the scheduler and the serving processes.
"""

from __future__ import annotations

import os
from typing import Any

MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"


def _is_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _single_process_engine(args: Any) -> bool:
    return (
        (args.tensor_parallel_size or 1) == 1
        and (args.pipeline_parallel_size or 1) == 1
        and (args.data_parallel_size or 1) == 1
    )


def configure(args: Any) -> tuple[str, Any, str] | None:
    """Choose the executor for ``args`` (after the KV connector chose its own, if any).

    Returns the applied default as ``(attribute, value, why)`` for the resolved configuration,
    or None when nothing was changed (not CPU, parallel, the user chose ``mp``, turned
    ``VLLM_ENABLE_V1_MULTIPROCESSING`` on explicitly, or gave ``VLLM_CPU_OMP_THREADS_BIND`` CPU
    lists, which only vLLM's ``mp`` layout applies).
    """
    if not _is_cpu() or os.environ.get(MULTIPROCESSING_ENV) == "1":
        return None
    backend = args.distributed_executor_backend
    # CPU lists to bind the model's threads to: only vLLM's mp layout applies them.
    binds_cpus = os.environ.get(BIND_ENV, "auto") not in ("auto", "nobind")
    if backend == "uni":
        why = "--distributed-executor-backend uni, honoured on CPU"
    elif backend is None and _single_process_engine(args) and not binds_cpus:
        args.distributed_executor_backend = "uni"
        why = (
            "CPU, world size 1: the model runs in the engine-core process (one polling process "
            "fewer; --distributed-executor-backend mp for vLLM's layout)"
        )
    else:
        return None
    os.environ[MULTIPROCESSING_ENV] = "0"
    if "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) - 1))
    return ("distributed_executor_backend", "uni", why)
