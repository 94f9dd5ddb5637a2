"""The request plane alone: the echo role streaming tokens (over TCP, and through NATS) vs bare nats-py.

``python -m benchmarks.request_plane`` starts its own nats-server on 127.0.0.1 and measures, in
one invocation and on the same server:

* **bare**: a nats-py publisher process sends ``N`` messages of the size of one echo frame to a
  subject; a nats-py subscriber (this process) counts them. Messages/s between the first and the
  last one received: what one Python publisher and one Python subscriber can move.
* **echo**: a ``dynamo-worker --role echo`` process streams ``N`` tokens back, one frame per
  token, over ``S`` concurrent requests made through :class:`dynamo_worker.core.runtime.Client`
  (the path every role's responses take), once on the TCP request plane (the default) and once
  through NATS (``--request-plane nats``). Frames/s over the same window.

The ratio echo/bare is the request plane's efficiency; ``1/echo - 1/bare`` is the per-message
overhead it adds to nats-py. Everything is bounded in count and in time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from dynamo_worker_echo import MAX_TOKENS

from benchmarks.config import REPO_ROOT, python
from benchmarks.servers import free_port
from dynamo_worker.core import wire
from dynamo_worker.core.launcher import nats_server_binary
from dynamo_worker.core.runtime import Runtime

#: One echo frame, as the worker sends it: the size the bare publisher sends too.
SAMPLE_FRAME = wire.encode(wire.Frame(wire.DATA, 123, d={"token_ids": [321]}))


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class LocalNats:
    """A nats-server with JetStream on a free 127.0.0.1 port, in a temporary store."""

    def __init__(self) -> None:
        self.port = free_port()
        self.store = tempfile.mkdtemp(prefix="bench-nats-")
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalNats:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.store],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not _accepting(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start on port {self.port}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)


async def _connect(url: str) -> Any:
    return await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)


# ---- bare nats-py ------------------------------------------------------------------------------


async def _publish(url: str, subject: str, count: int) -> None:
    nc = await _connect(url)
    for _ in range(count):
        await nc.publish(subject, SAMPLE_FRAME)
    await nc.flush(30)
    await nc.close()


async def bare(url: str, messages: int, timeout: float) -> dict[str, Any]:
    """Messages/s from a nats-py publisher process to a nats-py subscriber (this process)."""
    nc = await _connect(url)
    got: list[float] = []
    done = asyncio.Event()

    async def on_msg(msg: Any) -> None:
        got.append(time.perf_counter())
        if len(got) >= messages:
            done.set()

    await nc.subscribe("bench.bare", cb=on_msg)
    await nc.flush()
    publisher = subprocess.Popen(
        [python(), "-m", "benchmarks.request_plane", "--publish", url, str(messages)], cwd=REPO_ROOT, env=_env()
    )
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        pass  # counted below: a lost or late message shows as fewer received
    finally:
        publisher.wait(30)
        await nc.close()
    return _rate(got, messages)


# ---- the request plane through the echo role -------------------------------------------------------


async def echo(
    url: str, messages: int, streams: int, timeout: float, log_dir: Path, plane: str = "tcp"
) -> dict[str, Any]:
    """Frames/s from an echo worker to a :class:`Client` over ``streams`` concurrent requests."""
    namespace = f"bench{os.getpid()}{plane}{streams}"
    log_path = log_dir / f"echo-worker-{plane}-{streams}.log"
    with open(log_path, "wb") as out:
        worker = subprocess.Popen(
            [
                python(),
                "-m",
                "dynamo_worker",
                "--role",
                "echo",
                "--nats-url",
                url,
                "--namespace",
                namespace,
                "--system-port",
                "0",
                "--request-plane",
                "tcp",
            ],  # listens on TCP, answers on NATS too
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=_env(),
        )
    rt = await Runtime.connect(url, namespace, request_plane=plane)
    try:
        client = rt.client("echo", "generate")
        await client.wait_for_instances(60)
        per_stream = max(1, messages // streams)
        # Warm up the path (imports, connection buffers) before timing.
        async for _ in client.generate({"token_ids": list(range(64))}):
            pass
        got: list[float] = []

        async def one(count: int) -> None:
            while count > 0:  # the echo role takes at most MAX_TOKENS per request
                n = min(count, MAX_TOKENS)
                async for _ in client.generate({"token_ids": list(range(n))}):
                    got.append(time.perf_counter())
                count -= n

        calls = [one(per_stream) for _ in range(streams)]
        try:
            await asyncio.wait_for(asyncio.gather(*calls), timeout)
        except asyncio.TimeoutError:
            pass  # fewer frames received: the rate below uses what arrived
        return _rate(got, per_stream * streams)
    finally:
        await rt.close()
        worker.terminate()
        worker.wait(30)


def _rate(times: list[float], expected: int) -> dict[str, Any]:
    if len(times) < 2:
        return {"received": len(times), "expected": expected, "msgs_per_s": None, "us_per_msg": None}
    span = times[-1] - times[0]
    rate = (len(times) - 1) / span if span > 0 else None
    return {
        "received": len(times),
        "expected": expected,
        "seconds": round(span, 3),
        "msgs_per_s": round(rate) if rate else None,
        "us_per_msg": round(1e6 / rate, 2) if rate else None,
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # An exported snapshot on PYTHONPATH (the measured dynamo_worker) stays ahead of the work tree.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH", ""), str(REPO_ROOT)) if p)
    for name in ("NATS_SERVER", "DYN_SYSTEM_PORT", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)
    return env


async def measure(
    messages: int = 50_000, streams: tuple[int, ...] = (1, 16, 64), timeout: float = 60.0, log_dir: Path | None = None
) -> dict[str, Any]:
    """Bare nats-py and the echo role on one nats-server; the ratio and per-message overhead."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-request-plane-"))
    with LocalNats() as server:
        baseline = await bare(server.url, messages, timeout)
        result: dict[str, Any] = {"messages": messages, "frame_bytes": len(SAMPLE_FRAME), "bare": baseline, "echo": {}}
        for plane, key in (("tcp", "echo"), ("nats", "echo_nats")):
            result[key] = {}
            for s in streams:
                e = await echo(server.url, messages, s, timeout, log_dir, plane)
                if e["msgs_per_s"] and baseline["msgs_per_s"]:
                    e["ratio_to_bare"] = round(e["msgs_per_s"] / baseline["msgs_per_s"], 2)
                    e["overhead_us_per_msg"] = round(e["us_per_msg"] - baseline["us_per_msg"], 2)
                result[key][str(s)] = e
    return result


