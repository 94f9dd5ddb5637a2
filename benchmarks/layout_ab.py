"""``python -m benchmarks.layout_ab``: does a CPU layout of a server's processes change its speed?

On this 2-core machine vLLM's engine processes poll: the EngineCore and its Worker busy-loop
(``sched_yield``) on their shared-memory queues for a second after each message, so the serving
processes (our frontend and decode worker; ``vllm serve``'s API server) are scheduled beside two
processes that never sleep under load. This tool starts one server side, then alternates the
default layout and one alternative *within the same session*, level by level (A B, B A, A B, ...),
so that a slow phase of the shared machine hits both alike, and prints the paired ratios.

Layouts (applied to the live processes, every thread; the default is put back between samples):

* ``engine-nice:N``: the engine processes at nice N (the serving path preempts their polling);
* ``pin-runner``: vLLM's model-runner process alone on CPU 1, every other server process on CPU 0;
* ``batch``: the serving processes under ``SCHED_BATCH`` (no wake-up preemption).

Putting a nice value back down needs root (or CAP_SYS_NICE), as on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from benchmarks import machine, report
from benchmarks.config import BENCH_ENV, RESULTS_DIR
from benchmarks.load import run_level
from benchmarks.servers import SERVERS
from benchmarks.workload import make_prompts

LEVELS = ((1, 100), (16, 400), (64, 400))  # (concurrency, requests)


def _threads(pids: set[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            out += [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue  # exited
    return out


def _each_thread(pids: set[int], apply: Callable[[int], None]) -> None:
    for tid in _threads(pids):
        try:
            apply(tid)
        except ProcessLookupError:
            continue  # a thread that ended meanwhile


def layout_switch(name: str, engine: set[int], others: set[int]) -> Callable[[bool], None]:
    """``switch(True)`` applies layout ``name`` to the processes, ``switch(False)`` undoes it."""
    every_cpu = set(range(os.cpu_count() or 1))
    if name.startswith("engine-nice:"):
        nice = int(name.split(":", 1)[1])
        return lambda on: _each_thread(engine, lambda t: os.setpriority(os.PRIO_PROCESS, t, nice if on else 0))
    if name == "pin-runner":
        runner = {p for p in engine if "Worker" in psutil.Process(p).name()}

        def pin(on: bool) -> None:
            _each_thread(runner, lambda t: os.sched_setaffinity(t, {1} if on else every_cpu))
            _each_thread((engine | others) - runner, lambda t: os.sched_setaffinity(t, {0} if on else every_cpu))

        return pin
    if name == "batch":

        def batch(on: bool) -> None:
            policy = os.SCHED_BATCH if on else os.SCHED_OTHER
            _each_thread(others, lambda t: os.sched_setscheduler(t, policy, os.sched_param(0)))

        return batch
    raise SystemExit(f"error: unknown --layout {name!r}; use engine-nice:N, pin-runner or batch")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.layout_ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--side", choices=sorted(SERVERS), default="dynamo")
    p.add_argument("--layout", required=True, help="engine-nice:N, pin-runner or batch")
    p.add_argument("--pairs", type=int, default=6, help="A/B pairs per level (default %(default)s)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not 1 <= args.pairs <= 20:
        raise SystemExit("error: --pairs must be 1-20")
    layout_switch(args.layout, set(), set())  # a bad --layout fails here, before any server starts
    os.environ.update(BENCH_ENV)  # the servers inherit it, as in python -m benchmarks
    from dynamo_worker.demo_model import ensure_demo_model

    model = str(ensure_demo_model())
    prompts = make_prompts(max(n for _, n in LEVELS), 160, 0)
    server = SERVERS[args.side](model, Path(tempfile.mkdtemp(prefix="layout-ab-")), print)
    samples: dict[str, dict[int, list[dict[str, float]]]] = {"default": {}, args.layout: {}}
    try:
        server.start(300)
        server.first_answer(prompts[0])
        asyncio.run(
            run_level(
                server.base_url,
                "demo",
                prompts,
                concurrency=16,
                requests=64,
                max_tokens=32,
                max_seconds=60,
                request_timeout=60,
            )
        )  # warm-up
        procs = machine.descendants(server.roots().values())
        engine = {pid for pid in procs if machine.is_engine(psutil.Process(pid))}
        switch = layout_switch(args.layout, engine, procs - engine)
        for i in range(args.pairs):
            for on in (False, True) if i % 2 == 0 else (True, False):
                switch(on)
                for concurrency, requests in LEVELS:
                    with machine.client_priority("realtime"):
                        run = asyncio.run(
                            run_level(
                                server.base_url,
                                "demo",
                                prompts,
                                concurrency=concurrency,
                                requests=requests,
                                max_tokens=32,
                                max_seconds=60,
                                request_timeout=60,
                            )
                        )
                    s = report.summarize_run(run)
                    samples[args.layout if on else "default"].setdefault(concurrency, []).append(
                        {"tok_per_s": s["tok_per_s"], "ttft_p50_ms": s["ttft_p50_ms"] or 0.0, "errors": s["errors"]}
                    )
        switch(False)
    finally:
        server.stop()
    print(f"{args.side}: default vs {args.layout}, {args.pairs} pairs per level, medians and paired tok/s ratios")
    for concurrency, _ in LEVELS:
        a, b = samples["default"][concurrency], samples[args.layout][concurrency]
        ratios = sorted(y["tok_per_s"] / x["tok_per_s"] for x, y in zip(a, b))
        med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
        print(
            f"  c={concurrency:<3} "
            f"default {med(a, 'tok_per_s'):7,.0f} tok/s TTFT p50 {med(a, 'ttft_p50_ms'):7.2f} ms | "
            f"{args.layout} {med(b, 'tok_per_s'):7,.0f} tok/s TTFT p50 {med(b, 'ttft_p50_ms'):7.2f} ms | "
            f"paired ratio median {statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"layout-ab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(
        json.dumps(
            {"side": args.side, "layout": args.layout, "levels": LEVELS, "samples": samples}, default=str, indent=1
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
