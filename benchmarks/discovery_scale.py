"""Discovery at scale: N simulated workers registering on a 3-server NATS cluster (issue 18 item 5).

``python -m benchmarks.discovery_scale`` starts, on 127.0.0.1 only, three clustered nats-servers
with JetStream (routes on loopback; the discovery bucket with 3 replicas, as on a real cluster),
the real frontend (``dynamo-worker --role frontend``, connected to the first server) and, for each
``--instances`` level (default 50, 100, 200; a fresh cluster per level), that many simulated decode
workers: in-process :class:`~dynamo_worker.core.runtime.Runtime` objects, each with its own NATS
connection, spread over the three servers (instance ``i`` lists server ``i % 3`` first), serving and
publishing the six endpoints a decode worker does (``generate`` with a decode worker's record,
``clear_kv_blocks``, ``kv_blocks``, ``load_lora``, ``unload_lora``, ``list_loras``), over the TCP
request plane as a decode worker does. They run in ``--processes`` child processes, which import
everything first and then start together on one signal. Measured:

* **routable**: seconds from that signal until the frontend's ``/health`` counts all N instances
  (its model table over :meth:`Client.instances`: what its router picks from), and until every
  simulated worker had published all its records;
* **steady state**, over ``--window`` seconds after one more lease: keep-alive puts/s and bytes/s on
  the discovery subjects (a subscriber on ``$KV.<bucket>.<namespace>.>``), every message the three
  servers took in and sent out (``/varz`` deltas: clients, routes and JetStream replication
  included), and the frontend's CPU (seconds per second, less its idle rate measured before the
  workers started): what following discovery costs it. The simulated workers' CPU is reported too.

Per-instance ratios at each level show whether discovery traffic grows linearly (constant per
instance). The target: all 200 routable within 10 s of the start. Bounded: every wait has a
timeout, every count is fixed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil

from benchmarks.config import REPO_ROOT, python
from benchmarks.request_plane import _env
from benchmarks.servers import free_port
from dynamo_worker.core.discovery import BUCKET
from dynamo_worker.core.launcher import nats_server_binary

SERVERS = 3
#: A decode worker's endpoints (dynamo_worker/engine/role.py and roles/decode.py): one record each.
ENDPOINTS = ("generate", "clear_kv_blocks", "kv_blocks", "load_lora", "unload_lora", "list_loras")
COMPONENT = "backend"  # where the frontend looks for LLM workers
MODEL = "sim"
TARGET_INSTANCES, TARGET_SECONDS = 200, 10.0


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


class LoopbackCluster:
    """Three nats-servers with JetStream on 127.0.0.1, clustered over loopback routes, each with its
    own store. Stopped (by PID) on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.ports = [free_port() for _ in range(SERVERS)]
        self.route_ports = [free_port() for _ in range(SERVERS)]
        self.monitor_ports = [free_port() for _ in range(SERVERS)]
        self.procs: list[subprocess.Popen[bytes]] = []

    def urls(self, first: int = 0) -> str:
        """Every server's URL, comma-separated, server ``first`` first."""
        order = [(first + k) % SERVERS for k in range(SERVERS)]
        return ",".join(f"nats://127.0.0.1:{self.ports[i]}" for i in order)

    def __enter__(self) -> LoopbackCluster:
        try:
            for i in range(SERVERS):
                routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(self.route_ports) if j != i)
                store = self.log_dir / f"n{i}"
                store.mkdir(parents=True, exist_ok=True)
                with open(self.log_dir / f"nats-{i}.log", "wb") as out:
                    self.procs.append(
                        subprocess.Popen(
                            [
                                nats_server_binary(),
                                "-a",
                                "127.0.0.1",
                                "-p",
                                str(self.ports[i]),
                                "-m",
                                str(self.monitor_ports[i]),
                                "-n",
                                f"n{i}",
                                "-js",
                                "-sd",
                                str(store),
                                "--cluster_name",
                                "bench",
                                "--cluster",
                                f"nats://127.0.0.1:{self.route_ports[i]}",
                                "--routes",
                                routes,
                            ],
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                        )
                    )
            self._wait_for_meta_leader(30)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_for_meta_leader(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        leaders: set[Any] = set()
        while time.monotonic() < deadline:
            leaders = set()
            for port in self.monitor_ports:
                try:
                    leaders.add((_get_json(f"http://127.0.0.1:{port}/jsz").get("meta_cluster") or {}).get("leader"))
                except OSError:
                    leaders.add(None)
            if len(leaders) == 1 and None not in leaders:
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"the NATS cluster has no JetStream meta leader after {timeout:.0f}s ({leaders}); "
            f"see {self.log_dir}/nats-*.log"
        )

    def varz(self) -> list[dict[str, int]]:
        keys = ("in_msgs", "out_msgs", "in_bytes", "out_bytes")
        return [
            {k: int(v[k]) for k in keys} for v in (_get_json(f"http://127.0.0.1:{p}/varz") for p in self.monitor_ports)
        ]

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for i in range(SERVERS):  # the JetStream stores (tens of MB at 200 instances); the logs stay
            shutil.rmtree(self.log_dir / f"n{i}", ignore_errors=True)


