"""Soak: thousands of requests through a real frontend and worker; does memory stay flat?

``python -m benchmarks.soak [--requests 5000] [--concurrency 16] [--max-seconds 300]``

Starts, on 127.0.0.1 only, a nats-server, an echo worker serving the demo model's tokenizer
(``--role echo --echo-model``: the whole stack but the engine, so the run is cheap and the
memory measured is the frontend's and the worker's own) and a frontend. After a warm-up it
sends ``--requests`` completions (half streamed, a mix of lengths, some bad requests and some
clients that hang up mid-stream) at ``--concurrency``, bounded by ``--max-seconds``, and samples
the resident set size (RSS) of the frontend and the worker. It prints the RSS after warm-up and
at the end, and their ratio; it exits 1 if a ratio exceeds ``--max-growth`` or a request that
should have succeeded failed. Everything it started is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from benchmarks.servers import free_port


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


class Stack:
    def __init__(self, model: str, log_dir: Path) -> None:
        from dynamo_worker.core.launcher import nats_server_binary

        self.log_dir = log_dir
        self.nats_port, self.http_port = free_port(), free_port()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._start(
            "nats",
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.nats_port), "-js", "-sd", str(log_dir / "js")],
        )
        common = ["--nats-url", f"nats://127.0.0.1:{self.nats_port}", "--namespace", "soak"]
        exe = [sys.executable, "-m", "dynamo_worker"]
        self._start("worker", [*exe, "--role", "echo", *common, "--echo-model", model])
        self._start(
            "frontend",
            [
                *exe,
                "--role",
                "frontend",
                *common,
                "--http-port",
                str(self.http_port),
                "--max-concurrent-requests",
                "1024",
            ],
        )
        self.base = f"http://127.0.0.1:{self.http_port}"

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - the child holds it
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SystemExit(f"soak: {name} exited {proc.returncode}; see {self.log_dir / (name + '.log')}")

    def stop(self) -> None:
        for name in ("frontend", "worker", "nats"):
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)


async def wait_ready(stack: Stack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            stack.check_alive()
            try:
                async with session.get(f"{stack.base}/v1/models") as resp:
                    if resp.status == 200 and (await resp.json())["data"]:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"soak: the stack did not serve within {timeout:.0f}s; logs in {stack.log_dir}")


WORDS = "the little bird sings over a quiet river while the tiny robot walks home".split()


async def one(session: aiohttp.ClientSession, base: str, rng: random.Random) -> str:
    """One request of a random kind; returns its outcome ("ok", "bad_ok" for an expected 4xx, or the failure)."""
    kind = rng.random()
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 60)))
    if kind < 0.05:  # a bad request: must be a 400, and must not leak
        async with session.post(
            f"{base}/v1/completions", json={"model": "echo", "prompt": prompt, "max_tokens": -1}
        ) as resp:
            return "bad_ok" if resp.status == 400 else f"bad request got {resp.status}"
    stream = kind < 0.55
    body: dict[str, Any] = {"model": "echo", "prompt": prompt, "max_tokens": rng.randint(1, 48), "stream": stream}
    async with session.post(f"{base}/v1/completions", json=body) as resp:
        if resp.status != 200:
            return f"status {resp.status}"
        if not stream:
            await resp.json()
            return "ok"
        if kind < 0.10:  # a client that hangs up after the first event
            await resp.content.readline()
            resp.close()
            return "ok"
        text = await resp.read()
        return "ok" if text.endswith(b"data: [DONE]\n\n") else "truncated stream"


async def drive(base: str, count: int, concurrency: int, deadline: float, seed: int) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    remaining = [count]
    rng = random.Random(seed)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def client() -> None:
            while remaining[0] > 0 and time.monotonic() < deadline:
                remaining[0] -= 1
                try:
                    outcome = await one(session, base, rng)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    outcome = f"client error {type(exc).__name__}"
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=5000, help="requests after warm-up (default %(default)s)")
    p.add_argument("--warmup", type=int, default=500, help="requests before the first RSS sample (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="clients at once (default %(default)s)")
    p.add_argument("--max-seconds", type=float, default=300, help="stop sending after this long (default %(default)s)")
    p.add_argument(
        "--max-growth",
        type=float,
        default=1.25,
        help="fail if end RSS / start RSS exceeds this for either process (default %(default)s)",
    )
    p.add_argument("--model", default=None, help="model directory with a tokenizer (default: the demo model)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for flag, value in (
        ("--requests", args.requests),
        ("--concurrency", args.concurrency),
        ("--max-seconds", args.max_seconds),
    ):
        if value <= 0:
            p.error(f"{flag} must be greater than 0")
    if args.model is None:
        from dynamo_worker.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    log_dir = Path(tempfile.mkdtemp(prefix="dw-soak-"))
    stack = Stack(args.model, log_dir)
    try:
        asyncio.run(wait_ready(stack))
        started = time.monotonic()
        warm = asyncio.run(drive(stack.base, args.warmup, args.concurrency, started + args.max_seconds, args.seed))
        start_rss = {name: rss_mib(stack.procs[name].pid) for name in ("frontend", "worker")}
        t0 = time.monotonic()
        outcomes = asyncio.run(
            drive(stack.base, args.requests, args.concurrency, started + args.max_seconds, args.seed + 1)
        )
        elapsed = time.monotonic() - t0
        stack.check_alive()
        end_rss = {name: rss_mib(stack.procs[name].pid) for name in ("frontend", "worker")}
    finally:
        stack.stop()
    sent = sum(outcomes.values())
    failed = {k: v for k, v in outcomes.items() if k not in ("ok", "bad_ok")}
    report = {
        "requests": sent,
        "warmup": sum(warm.values()),
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 1),
        "requests_per_second": round(sent / elapsed, 1),
        "outcomes": outcomes,
        "rss_mib_start": {k: round(v, 1) for k, v in start_rss.items()},
        "rss_mib_end": {k: round(v, 1) for k, v in end_rss.items()},
        "rss_ratio": {k: round(end_rss[k] / start_rss[k], 3) for k in start_rss},
    }
    print(json.dumps(report, indent=2))
    for name, ratio in report["rss_ratio"].items():
        print(f"{name}: RSS {start_rss[name]:.1f} MiB -> {end_rss[name]:.1f} MiB (x{ratio:.3f})")
    if failed:
        print(f"soak: requests failed: {failed}", file=sys.stderr)
        return 1
    grown = [k for k, r in report["rss_ratio"].items() if r > args.max_growth]
    if grown:
        print(f"soak: RSS grew more than x{args.max_growth} in {', '.join(grown)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
