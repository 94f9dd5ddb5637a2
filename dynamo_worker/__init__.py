"""dynamo-worker: serve LLMs with vLLM as cooperating worker roles over NATS."""

__version__ = "0.1.0"

from dynamo_worker.core import child_processes as _child_processes  # noqa: E402

if _child_processes.is_spawned_child():
    # A vLLM engine process spawned by a worker: never outlive the worker.
    _child_processes.die_with_parent()
