"""KV-cache transfer between prefill and decode workers: our ``--connector`` flag to vLLM's config.

``--connector`` picks one of vLLM's KV connectors; vLLM's own ``--kv-transfer-config JSON`` may
be given instead (not both: "Cannot specify both", as in Dynamo):

* ``none`` (default): no KV transfer; the worker serves aggregated only.
* ``nixl``: ``NixlConnector`` (GPU-to-GPU over NIXL/UCX, across machines). With tensor-parallel
  size 1 and no ``--distributed-executor-backend``, the executor is forced to ``mp`` (as Dynamo
  does: the in-process executor contends for the GIL, vllm#29369), and
  ``VLLM_NIXL_SIDE_CHANNEL_HOST`` defaults to this host's address.
* ``lmcache``: ``LMCacheConnectorV1``.
* ``kvbm``: Dynamo's KV block manager, ``DynamoConnector`` from the ``kvbm`` package.
* ``null`` is Dynamo's other spelling of ``none``.
* Several (Dynamo's list form, ``--connector lmcache nixl``): vLLM's ``MultiConnector`` chaining
  them in the order given (Dynamo's ``PdConnector`` does the same); ``none``/``null`` only alone.
* ``example``: vLLM's file-based ``ExampleConnector`` for one machine (it works on CPU): the
  prefill side writes each prompt's KV, layer by layer, as safetensors files under
  ``--kv-shared-storage DIR``; the decode side finds a prompt's files by a hash of its tokens
  and loads them. Both workers must be given the same directory. It ignores
  ``kv_transfer_params`` (the files are found by the tokens), and transfers whole blocks only:
  the first ``((prompt_len - 2) // block_size) * block_size`` tokens.

``kv_role`` is ``kv_both`` on every role, as Dynamo does: a decode worker also serves requests
aggregated (when no prefill worker is up, or a prefill failed), and one configuration for every
worker is what makes them interchangeable. A raw ``--kv-transfer-config`` is used as given.

vLLM is imported inside the functions.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from typing import Any

from dynamo_worker.core.errors import UsageError

NO_CONNECTOR = ("none", "null")  # Dynamo accepts both
CONNECTORS = (*NO_CONNECTOR, "nixl", "lmcache", "kvbm", "example")
CONNECTOR_CLASSES = {
    "nixl": "NixlConnector",
    "lmcache": "LMCacheConnectorV1",
    "kvbm": "DynamoConnector",
    "example": "ExampleConnector",
}
# Connectors vLLM does not ship: the module vLLM loads the class from.
CONNECTOR_MODULES = {"kvbm": "kvbm.vllm_integration.connector"}
# The Python package each connector needs at run time (imported by vLLM inside the engine).
CONNECTOR_PACKAGES = {"nixl": "nixl", "lmcache": "lmcache", "kvbm": "kvbm"}
MULTI_CONNECTOR = "MultiConnector"  # vLLM's chain of connectors, for a list
KV_ROLE = "kv_both"


def add_arguments(group: Any) -> None:
    group.add_argument(
        "--connector",
        choices=CONNECTORS,
        nargs="+",
        default=None,
        metavar="CONNECTOR",
        help="KV connector(s) for disaggregated serving (default none): nixl (GPUs, across "
        "machines), lmcache, kvbm, or example (vLLM's file-based connector, one machine, "
        "needs --kv-shared-storage); several (--connector lmcache nixl) are chained in "
        "that order; or give vLLM's --kv-transfer-config JSON instead",
    )
    group.add_argument(
        "--kv-shared-storage",
        metavar="DIR",
        default=None,
        help="with --connector example: the directory prefill writes KV files to and "
        "decode reads them from (the same on both)",
    )


def configure(options: Any, engine_args: Any, *, role: str, required: bool) -> dict[str, Any] | None:
    """Set ``engine_args.kv_transfer_config`` from our flags; a one-line :class:`UsageError` if wrong.

    Returns what was decided (for ``--dump-config-to``), or None without KV transfer.
    """
    names = connector_names(options.connector)
    storage = options.kv_shared_storage
    raw = engine_args.kv_transfer_config
    if options.connector is not None and raw is not None:
        raise UsageError("Cannot specify both --connector and --kv-transfer-config; give one of them")
    if storage is not None and "example" not in names:
        raise UsageError("--kv-shared-storage is only used with --connector example")
    if raw is None and not names:
        if required:
            raise UsageError(
                f"the {role} role needs a KV connector: --connector nixl|lmcache|example "
                "(the same as the decode workers') or --kv-transfer-config JSON"
            )
        return None
    if raw is None:
        check_packages(names)
        engine_args.kv_transfer_config = config_for(names, storage)
    cfg = engine_args.kv_transfer_config
    extra = cfg.kv_connector_extra_config or {}
    chained = extra.get("connectors", []) if cfg.kv_connector == MULTI_CONNECTOR else []
    uses_nixl = "NixlConnector" in (cfg.kv_connector, *(c.get("kv_connector") for c in chained))
    forced = None
    if uses_nixl:
        if engine_args.tensor_parallel_size == 1 and engine_args.distributed_executor_backend is None:
            engine_args.distributed_executor_backend = "mp"
            forced = "mp (NIXL with tensor-parallel size 1: the in-process executor contends for the GIL)"
        if "VLLM_NIXL_SIDE_CHANNEL_HOST" not in os.environ:
            os.environ["VLLM_NIXL_SIDE_CHANNEL_HOST"] = _host_address()
    return {
        "kv_connector": cfg.kv_connector,
        "kv_role": cfg.kv_role,
        "kv_connector_extra_config": dict(cfg.kv_connector_extra_config or {}),
        "from": "--kv-transfer-config" if raw is not None else f"--connector {' '.join(names)}",
        "distributed_executor_backend_forced": forced,
    }


def connector_names(given: str | list[str] | None) -> list[str]:
    """The connectors a ``--connector`` value names, in order; ``[]`` for none (Dynamo's rules:
    ``none``/``null`` only alone, each connector once)."""
    names = [given] if isinstance(given, str) else list(given or [])
    if any(n in NO_CONNECTOR for n in names):
        if len(names) > 1:
            raise UsageError(
                f"--connector {' '.join(names)}: none/null cannot be combined with other connectors; "
                "give none alone, or only real connectors"
            )
        return []
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"--connector names {', '.join(repeated)} more than once; give each connector once")
    return names


def check_packages(names: list[str]) -> None:
    """A one-line error for a connector whose package is not installed (vLLM would fail later)."""
    for name in names:
        package = CONNECTOR_PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise UsageError(
                f"--connector {name} needs the {package!r} package, which is not installed (pip install {package})"
            )


def _one_config(name: str, storage: str | None) -> dict[str, Any]:
    config: dict[str, Any] = {"kv_connector": CONNECTOR_CLASSES[name], "kv_role": KV_ROLE}
    if name in CONNECTOR_MODULES:
        config["kv_connector_module_path"] = CONNECTOR_MODULES[name]
    if name == "example":
        if storage is None:
            raise UsageError(
                "--connector example needs --kv-shared-storage DIR (the same directory on the "
                "prefill and decode workers)"
            )
        if not os.path.isdir(storage):
            raise UsageError(f"--kv-shared-storage {storage}: no such directory")
        config["kv_connector_extra_config"] = {"shared_storage_path": os.path.abspath(storage)}
    return config


def config_for(names: list[str], storage: str | None) -> Any:
    """vLLM's ``KVTransferConfig`` for one connector, or a ``MultiConnector`` chaining several."""
    from vllm.config import KVTransferConfig

    configs = [_one_config(name, storage) for name in names]
    if len(configs) == 1:
        return KVTransferConfig(**configs[0])
    return KVTransferConfig(
        kv_connector=MULTI_CONNECTOR, kv_role=KV_ROLE, kv_connector_extra_config={"connectors": configs}
    )


def _host_address() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def prefill_params() -> dict[str, Any]:
    """The ``kv_transfer_params`` a prefill request carries (Dynamo's): keep the KV for a remote decode."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }


def decode_params(prefill_result: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``kv_transfer_params`` a decode request carries: those its prefill returned, if any."""
    if not isinstance(prefill_result, dict):
        return None
    disaggregated = prefill_result.get("disaggregated_params")
    if not isinstance(disaggregated, dict):
        return None
    params = disaggregated.get("kv_transfer_params")
    return params if isinstance(params, dict) else None
