"""The measurements beside the serving rounds: the request plane alone and a killed worker's
time in routing (neither runs a vLLM engine)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from benchmarks import failover, request_plane


def run(work_root: Path, log: Any, source: str | None = None) -> dict[str, Any]:
    """Both measurements; ``source`` is the exported dynamo_worker the workers should run."""
    out_dir = work_root / "extras"
    out_dir.mkdir(parents=True, exist_ok=True)
    if source:  # the child workers import the same snapshot as the measured servers
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)
    result: dict[str, Any] = {}
    log("request plane alone: echo role vs bare nats-py")
    result["request_plane"] = asyncio.run(request_plane.measure(log_dir=out_dir))
    log("killed worker: time out of routing")
    result["failover"] = asyncio.run(failover.measure(log_dir=out_dir))
    return result


def render(result: dict[str, Any]) -> str:
    return request_plane.render(result["request_plane"]) + "\n" + failover.render(result["failover"]) + "\n"
