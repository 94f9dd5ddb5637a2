"""How long a killed worker stays in routing.

``python -m benchmarks.failover`` starts a nats-server and two echo workers (engine-free: the
time measured is discovery's, not an engine's), SIGKILLs one ``--trials`` times (starting a new
one each time) and measures, from the kill:

* **out of routing**: until the caller's routable set (:meth:`Client.instances`, what the
  frontend's router picks from) no longer lists it. A request sent to it right after the kill
  is answered "no responders" by NATS (the dead process's subscriptions went with its
  connection): the caller retries it elsewhere and takes the instance out of routing then;
* **out of discovery**: until its lease (``--lease-ttl``) expires and every caller's
  discovery view drops it (what an idle caller, which sent it nothing, waits for).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.config import REPO_ROOT, python
from benchmarks.request_plane import LocalNats, _env
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime


def _start_echo(url: str, namespace: str, lease_ttl: int, log_dir: Path, n: int) -> subprocess.Popen[bytes]:
    with open(log_dir / f"echo-{n}.log", "wb") as out:
        return subprocess.Popen(
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
                "--lease-ttl",
                str(lease_ttl),
                "--system-port",
                "0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            env=_env(),
        )


async def _trial(
    rt: Runtime, url: str, namespace: str, lease_ttl: int, log_dir: Path, n: int, timeout: float
) -> dict[str, Any]:
    client = rt.client("echo", "generate")
    victim_proc = _start_echo(url, namespace, lease_ttl, log_dir, n)
    try:
        before = {r.instance_id for r in client.instances()}
        await client.watcher.wait_for(lambda: len({r.instance_id for r in client.instances()} - before) == 1, 60)
        (victim,) = {r.instance_id for r in client.instances()} - before
        # A steady state (several keep-alives sent), then the kill at a point of the keep-alive
        # cycle that differs per trial: keep-alives run on a fixed cadence from registration, so a
        # fixed wait would always kill at the same distance from the last one (just after it: the
        # whole lease; just before it: two thirds of it).
        await asyncio.sleep(lease_ttl + random.Random(n).uniform(0, lease_ttl / 3))
        killed = time.monotonic()
        os.kill(victim_proc.pid, signal.SIGKILL)
        victim_proc.wait(10)
        failed_over = None
        try:
            async for _ in client.direct({"token_ids": [1]}, victim):
                pass
        except RequestError as exc:
            failed_over = time.monotonic() - killed if exc.retryable else None
        routable = {r.instance_id for r in client.instances()}
        out_of_routing = time.monotonic() - killed if victim not in routable else None
        gone = await client.watcher.wait_for(
            lambda: all(r.instance_id != victim for r in client.watcher.records.values()), timeout
        )
        out_of_discovery = time.monotonic() - killed if gone else None
        return {
            "request_failed_over_s": round(failed_over, 4) if failed_over is not None else None,
            "out_of_routing_s": round(out_of_routing, 4) if out_of_routing is not None else None,
            "out_of_discovery_s": round(out_of_discovery, 3) if out_of_discovery is not None else None,
        }
    finally:
        if victim_proc.poll() is None:
            victim_proc.kill()
            victim_proc.wait(10)


async def measure(
    trials: int = 5, lease_ttl: int = 3, timeout: float = 30.0, log_dir: Path | None = None
) -> dict[str, Any]:
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-failover-"))
    namespace = f"failover{os.getpid()}"
    with LocalNats() as server:
        survivor = _start_echo(server.url, namespace, lease_ttl, log_dir, 0)
        rt = await Runtime.connect(server.url, namespace)
        try:
            await rt.client("echo", "generate").wait_for_instances(60)
            results = [
                await _trial(rt, server.url, namespace, lease_ttl, log_dir, n, timeout) for n in range(1, trials + 1)
            ]
        finally:
            await rt.close()
            survivor.terminate()
            survivor.wait(30)
    out: dict[str, Any] = {"lease_ttl_s": lease_ttl, "trials": results}
    for key in ("out_of_routing_s", "out_of_discovery_s"):
        times = [r[key] for r in results if r[key] is not None]
        out[key] = {
            "median": round(statistics.median(times), 3) if times else None,
            "max": max(times) if times else None,
            "never": len(results) - len(times),
        }
    return out


def render(result: dict[str, Any]) -> str:
    r, d = result["out_of_routing_s"], result["out_of_discovery_s"]

    def never(x: dict[str, Any]) -> str:
        return f" ({x['never']} trial(s) never)" if x["never"] else ""

    return (
        f"killed worker (SIGKILL), {len(result['trials'])} trials: out of routing after its first failed "
        f"request {1000 * (r['median'] or 0):.0f} ms median, {1000 * (r['max'] or 0):.0f} ms max{never(r)}; "
        f"out of discovery (lease {result['lease_ttl_s']} s) {d['median']} s median, {d['max']} s max{never(d)}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.failover", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=5, help="kills to time (default %(default)s)")
    p.add_argument(
        "--lease-ttl", type=int, default=3, help="the workers' --lease-ttl (default %(default)s, the worker's default)"
    )
    args = p.parse_args(argv)
    if not 1 <= args.trials <= 50:
        p.error("--trials must be between 1 and 50")
    print(render(asyncio.run(measure(args.trials, args.lease_ttl))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
