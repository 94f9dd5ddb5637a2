"""Encoder-cache (EC) transfer: Dynamo's ``--ec-*`` flags to vLLM's ``ECTransferConfig``.

The ``ec-encoder`` role is an encoder-only vLLM instance (``ec_role="ec_producer"``): it runs
the vision encoder on each image and stores the output through an EC connector. A decode worker
given the same storage is the consumer (``ec_role="ec_consumer"``): for an image whose output
was stored it loads it instead of running its own encoder, and falls back to encoding an image
that was never stored. Both find an image's entry by vLLM's content hash of the image, so both
must be given the same image (the processor sends both the same PNG).

* ``--ec-connector-backend`` (default ``ECExampleConnector``, vLLM's file-based connector for one
  machine, which works on CPU): the class name; ``--ec-extra-config JSON`` adds to its
  ``ec_connector_extra_config``.
* ``--ec-storage-path DIR``: ``shared_storage_path`` of ``ECExampleConnector``; required by the
  ec-encoder with that backend (Dynamo's rule) and, on a decode worker, what makes it a
  consumer (with ``--enable-multimodal``).
* vLLM's own ``--ec-transfer-config JSON`` may be given instead (not both).
"""

from __future__ import annotations

import json
import os
from typing import Any

from dynamo_worker.core.errors import UsageError

EXAMPLE = "ECExampleConnector"
PRODUCER, CONSUMER = "ec_producer", "ec_consumer"


def add_arguments(group: Any) -> None:
    group.add_argument(
        "--ec-connector-backend",
        default=EXAMPLE,
        metavar="CLASS",
        help="vLLM EC connector class (default %(default)s: files in --ec-storage-path)",
    )
    group.add_argument(
        "--ec-storage-path",
        metavar="DIR",
        default=None,
        help="directory the ec-encoder stores encoder outputs in and the decode worker "
        "loads them from (the same on both)",
    )
    group.add_argument(
        "--ec-extra-config", metavar="JSON", default=None, help="extra ec_connector_extra_config entries, as JSON"
    )


def configure(options: Any, engine_args: Any, *, role: str, producer: bool) -> dict[str, Any] | None:
    """Set ``engine_args.ec_transfer_config`` for the role named ``role`` (``producer``: the
    ec-encoder; otherwise a consumer when ``--ec-storage-path`` is given). Returns what was
    decided, or None."""
    storage = getattr(options, "ec_storage_path", None)
    extra_json = getattr(options, "ec_extra_config", None)
    backend = getattr(options, "ec_connector_backend", EXAMPLE)
    raw = engine_args.ec_transfer_config
    if raw is not None:
        if storage is not None or extra_json is not None:
            raise UsageError(
                "Cannot specify both --ec-storage-path/--ec-extra-config and --ec-transfer-config; give one of them"
            )
        want = PRODUCER if producer else CONSUMER
        if raw.ec_role not in (want, "ec_both"):
            raise UsageError(f"--ec-transfer-config has ec_role {raw.ec_role!r}; the {role} role needs {want!r}")
        return {"ec_connector": raw.ec_connector, "ec_role": raw.ec_role, "from": "--ec-transfer-config"}
    if storage is None and extra_json is None:
        if producer and backend == EXAMPLE:
            raise UsageError(
                "the ec-encoder role with --ec-connector-backend ECExampleConnector needs "
                "--ec-storage-path DIR (the same directory as the decode worker's)"
            )
        if producer:
            return _set(engine_args, backend, PRODUCER, {})
        return None
    if not producer and not getattr(options, "enable_multimodal", False):
        raise UsageError("--ec-storage-path on the decode worker needs --enable-multimodal")
    extra: dict[str, Any] = {}
    if extra_json is not None:
        try:
            extra = dict(json.loads(extra_json))
        except (ValueError, TypeError) as exc:
            raise UsageError(f"--ec-extra-config is not a JSON object: {exc}") from None
    if storage is not None:
        if not os.path.isdir(storage):
            raise UsageError(f"--ec-storage-path {storage}: no such directory; create it first")
        extra["shared_storage_path"] = os.path.abspath(storage)
    return _set(engine_args, backend, PRODUCER if producer else CONSUMER, extra)


def _set(engine_args: Any, backend: str, ec_role: str, extra: dict[str, Any]) -> dict[str, Any]:
    from vllm.config import ECTransferConfig

    engine_args.ec_transfer_config = ECTransferConfig(
        ec_connector=backend, ec_role=ec_role, ec_connector_extra_config=extra
    )
    return {"ec_connector": backend, "ec_role": ec_role, "ec_connector_extra_config": extra}
