"""The core's own command-line options, as a core plugin (registered first, cannot be disabled)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any, TypeVar

from dynamo_worker.core import nats_auth, request_plane_auth
from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.hookspecs import hookimpl
from dynamo_worker.core.tcp_plane import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT

T = TypeVar("T")

DEFAULT_NAMESPACE = "dynamo"
DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def env_default(var: str, default: T, convert: Callable[[str], T] = str) -> T:  # type: ignore[assignment]
    """The default for a flag that an environment variable may set (the flag still wins)."""
    raw = os.environ.get(var)
    if raw is None or raw == "":
        return default
    try:
        return convert(raw)
    except ValueError as exc:
        raise UsageError(f"environment variable {var}={raw!r} is invalid: {exc}") from exc


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def boolean(raw: str) -> bool:
    """An environment variable's on/off value; anything else is refused (with env_default, a
    one-line error), so a typo does not silently mean false."""
    value = raw.strip().lower()
    if value not in TRUE_WORDS + FALSE_WORDS:
        raise ValueError("use true or false")
    return value in TRUE_WORDS


def check_port(flag: str, port: int | None, *, allow_zero: bool = True) -> None:
    """A one-line error for a port outside 0-65535 (0 = pick a free one)."""
    if port is None:
        return
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise UsageError(f"{flag} {port} is out of range; use a port between {low} and 65535")


def check_at_least(flag: str, value: float, minimum: float) -> None:
    """A one-line error for a count or duration below ``minimum``."""
    if value < minimum:
        bound = "0 or more" if minimum == 0 else f"at least {minimum}"
        raise UsageError(f"{flag} must be {bound} (got {value})")


def check_positive(flag: str, value: float) -> None:
    if value <= 0:
        raise UsageError(f"{flag} must be greater than 0 (got {value})")


def check_admin_token(token: str | None) -> None:
    """A token a client can send back as ``Authorization: Bearer TOKEN``: printable ASCII, no spaces
    (a secret file's trailing newline would otherwise make every request 401)."""
    if token is None:
        return
    if not token.strip():
        raise UsageError(
            "--system-admin-token is blank; give a secret (or set DYN_SYSTEM_ADMIN_TOKEN) or leave it unset"
        )
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        raise UsageError(
            "--system-admin-token / DYN_SYSTEM_ADMIN_TOKEN must be printable ASCII without spaces "
            "or newlines (it is sent as Authorization: Bearer TOKEN)"
        )


def _nats_hosts(nats_url: str) -> list[str]:
    from urllib.parse import urlsplit

    hosts = []
    for url in nats_url.split(","):
        url = url.strip()
        hosts.append(urlsplit(url if "://" in url else f"nats://{url}").hostname or "")
    return hosts


def check_advertise(o: Any) -> None:
    """A worker that would publish a TCP address other hosts cannot reach while its deployment spans
    hosts (NATS is not on loopback) fails at start with one line naming the flag."""
    from dynamo_worker.core.tcp_plane import WILDCARDS

    advertise = o.tcp_rpc_advertise_host
    if advertise is not None and (not advertise.strip() or advertise in WILDCARDS):
        raise UsageError(
            f"--tcp-rpc-advertise-host {advertise!r} is no address callers can reach; give this "
            "host's address (or name) as other hosts see it"
        )
    if o.request_plane != "tcp":
        return
    remote_nats = not all(request_plane_auth.is_loopback(h) for h in _nats_hosts(o.nats_url))
    published = advertise or (None if o.tcp_rpc_host in WILDCARDS else o.tcp_rpc_host)
    if remote_nats and published is not None and request_plane_auth.is_loopback(published):
        flag = "--tcp-rpc-advertise-host" if advertise else "--tcp-rpc-host"
        raise UsageError(
            f"{flag} {published}: the worker would publish a loopback address while NATS "
            f"({o.nats_url}) is reached over the network, so callers on other hosts could not reach "
            "it; bind --tcp-rpc-host 0.0.0.0 (this host's address on the NATS connection is published) "
            "or pass --tcp-rpc-advertise-host ADDRESS"
        )


class CoreOptions:
    """Runtime, status-server and shutdown options every role process has."""

    @hookimpl(tryfirst=True)  # core options come first in --help, whatever the role
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("runtime (every role)")
        g.add_argument(
            "--namespace",
            default=env_default("DYN_NAMESPACE", DEFAULT_NAMESPACE),
            help="namespace of this deployment; roles only see peers in the same one "
            "(env DYN_NAMESPACE; default %(default)s)",
        )
        g.add_argument(
            "--nats-url",
            default=env_default("NATS_SERVER", DEFAULT_NATS_URL),
            help="NATS server URL, comma-separated for a cluster: the first that answers is used (list this "
            "host's own server first), the others when it dies (env NATS_SERVER; default %(default)s)",
        )
        g.add_argument(
            "--nats-randomize",
            action="store_true",
            default=env_default("DYN_NATS_RANDOMIZE", False, boolean),
            help="try the --nats-url servers in random order, to spread clients that all pass the same list "
            "(env DYN_NATS_RANDOMIZE=true)",
        )
        g.add_argument(
            "--discovery-replicas",
            type=int,
            default=env_default("DYN_DISCOVERY_REPLICAS", 1, int),
            metavar="N",
            help="replicas of the discovery bucket (JetStream KV), at most the cluster's servers; with 3 the "
            "live view survives one server down or cut off; above 1 it is kept on disk (env "
            "DYN_DISCOVERY_REPLICAS; default %(default)s: one nats-server)",
        )
        g.add_argument(
            "--nats-connect-timeout",
            type=float,
            default=5.0,
            metavar="SECONDS",
            help="give up start-up if NATS is unreachable this long (default %(default)s)",
        )
        nats_auth.add_arguments(g)
        g.add_argument(
            "--request-plane",
            choices=["tcp", "nats"],
            default=env_default("DYN_REQUEST_PLANE", "nats"),
            help="how requests and their responses travel: through NATS, or straight to the worker "
            "over TCP (faster: docs/performance.md); a tcp worker answers on both "
            "(env DYN_REQUEST_PLANE; default %(default)s)",
        )
        g.add_argument(
            "--tcp-rpc-host",
            default=env_default("DYN_TCP_RPC_HOST", "127.0.0.1"),
            metavar="HOST",
            help="address a worker's TCP request-plane listener binds; beyond loopback it needs the "
            "deployment's secret, --request-plane-token or --nats-token (env DYN_TCP_RPC_HOST; "
            "default %(default)s)",
        )
        g.add_argument(
            "--tcp-rpc-advertise-host",
            default=env_default("DYN_TCP_RPC_ADVERTISE_HOST", None),
            metavar="HOST",
            help="address other processes reach that listener at, published in discovery (default: "
            "--tcp-rpc-host; for a wildcard such as 0.0.0.0, this host's address on its NATS connection) "
            "(env DYN_TCP_RPC_ADVERTISE_HOST)",
        )
        g.add_argument(
            "--tcp-rpc-port",
            type=int,
            default=env_default("DYN_TCP_RPC_PORT", 0, int),
            metavar="PORT",
            help="port of that listener, 0 for any free one (env DYN_TCP_RPC_PORT; default %(default)s)",
        )
        request_plane_auth.add_arguments(g)
        g.add_argument(
            "--tcp-max-connections",
            type=int,
            default=env_default("DYN_TCP_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS, int),
            metavar="N",
            help="connections the TCP listener holds at once; more are closed at once "
            "(env DYN_TCP_MAX_CONNECTIONS; default %(default)s)",
        )
        g.add_argument(
            "--tcp-read-timeout",
            type=float,
            default=env_default("DYN_TCP_READ_TIMEOUT", DEFAULT_READ_TIMEOUT, float),
            metavar="SECONDS",
            help="a TCP connection's handshake, and each message once begun, must arrive within this "
            "long, or the connection is closed (env DYN_TCP_READ_TIMEOUT; default %(default)s)",
        )
        g.add_argument(
            "--tcp-idle-timeout",
            type=float,
            default=env_default("DYN_TCP_IDLE_TIMEOUT", DEFAULT_IDLE_TIMEOUT, float),
            metavar="SECONDS",
            help="close a TCP connection with no request in flight after this long without traffic "
            "(env DYN_TCP_IDLE_TIMEOUT; default %(default)s)",
        )
        g.add_argument(
            "--lease-ttl",
            type=int,
            default=env_default("DYN_LEASE_TTL", 3, int),
            metavar="SECONDS",
            help="a dead process leaves discovery this many seconds after its last keep-alive "
            "(env DYN_LEASE_TTL; default %(default)s)",
        )
        g.add_argument(
            "--graceful-shutdown-timeout",
            type=float,
            default=30.0,
            metavar="SECONDS",
            help="on SIGTERM/SIGINT, wait this long for in-flight requests (default %(default)s)",
        )
        g.add_argument(
            "--shutdown-cleanup-timeout",
            type=float,
            default=env_default("DYN_SHUTDOWN_CLEANUP_TIMEOUT", 30.0, float),
            metavar="SECONDS",
            help="after the drain, the rest of shutdown (engine stop, connections) gets this long, then the "
            "process logs every thread's stack and exits 1 (env DYN_SHUTDOWN_CLEANUP_TIMEOUT; default %(default)s)",
        )
        g.add_argument(
            "--engine-check-interval",
            type=float,
            default=2.0,
            metavar="SECONDS",
            help="how often the engine monitor checks the engine (default %(default)s)",
        )
        g.add_argument(
            "--health-check-idle",
            type=float,
            default=env_default("DYN_CANARY_WAIT_TIME", 10.0, float),
            metavar="SECONDS",
            help="send the role's health payload through its generate endpoint after this long "
            "without requests; a failure makes /health 503 (env DYN_CANARY_WAIT_TIME; default %(default)s)",
        )
        g.add_argument(
            "--health-check-timeout",
            type=float,
            default=env_default("DYN_HEALTH_CHECK_REQUEST_TIMEOUT", 3.0, float),
            metavar="SECONDS",
            help="a health canary slower than this fails (env DYN_HEALTH_CHECK_REQUEST_TIMEOUT; default %(default)s)",
        )
        g.add_argument(
            "--no-health-check",
            dest="health_check",
            action="store_false",
            default=env_default("DYN_HEALTH_CHECK_ENABLED", True, lambda v: v.lower() not in ("0", "false", "no")),
            help="send no health canaries (env DYN_HEALTH_CHECK_ENABLED=false)",
        )
        g.add_argument(
            "--system-port",
            type=int,
            default=env_default("DYN_SYSTEM_PORT", None, int),
            help="serve /live, /health and /metrics on this port (env DYN_SYSTEM_PORT; off by default)",
        )
        g.add_argument(
            "--system-host",
            default="127.0.0.1",
            help="address the system status server binds; beyond loopback, routes that change the worker "
            "(POST /engine/sleep, ...) need --system-admin-token (default %(default)s)",
        )
        g.add_argument(
            "--system-admin-token",
            default=env_default("DYN_SYSTEM_ADMIN_TOKEN", None),
            metavar="TOKEN",
            help="status-server routes that change the worker (POST /engine/sleep, /engine/wake_up, ...) need "
            "Authorization: Bearer TOKEN; without one they answer 403 when --system-host is not loopback "
            "(env DYN_SYSTEM_ADMIN_TOKEN, preferred: a flag is visible in ps)",
        )
        g.add_argument(
            "--dump-config-to",
            default=env_default("DYN_DUMP_CONFIG_TO", None),
            metavar="PATH",
            help="write the resolved configuration as JSON to PATH at start-up (env DYN_DUMP_CONFIG_TO)",
        )
        g.add_argument(
            "--log-level",
            default=env_default("DYN_LOG", "info"),
            choices=["debug", "info", "warning", "error"],
            help="log level (env DYN_LOG; default %(default)s)",
        )

    @hookimpl
    def dynamo_worker_configure(self, ctx: Any) -> None:
        o = ctx.options
        check_port("--system-port", o.system_port)
        check_admin_token(o.system_admin_token)
        check_port("--tcp-rpc-port", o.tcp_rpc_port)
        if o.request_plane not in ("tcp", "nats"):  # from DYN_REQUEST_PLANE: argparse checks only the flag
            raise UsageError(f"--request-plane / DYN_REQUEST_PLANE {o.request_plane!r} is invalid; use tcp or nats")
        check_at_least("--tcp-max-connections", o.tcp_max_connections, 1)
        check_positive("--tcp-read-timeout", o.tcp_read_timeout)
        check_positive("--tcp-idle-timeout", o.tcp_idle_timeout)
        check_positive("--lease-ttl", o.lease_ttl)
        check_at_least("--discovery-replicas", o.discovery_replicas, 1)
        if o.discovery_replicas > 5:  # JetStream's own limit
            raise UsageError(f"--discovery-replicas {o.discovery_replicas}: JetStream allows at most 5 replicas")
        check_positive("--graceful-shutdown-timeout", o.graceful_shutdown_timeout)
        check_positive("--shutdown-cleanup-timeout", o.shutdown_cleanup_timeout)
        check_positive("--engine-check-interval", o.engine_check_interval)
        check_positive("--nats-connect-timeout", o.nats_connect_timeout)
        check_positive("--health-check-idle", o.health_check_idle)
        check_positive("--health-check-timeout", o.health_check_timeout)
        nats_auth.check(o)
        request_plane_auth.check(o)
        # A role that accepts pass-through flags (decode: vLLM's engine arguments) takes them
        # out of extra_args in its own configure, which runs before this one.
        if getattr(o, "extra_args", None):
            raise UsageError(
                f"unrecognized arguments: {' '.join(o.extra_args)}; see dynamo-worker --role {ctx.role.name} --help"
            )
        if not o.namespace.replace("-", "").replace("_", "").isalnum():
            raise UsageError(f"--namespace {o.namespace!r} is invalid; use letters, digits, '-' and '_' only")
