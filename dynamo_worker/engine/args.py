"""vLLM engine arguments: vLLM's own flag definitions, plus the defaults we override for serving.

Every vLLM engine flag works on ``dynamo-worker --role decode`` because we hand the flags our
parser did not recognise to vLLM's own parser (``AsyncEngineArgs.add_cli_args``), never a
hand-copied list. vLLM is imported here only when a worker configures itself, not for ``--help``.

Defaults we override (each only when the user did not set it):

* ``enable_log_requests=False``: the worker logs per request itself at debug level; vLLM's
  per-request INFO lines would dominate the log at serving rates.
* ``disable_log_stats=False``: stats feed ``/metrics`` and the load publisher.
* ``enable_prefix_caching=True``: routers and KV events assume prefix reuse.
* ``served_model_name`` stays vLLM's (the ``--model`` value) when not given, as ``vllm serve`` does.
* ``max_loras=4`` on CPU when ``--enable-lora`` is given without ``--max-loras``: one adapter slot
  stays free there (see :mod:`dynamo_worker.engine.lora`).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
from pathlib import Path
from typing import Any

from dynamo_worker.core.errors import UsageError

# (attribute, value, why): applied when the user's command line did not set the attribute.
SERVING_DEFAULTS: tuple[tuple[str, Any, str], ...] = (
    ("enable_log_requests", False, "per-request INFO logs dominate at serving rates"),
    ("disable_log_stats", False, "engine stats feed /metrics and load publishing"),
    ("enable_prefix_caching", True, "prefix reuse is what KV-aware routing relies on"),
)


class _RaisingParser(argparse.ArgumentParser):
    """vLLM's parser with errors raised as one-line usage errors instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}; see dynamo-worker --role decode --engine-help for vLLM's flags")


def engine_parser() -> argparse.ArgumentParser:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(_RaisingParser, FlexibleArgumentParser):
        pass

    parser = Parser(prog="dynamo-worker --role decode", add_help=False)
    return AsyncEngineArgs.add_cli_args(parser)


def _explicit_dests(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Which attributes the user set on the command line (so defaults never override them)."""
    flags = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {action.dest for action in parser._actions if any(opt in flags for opt in action.option_strings)}


def parse_engine_args(argv: list[str]) -> tuple[Any, list[tuple[str, Any, str]]]:
    """Parse ``argv`` as vLLM engine flags; return ``(AsyncEngineArgs, applied defaults)``."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    parser = engine_parser()
    ns = parser.parse_args(argv)
    explicit = _explicit_dests(parser, argv)
    if "model" not in explicit:  # vLLM has a hub default; a worker must say what it serves
        raise UsageError("--model is required: a local model directory (try: dynamo-worker demo-model PATH)")
    model = str(ns.model)
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise UsageError(f"--model {model}: no such directory; give a local model directory")
    applied = []
    for attr, value, why in SERVING_DEFAULTS:
        if attr not in explicit and hasattr(ns, attr):
            setattr(ns, attr, value)
            applied.append((attr, value, why))
    try:
        args = AsyncEngineArgs.from_cli_args(ns)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid vLLM engine arguments: {exc}") from exc
    from dynamo_worker.engine.lora import apply_cpu_default

    lora_default = apply_cpu_default(args, explicit)
    if lora_default is not None:
        applied.append(lora_default)
    return args, applied


def engine_help() -> str:
    return engine_parser().format_help()


def resolved(args: Any) -> dict[str, Any]:
    """The engine arguments as JSON-ready values, for ``--dump-config-to``.

    vLLM's nested configs (``kv_transfer_config``, ``compilation_config``, ...) become dicts, not
    their repr: the dump redacts secrets by field name (``kv_connector_extra_config`` may hold
    credentials), which it cannot do inside a repr string.
    """
    return {field.name: _plain(getattr(args, field.name)) for field in dataclasses.fields(args)}


def _plain(value: Any, depth: int = 0) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 8:  # deeper than any vLLM config: not worth walking
        return repr(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value, depth + 1)
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name, None), depth + 1) for f in dataclasses.fields(value)}
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)
    return value
