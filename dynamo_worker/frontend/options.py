"""The frontend role's command-line flags and their validation (cheap to import: ``--help``)."""

from __future__ import annotations

import argparse
from typing import Any

from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.options import boolean, check_at_least, check_port, env_default
from dynamo_worker.frontend import limits

ROUTER_MODES = ("round-robin", "random", "kv")
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("frontend role")
    g.add_argument(
        "--http-host", default="127.0.0.1", help="address the OpenAI-compatible HTTP server binds (default %(default)s)"
    )
    g.add_argument(
        "--http-port",
        type=int,
        default=env_default("DYN_HTTP_PORT", 8000, int),
        help="port of the HTTP server; 0 picks a free one (env DYN_HTTP_PORT; default %(default)s)",
    )
    g.add_argument(
        "--router-mode",
        choices=ROUTER_MODES,
        default=env_default("DYN_ROUTER_MODE", "round-robin"),
        help="how a request picks one of the instances serving its model: kv sends it to the "
        "worker that caches most of its prefix, weighed against load (docs/routing.md) "
        "(env DYN_ROUTER_MODE; default %(default)s)",
    )
    g.add_argument(
        "--kv-overlap-score-weight",
        type=float,
        default=1.0,
        metavar="W",
        help="with --router-mode kv: weight of the prefill blocks a worker would compute against "
        "its decode load; 0 routes by load alone (default %(default)s)",
    )
    g.add_argument(
        "--router-temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="with --router-mode kv: 0 picks the cheapest worker; above 0, a softmax over costs "
        "spreads requests (default %(default)s)",
    )
    g.add_argument(
        "--no-kv-events",
        dest="kv_events",
        action="store_false",
        help="with --router-mode kv: predict each worker's cache from what was routed there "
        "(for engines that publish no KV events) instead of reading their events",
    )
    g.add_argument(
        "--busy-threshold",
        type=float,
        default=env_default("DYN_BUSY_THRESHOLD", 0.9, float),
        metavar="FRACTION",
        help="with --router-mode kv: skip a worker whose KV cache is this full (its active "
        "blocks, or its published usage) while another has room (env DYN_BUSY_THRESHOLD; default %(default)s)",
    )
    g.add_argument(
        "--kv-balance-requests",
        type=_balance_requests,
        default=env_default("DYN_KV_BALANCE_REQUESTS", 3.0, _balance_requests),
        metavar="N|off",
        help="with --router-mode kv: load differences within N requests are left to the cache, and a "
        "worker more than N requests (and --kv-balance-ratio times) above the least loaded is skipped; "
        "off: Dynamo's cost unchanged (env DYN_KV_BALANCE_REQUESTS; default 3)",
    )
    g.add_argument(
        "--kv-balance-ratio",
        type=float,
        default=env_default("DYN_KV_BALANCE_RATIO", 1.5, float),
        metavar="R",
        help="with --router-mode kv: see --kv-balance-requests (env DYN_KV_BALANCE_RATIO; default %(default)s)",
    )
    g.add_argument(
        "--kv-prefill-queue",
        action=argparse.BooleanOptionalAction,
        default=env_default("DYN_KV_PREFILL_QUEUE", False, boolean),
        help="with --router-mode kv: count the prefill still queued on each worker (its requests "
        "without a first token) in the cost, as Dynamo's newer router does (env DYN_KV_PREFILL_QUEUE; "
        "default %(default)s)",
    )
    g.add_argument(
        "--request-retries",
        type=int,
        default=2,
        metavar="N",
        help="retry a request on another instance up to N times when it fails with a "
        "retryable error before its first token (default %(default)s)",
    )
    g.add_argument(
        "--migration-limit",
        type=int,
        default=env_default("DYN_MIGRATION_LIMIT", 0, int),
        metavar="N",
        help="when a worker fails mid-stream, continue the request on another worker "
        "(prompt plus the tokens already sent) up to N times; the client sees one "
        "unbroken stream (env DYN_MIGRATION_LIMIT; default %(default)s)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=int,
        default=env_default("DYN_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES, int),
        metavar="BYTES",
        help="largest accepted request body; larger ones get 413 (env DYN_MAX_REQUEST_BYTES; default %(default)s)",
    )
    limits.add_arguments(g)
    g.add_argument(
        "--model-wait-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="at start-up, wait this long for the first discovery snapshot before listening (default %(default)s)",
    )
    # vllm serve's names (docs/frontend.md); Dynamo's --dyn-* spellings are aliases.
    g.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let the model decide to call tools (tool_choice auto, the default with tools); needs "
        "--tool-call-parser, as in vllm serve",
    )
    g.add_argument(
        "--tool-call-parser",
        "--dyn-tool-call-parser",
        metavar="NAME",
        default=env_default("DYN_TOOL_CALL_PARSER", None),
        help="vLLM's tool-call parser for the model's output format (hermes, pythonic, "
        "llama3_json, ...: any name vllm serve takes); with --enable-auto-tool-choice, tool_choice "
        "auto/required/named work (env DYN_TOOL_CALL_PARSER)",
    )
    g.add_argument(
        "--reasoning-parser",
        "--dyn-reasoning-parser",
        metavar="NAME",
        default=env_default("DYN_REASONING_PARSER", None),
        help="vLLM's reasoning parser (qwen3, deepseek_r1, granite, ...): the model's reasoning is "
        "returned as reasoning / reasoning_content (env DYN_REASONING_PARSER)",
    )


def _balance_requests(raw: str) -> float | None:
    """``--kv-balance-requests``: a number of requests, or ``off``."""
    if raw.strip().lower() == "off":
        return None
    try:
        return float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{raw!r} is neither a number of requests nor off") from None


def configure(options: Any) -> None:
    """Validate the frontend flags: a one-line :class:`UsageError` naming the flag and the fix."""
    check_port("--http-port", options.http_port)
    check_at_least("--request-retries", options.request_retries, 0)
    check_at_least("--migration-limit", options.migration_limit, 0)
    check_at_least("--max-request-bytes", options.max_request_bytes, 1024)
    check_at_least("--model-wait-timeout", options.model_wait_timeout, 0)
    if options.router_mode not in ROUTER_MODES:  # from DYN_ROUTER_MODE: argparse checks only the flag
        raise UsageError(
            f"--router-mode / DYN_ROUTER_MODE {options.router_mode!r} is invalid; use one of {', '.join(ROUTER_MODES)}"
        )
    check_at_least("--kv-overlap-score-weight", options.kv_overlap_score_weight, 0)
    check_at_least("--router-temperature", options.router_temperature, 0)
    if not 0 < options.busy_threshold <= 1:
        raise UsageError(f"--busy-threshold must be above 0 and at most 1 (got {options.busy_threshold})")
    if options.kv_balance_requests is not None:
        check_at_least("--kv-balance-requests", options.kv_balance_requests, 0)
    check_at_least("--kv-balance-ratio", options.kv_balance_ratio, 1)
    limits.configure(options)
    if options.enable_auto_tool_choice and not options.tool_call_parser:
        raise UsageError(
            "--enable-auto-tool-choice requires --tool-call-parser NAME (vLLM's parser for the "
            "model's tool-call format, e.g. hermes)"
        )
    if options.tool_call_parser or options.reasoning_parser:
        # Imports vLLM's parser registries (and vLLM): only when a parser is asked for.
        from dynamo_worker.frontend.chat_parsers import check_parser_names

        check_parser_names(options.tool_call_parser, options.reasoning_parser)
    if not options.http_host:
        raise UsageError("--http-host is empty; give an address such as 127.0.0.1 or 0.0.0.0")