# ---- the simulated workers (a child process each) ------------------------------------------------


async def _answer(request: Any, context: Any) -> AsyncIterator[Any]:
    """Every simulated endpoint's handler: the request's token ids back (nothing calls it here)."""
    tokens = request.get("token_ids", []) if isinstance(request, dict) else []
    yield {"token_ids": tokens}


def _record_data(model_path: str, endpoint: str) -> dict[str, Any]:
    if endpoint != "generate":
        return {"model": MODEL}
    # engine.handlers.ModelFacts.discovery_data with a KV-routing engine's fields
    return {
        "model": MODEL,
        "model_path": model_path,
        "max_model_len": 512,
        "eos_token_ids": [2],
        "kind": "decode",
        "data_parallel_size": 1,
        "kv_block_size": 16,
        "kv_capacity_blocks": 4096,
        "kv_events": True,
    }


async def _simulate(args: argparse.Namespace) -> None:
    from dynamo_worker.core.runtime import Runtime

    urls: list[str] = args.urls.split(",")
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # "go": every process starts at once
    started = time.monotonic()

    async def one(index: int) -> Any:
        first = index % len(urls)
        order = ",".join(urls[(first + k) % len(urls)] for k in range(len(urls)))
        # As a worker's start-up does (core/worker.py): connect, serve every endpoint, then publish each.
        rt = await Runtime.connect(
            order,
            args.namespace,
            lease_ttl=args.lease_ttl,
            discovery_replicas=SERVERS,
            request_plane="tcp",
            timeout=30,
            name=f"sim-{index}",
        )
        for endpoint in ENDPOINTS:
            await rt.serve_endpoint(COMPONENT, endpoint, _answer)
        for endpoint in ENDPOINTS:
            await rt.publish(COMPONENT, endpoint, "decode", _record_data(args.model, endpoint))
        return rt

    runtimes = await asyncio.gather(*(one(args.offset + i) for i in range(args.count)))
    print(f"registered {time.monotonic() - started:.3f}", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # "stop" (or EOF)
    await asyncio.gather(*(rt.withdraw() for rt in runtimes))
    await asyncio.gather(*(rt.close() for rt in runtimes))


# ---- the measurement -----------------------------------------------------------------------------


def _frontend_instances(base: str) -> int:
    try:
        return int(_get_json(f"{base}/health")["instances"])
    except urllib.error.HTTPError as err:  # 503 while it routes to none
        return int(json.load(err)["instances"])
    except (OSError, ValueError, KeyError):
        return -1


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


async def _quiet(proc: psutil.Process, timeout: float, rate: float = 0.05, step: float = 0.5) -> None:
    """Wait (up to ``timeout``) until ``proc`` uses under ``rate`` CPU seconds per second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = _cpu(proc)
        await asyncio.sleep(step)
        if (_cpu(proc) - before) / step < rate:
            return


class _Frontend:
    """The real frontend process, connected to the cluster's first server."""

    def __init__(self, urls: str, namespace: str, lease_ttl: int, log_dir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        with open(log_dir / "frontend.log", "wb") as out:
            self.proc = subprocess.Popen(
                [
                    python(),
                    "-m",
                    "dynamo_worker",
                    "--role",
                    "frontend",
                    "--nats-url",
                    urls,
                    "--namespace",
                    namespace,
                    "--lease-ttl",
                    str(lease_ttl),
                    "--discovery-replicas",
                    str(SERVERS),
                    "--http-port",
                    str(self.port),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=REPO_ROOT,
                env=_env(),
            )
        self.ps = psutil.Process(self.proc.pid)
        self.log = log_dir / "frontend.log"

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while _frontend_instances(self.base) < 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the frontend did not answer /health within {timeout:.0f}s; see {self.log}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class _KvCounter:
    """Counts the discovery puts of one namespace (the keep-alives, in steady state) on the bus."""

    def __init__(self) -> None:
        self.msgs = 0
        self.bytes = 0
        self.nc: Any = None

    async def start(self, url: str, namespace: str) -> None:
        import nats

        self.nc = await nats.connect(url.split(","), connect_timeout=5, max_reconnect_attempts=0)

        async def count(msg: Any) -> None:
            self.msgs += 1
            self.bytes += len(msg.data)

        await self.nc.subscribe(f"$KV.{BUCKET}.{namespace}.>", cb=count)
        await self.nc.flush()

    async def close(self) -> None:
        if self.nc is not None:
            await self.nc.close()


def _start_simulators(
    cluster: LoopbackCluster, namespace: str, instances: int, processes: int, lease_ttl: int, model: str, log_dir: Path
) -> list[subprocess.Popen[str]]:
    sims: list[subprocess.Popen[str]] = []
    offset = 0
    for p in range(processes):
        count = instances // processes + (1 if p < instances % processes else 0)
        if count == 0:
            continue
        urls = ",".join(f"nats://127.0.0.1:{port}" for port in cluster.ports)
        with open(log_dir / f"sim-{p}.log", "wb") as err:
            sims.append(
                subprocess.Popen(
                    [
                        python(),
                        "-m",
                        "benchmarks.discovery_scale",
                        "--simulate",
                        "--urls",
                        urls,
                        "--namespace",
                        namespace,
                        "--offset",
                        str(offset),
                        "--count",
                        str(count),
                        "--lease-ttl",
                        str(lease_ttl),
                        "--model",
                        model,
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    text=True,
                    cwd=REPO_ROOT,
                    env=_env(),
                )
            )
        offset += count
    return sims


def _read_line(proc: subprocess.Popen[str], expect: str, timeout: float, what: str) -> str:
    """The child's next stdout line, which must start with ``expect`` (bounded by ``timeout``)."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError(f"{what}: no {expect!r} from a simulator within {timeout:.0f}s")
    line = proc.stdout.readline().strip()
    if not line.startswith(expect):
        raise RuntimeError(f"{what}: a simulator said {line!r} (exit status {proc.poll()}), not {expect!r}")
    return line


async def measure_level(
    instances: int,
    *,
    processes: int = 2,
    lease_ttl: int = 3,
    window: float = 10.0,
    timeout: float = 60.0,
    model: str,
    log_dir: Path,
) -> dict[str, Any]:
    """One level: a fresh cluster and frontend, ``instances`` simulated workers; see the module doc."""
    level_dir = log_dir / f"n{instances}"
    level_dir.mkdir(parents=True, exist_ok=True)
    namespace = f"scale{instances}"
    with LoopbackCluster(level_dir) as cluster:
        frontend = _Frontend(cluster.urls(0), namespace, lease_ttl, level_dir)
        sims: list[subprocess.Popen[str]] = []
        counter = _KvCounter()
        try:
            await asyncio.to_thread(frontend.wait_listening, 60)
            await counter.start(cluster.urls(0), namespace)
            sims = _start_simulators(cluster, namespace, instances, processes, lease_ttl, model, level_dir)
            for sim in sims:
                await asyncio.to_thread(_read_line, sim, "ready", 60, "start-up")
            # The frontend's idle CPU rate, to take out of its steady-state figure: once its start-up
            # work (tokenizer warm-up after /health first answers) is over.
            await _quiet(frontend.ps, 20.0)
            idle_s = 3.0
            cpu0 = _cpu(frontend.ps)
            await asyncio.sleep(idle_s)
            idle_rate = (_cpu(frontend.ps) - cpu0) / idle_s
            sim_ps = [psutil.Process(s.pid) for s in sims]

            cpu_go = _cpu(frontend.ps)
            go = time.monotonic()
            for sim in sims:
                assert sim.stdin is not None
                sim.stdin.write("go\n")
                sim.stdin.flush()
            routable_s: float | None = None
            seen = 0
            while time.monotonic() - go < timeout:
                seen = await asyncio.to_thread(_frontend_instances, frontend.base)
                if seen == instances:
                    routable_s = time.monotonic() - go
                    break
                await asyncio.sleep(0.05)
            cpu_joined = _cpu(frontend.ps) - cpu_go
            published = [float(_read_line(s, "registered", timeout, "registration").split()[1]) for s in sims]

            # Steady state: one more lease, so every keep-alive round runs on its own cadence.
            await asyncio.sleep(lease_ttl)
            before_varz, before_msgs, before_bytes = cluster.varz(), counter.msgs, counter.bytes
            before_fe, before_sims = _cpu(frontend.ps), sum(_cpu(p) for p in sim_ps)
            t0 = time.monotonic()
            await asyncio.sleep(window)
            elapsed = time.monotonic() - t0
            after_varz, fe_cpu = cluster.varz(), _cpu(frontend.ps) - before_fe
            sims_cpu = sum(_cpu(p) for p in sim_ps) - before_sims
            kv_msgs, kv_bytes = counter.msgs - before_msgs, counter.bytes - before_bytes
            still = await asyncio.to_thread(_frontend_instances, frontend.base)
        finally:
            for sim in sims:
                if sim.poll() is None and sim.stdin is not None:
                    sim.stdin.write("stop\n")
                    sim.stdin.close()
            for sim in sims:
                try:
                    sim.wait(30)
                except subprocess.TimeoutExpired:
                    sim.kill()
                    sim.wait(10)
            await counter.close()
            frontend.stop()

    def delta(key: str) -> int:
        return sum(a[key] - b[key] for a, b in zip(after_varz, before_varz))

    bus_in, bus_out = delta("in_msgs") / elapsed, delta("out_msgs") / elapsed
    bus_bytes = (delta("in_bytes") + delta("out_bytes")) / elapsed
    fe_rate = fe_cpu / elapsed
    return {
        "instances": instances,
        "records": instances * len(ENDPOINTS),
        "processes": len(sims),
        "lease_ttl": lease_ttl,
        "window_s": round(elapsed, 2),
        "routable_s": round(routable_s, 3) if routable_s is not None else None,
        "routable_seen": instances if routable_s is not None else seen,
        "published_s": round(max(published), 3),
        "routable_after_window": still,
        "frontend_cpu_s_until_routable": round(cpu_joined, 3),
        "keepalive_msgs_per_s": round(kv_msgs / elapsed, 1),
        "keepalive_bytes_per_s": round(kv_bytes / elapsed),
        "bus_in_msgs_per_s": round(bus_in, 1),
        "bus_out_msgs_per_s": round(bus_out, 1),
        "bus_bytes_per_s": round(bus_bytes),
        "frontend_cpu_per_s": round(fe_rate, 4),
        "frontend_idle_cpu_per_s": round(idle_rate, 4),
        "frontend_discovery_cpu_per_s": round(max(0.0, fe_rate - idle_rate), 4),
        "simulators_cpu_per_s": round(sims_cpu / elapsed, 3),
        "per_instance": {
            "keepalive_msgs_per_s": round(kv_msgs / elapsed / instances, 3),
            "bus_in_msgs_per_s": round(bus_in / instances, 3),
            "bus_out_msgs_per_s": round(bus_out / instances, 3),
            "bus_bytes_per_s": round(bus_bytes / instances),
            "frontend_discovery_cpu_ms_per_s": round(1000 * max(0.0, fe_rate - idle_rate) / instances, 4),
        },
    }


async def measure(
    levels: tuple[int, ...] = (50, 100, 200),
    *,
    processes: int = 2,
    lease_ttl: int = 3,
    window: float = 10.0,
    timeout: float = 60.0,
    model: str,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Every level in turn, each on a fresh cluster; the linearity ratios and the target."""
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="bench-discovery-scale-"))
    results = [
        await measure_level(
            n, processes=processes, lease_ttl=lease_ttl, window=window, timeout=timeout, model=model, log_dir=log_dir
        )
        for n in levels
    ]
    smallest = results[0]["per_instance"]
    linearity = {}
    for key in (
        "keepalive_msgs_per_s",
        "bus_in_msgs_per_s",
        "bus_out_msgs_per_s",
        "bus_bytes_per_s",
        "frontend_discovery_cpu_ms_per_s",
    ):
        base = smallest[key]
        linearity[key] = {
            str(r["instances"]): round(r["per_instance"][key] / base, 2) if base else None for r in results
        }
    at_target = next((r for r in results if r["instances"] == TARGET_INSTANCES), None)
    return {
        "levels": results,
        "endpoints_per_instance": len(ENDPOINTS),
        "servers": SERVERS,
        "discovery_replicas": SERVERS,
        "log_dir": str(log_dir),
        "per_instance_vs_smallest": linearity,
        "target": {
            "instances": TARGET_INSTANCES,
            "seconds": TARGET_SECONDS,
            "met": (at_target["routable_s"] is not None and at_target["routable_s"] <= TARGET_SECONDS)
            if at_target
            else None,
        },
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"discovery at scale: simulated decode workers ({result['endpoints_per_instance']} records each) on "
        f"{result['servers']} clustered nats-servers (bucket replicas {result['discovery_replicas']}), "
        f"lease {result['levels'][0]['lease_ttl']} s",
        "| instances | routable after | all published after | keep-alives/s (per inst.) | bus in msgs/s "
        "(per inst.) | bus out msgs/s (per inst.) | bus kB/s | frontend CPU for discovery (per 100 inst.) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["levels"]:
        p = r["per_instance"]
        routable = f"{r['routable_s']:.2f} s" if r["routable_s"] is not None else f"never ({r['routable_seen']})"
        lines.append(
            f"| {r['instances']} | {routable} | {r['published_s']:.2f} s | {r['keepalive_msgs_per_s']:,.0f} "
            f"({p['keepalive_msgs_per_s']:.2f}) | {r['bus_in_msgs_per_s']:,.0f} ({p['bus_in_msgs_per_s']:.1f}) | "
            f"{r['bus_out_msgs_per_s']:,.0f} ({p['bus_out_msgs_per_s']:.1f}) | {r['bus_bytes_per_s'] / 1000:,.0f} | "
            f"{r['frontend_discovery_cpu_per_s']:.3f} s/s ({p['frontend_discovery_cpu_ms_per_s'] * 100:.0f} ms/s) |"
        )
    lin = result["per_instance_vs_smallest"]
    lines.append(
        "per-instance figures as ratios to the smallest level (1.00 = linear): "
        + "; ".join(f"{key} " + ", ".join(f"{n}: {v}" for n, v in per.items()) for key, per in lin.items())
    )
    t = result["target"]
    if t["met"] is not None:
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"target ({t['instances']} routable within {t['seconds']:.0f} s): {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.discovery_scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--instances",
        default="50,100,200",
        help="simulated workers per level, comma-separated (default %(default)s; at most 500 each)",
    )
    p.add_argument(
        "--processes",
        type=int,
        default=2,
        help="child processes the simulated workers run in (default %(default)s: one per core)",
    )
    p.add_argument(
        "--lease-ttl", type=int, default=3, help="discovery lease, seconds (default %(default)s, the workers' default)"
    )
    p.add_argument("--window", type=float, default=10.0, help="steady-state measurement, seconds (default %(default)s)")
    p.add_argument(
        "--timeout", type=float, default=60.0, help="bound on the wait until all are routable (default %(default)s)"
    )
    p.add_argument(
        "--model", default=None, help="model directory whose tokenizer the records name (default: the demo model)"
    )
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="the servers' and processes' logs (default: a new temporary directory)",
    )
    # A simulator child process (started by the measurement):
    p.add_argument("--simulate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--urls", help=argparse.SUPPRESS)
    p.add_argument("--namespace", help=argparse.SUPPRESS)
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.simulate:
        asyncio.run(_simulate(args))
        return 0
    try:
        levels = tuple(int(n) for n in args.instances.split(",") if n.strip())
    except ValueError:
        p.error(f"--instances {args.instances!r}: give comma-separated integers")
    if not levels or not all(1 <= n <= 500 for n in levels):
        p.error("--instances: each level must be between 1 and 500")
    if (
        not 1 <= args.processes <= 16
        or not 1 <= args.lease_ttl <= 60
        or not 1 <= args.window <= 120
        or not 1 <= args.timeout <= 600
    ):
        p.error("--processes 1-16, --lease-ttl 1-60, --window 1-120, --timeout 1-600")
    if args.model is None:
        from dynamo_worker.demo_model import ensure_demo_model

        args.model = str(ensure_demo_model())
    result = asyncio.run(
        measure(
            levels,
            processes=args.processes,
            lease_ttl=args.lease_ttl,
            window=args.window,
            timeout=args.timeout,
            model=args.model,
            log_dir=args.log_dir,
        )
    )
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
