"""Run a ``dynamo-worker`` command line through the real parser and configure hooks, in process.

What ``dynamo-worker ARGS`` does up to connecting to NATS: role selection (``--role`` or Dynamo's
alias flags), the role's parser, then every ``dynamo_worker_configure`` hook (the core's checks,
the role's: vLLM's own engine parser, connectors, KV events). It stops before the runtime, so no
NATS and no engine are needed, and a test can run dozens of command lines in a second or two.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from dynamo_worker.cli import _selector_parser, build_parser, select_role
from dynamo_worker.core.context import WorkerContext
from dynamo_worker.core.plugins import HookRelay
from dynamo_worker.core.roles import find_role, load_role


class Configured:
    """The outcome of one command line: its role, options, context and the warnings it logged."""

    def __init__(self, role: str, options: Any, ctx: WorkerContext, warnings: list[str]) -> None:
        self.role = role
        self.options = options
        self.ctx = ctx
        self.warnings = warnings


def configure(argv: list[str], caplog: pytest.LogCaptureFixture) -> Configured:
    """Parse and configure ``argv`` as ``dynamo-worker`` would; a bad flag raises its UsageError.

    Environment variables must be set before the call (flags read them as defaults when the
    parser is built).
    """
    pre, _ = _selector_parser(add_help=False).parse_known_args(argv)
    role = select_role(pre)
    info = find_role(role)
    hooks = HookRelay(role, load_role(info))
    options, extra = build_parser(hooks).parse_known_args(argv)
    options.extra_args = list(extra)
    ctx = WorkerContext(
        role=info,
        options=options,
        runtime=None,  # type: ignore[arg-type]
        log=logging.getLogger(f"dynamo_worker.role.{role}"),
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dynamo_worker"):
        asyncio.run(hooks.configure(ctx))
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("dynamo_worker")
    ]
    return Configured(role, options, ctx, warnings)
