"""The frontend role's command-line flags and their validation (cheap to import: ``--help``)."""

from __future__ import annotations

import argparse
from typing import Any

from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.options import check_at_least, check_port, env_default
from dynamo_worker.frontend import limits

ROUTER_MODES = ("round-robin", "random")
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("frontend role")
    g.add_argument("--http-host", default="127.0.0.1",
                   help="address the OpenAI-compatible HTTP server binds (default %(default)s)")
    g.add_argument("--http-port", type=int, default=env_default("DYN_HTTP_PORT", 8000, int),
                   help="port of the HTTP server; 0 picks a free one (env DYN_HTTP_PORT; "
                   "default %(default)s)")
    g.add_argument("--router-mode", choices=ROUTER_MODES, default="round-robin",
                   help="how a request picks one of the instances serving its model "
                   "(default %(default)s)")
    g.add_argument("--request-retries", type=int, default=2, metavar="N",
                   help="retry a request on another instance up to N times when it fails with a "
                   "retryable error before its first token (default %(default)s)")
    g.add_argument("--migration-limit", type=int, default=env_default("DYN_MIGRATION_LIMIT", 0, int),
                   metavar="N",
                   help="when a worker fails mid-stream, continue the request on another worker "
                   "(prompt plus the tokens already sent) up to N times; the client sees one "
                   "unbroken stream (env DYN_MIGRATION_LIMIT; default %(default)s)")
    g.add_argument("--max-request-bytes", type=int,
                   default=env_default("DYN_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES, int), metavar="BYTES",
                   help="largest accepted request body; larger ones get 413 (env DYN_MAX_REQUEST_BYTES; "
                   "default %(default)s)")
    limits.add_arguments(g)
    g.add_argument("--model-wait-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="at start-up, wait this long for the first discovery snapshot before "
                   "listening (default %(default)s)")


def configure(options: Any) -> None:
    """Validate the frontend flags: a one-line :class:`UsageError` naming the flag and the fix."""
    check_port("--http-port", options.http_port)
    check_at_least("--request-retries", options.request_retries, 0)
    check_at_least("--migration-limit", options.migration_limit, 0)
    check_at_least("--max-request-bytes", options.max_request_bytes, 1024)
    check_at_least("--model-wait-timeout", options.model_wait_timeout, 0)
    limits.configure(options)
    if not options.http_host:
        raise UsageError("--http-host is empty; give an address such as 127.0.0.1 or 0.0.0.0")
