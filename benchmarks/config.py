"""Benchmark settings, the engine flags every side shares, and the environment every side gets."""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

#: Engine flags given to ``vllm serve``, to ``dynamo-worker up`` (passed on to its decode
#: worker) and parsed with vLLM's own parser for the offline ``LLM``: one source of truth.
ENGINE_FLAGS: tuple[str, ...] = ("--enforce-eager", "--max-model-len", "512")

#: Every side the harness can measure, in the default round-1 order.
SIDES: tuple[str, ...] = ("offline", "vllm-serve", "vllm-serve-uni", "dynamo", "dynamo-disagg")

#: The baseline every ratio is taken to (``vllm serve`` as it starts by default), and the
#: like-for-like one: ``vllm serve`` with the model in its engine-core process, as
#: dynamo-worker runs it on CPU (dynamo_worker/engine/executor.py).
BASELINE = "vllm-serve"
SAME_LAYOUT_BASELINE = "vllm-serve-uni"

#: The name clients use for the model on both servers.
SERVED_NAME = "demo"

#: Set for every side (server processes, the offline engine). ``VLLM_CPU_OMP_THREADS_BIND=nobind
#: OMP_NUM_THREADS=1`` stops vLLM pinning one OpenMP thread per core, which made rounds swing
#: up to 2x on this 2-core machine (docs/performance.md).
BENCH_ENV: dict[str, str] = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "PYTHONUNBUFFERED": "1",
}

#: Variables that would point a child at someone else's services.
_DROPPED = ("NATS_SERVER", "DYN_SYSTEM_PORT", "DYN_HTTP_PORT", "PROMETHEUS_MULTIPROC_DIR")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


def side_env(tmpdir: str) -> dict[str, str]:
    """The environment for one side's processes: ours plus BENCH_ENV and a fresh TMPDIR."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env.update(BENCH_ENV)
    env["TMPDIR"] = tmpdir
    # Children run `python -m benchmarks...` / `-m dynamo_worker`: make the repo importable.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def python() -> str:
    """The interpreter running the benchmark (the venv's), used for every child."""
    return sys.executable


@attrs.frozen
class LevelPlan:
    """One concurrency level: how many requests, bounded in time too."""

    concurrency: int
    requests: int
    max_seconds: float


@attrs.frozen
class BenchConfig:
    """Everything one ``python -m benchmarks`` invocation does."""

    levels: tuple[LevelPlan, ...]
    sides: tuple[str, ...] = SIDES
    rounds: int = 2
    repeats: int = 3  # measurements of each level per server session
    prompt_tokens: int = 160  # more than one 128-token CPU KV block, so dynamo-disagg moves KV
    max_tokens: int = 32
    seed: int = 0
    warmup_requests: int = 64
    warmup_concurrency: int = 16
    request_timeout: float = 60.0
    startup_timeout: float = 300.0
    foreign_wait: float = 600.0  # before each round: wait at most this long for others' engines
    session_wait: float = 120.0  # before each server session within a round (shorter)
    dynamo_ref: str = "HEAD"  # git ref of dynamo_worker to measure ("worktree": the live files)
    dynamo_source: str | None = None  # where that ref was exported (set by __main__)
    client_priority: str = "realtime"  # realtime | nice | normal (see machine.client_priority)
    foreign_poll: float = 30.0
    profile: bool = True
    profile_seconds: float = 20.0
    chart: bool = True
    extras: bool = True  # the request plane alone and the killed-worker failover
    quick: bool = False


@attrs.frozen
class Run:
    """One benchmark invocation's stamp, log directory and progress log (seconds since start)."""

    stamp: str
    work_root: Path
    log: Callable[[str], None]


def start_run(out: Path, prefix: str = "") -> Run:
    """Set up a benchmark command: its ``<prefix><timestamp>-logs`` directory under ``out``, a
    progress log, and SIGTERM unwinding like Ctrl-C (through every server's ``stop()``)."""
    signal.signal(signal.SIGTERM, _interrupt)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    work_root = out / f"{prefix}{stamp}-logs"
    work_root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f}s] {msg}", flush=True)

    return Run(stamp, work_root, log)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def measured_source(ref: str, work_root: Path, info: dict[str, Any], log: Callable[[str], None]) -> Path | None:
    """Export ``dynamo_worker/`` at git ``ref`` once, so edits during the run do not change what
    is measured; records it in ``info["dynamo_source"]``. None for ``worktree`` (the live files)."""
    from benchmarks import machine  # machine imports psutil; config stays light

    if ref == "worktree":
        info["dynamo_source"] = {"ref": "worktree"}
        return None
    source = info["dynamo_source"] = machine.snapshot_source(ref, work_root / "dynamo-src")
    differed = source["work_tree_differed"]
    log(
        f"measuring dynamo_worker at {source['commit'][:10]} ({ref})"
        + (f"; the work tree differs from it in {len(differed)} file(s)" if differed else "")
    )
    return Path(source["path"])