def render(result: dict[str, Any]) -> str:
    b = result["bare"]
    lines = [
        f"request plane ({result['messages']:,} messages of {result['frame_bytes']} bytes; one nats-server):",
        f"  bare nats-py pub -> sub     {b['msgs_per_s'] or 0:>9,} msg/s  {b['us_per_msg'] or 0:7.2f} us/msg  "
        f"({b['received']:,}/{b['expected']:,} received)",
    ]
    for key, plane in (("echo", "tcp "), ("echo_nats", "nats")):  # runs before 2026-12-02 had NATS only, as "echo"
        for s, e in result.get(key, {}).items():
            lines.append(
                f"  echo role, {plane}, {s:>2} stream(s) {e['msgs_per_s'] or 0:>9,} msg/s  "
                f"{e['us_per_msg'] or 0:7.2f} us/msg  {e.get('ratio_to_bare', 0):.2f}x bare, "
                f"+{e.get('overhead_us_per_msg', 0):.2f} us/msg  ({e['received']:,}/{e['expected']:,} received)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.request_plane",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--messages", type=int, default=50_000, help="messages per measurement (default %(default)s)")
    p.add_argument(
        "--streams", default="1,16,64", help="concurrent echo requests, comma-separated (default %(default)s)"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="bound on each measurement (default %(default)s)")
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--publish", nargs=2, metavar=("URL", "COUNT"), help=argparse.SUPPRESS)  # the bare publisher
    args = p.parse_args(argv)
    if args.publish:
        asyncio.run(_publish(args.publish[0], "bench.bare", int(args.publish[1])))
        return 0
    if not 1 <= args.messages <= 1_000_000:
        p.error("--messages must be between 1 and 1000000")
    result = asyncio.run(measure(args.messages, tuple(int(s) for s in args.streams.split(",")), args.timeout))
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
