"""Who may use the TCP request plane: only processes that hold the deployment's secret.

A worker's TCP listener serves ``generate``, ``load_lora``, ``clear_kv_blocks``, the processor...
to whoever connects, bypassing NATS's credentials and the frontend's API key and limits. So
every connection starts with a challenge-response handshake (:mod:`.wire` ``Hello``/``Auth``/
``Welcome``) over a shared secret, and nothing else is read before it succeeds:

1. the worker sends a random nonce;
2. the caller answers with its own nonce and HMAC-SHA256(secret, "caller", both nonces);
3. the worker checks it (constant time) and answers HMAC-SHA256(secret, "worker", both nonces),
   so the caller knows it talks to the deployment too before it sends a request.

The secret never crosses the wire, and a recorded handshake cannot be replayed (fresh nonces).

Where the secret comes from, first match wins:

* ``--request-plane-token`` / ``DYN_REQUEST_PLANE_TOKEN`` (``up`` generates one);
* derived from ``--nats-token`` / ``NATS_AUTH_TOKEN``: every process of a token-protected
  deployment already shares it (a one-way derivation, so the TCP secret does not reveal it);
* none: allowed only while the listener binds a loopback address and NATS has no credentials (a
  deployment with no secret anywhere, on one host); the worker says so once in its log.

NATS users, passwords and JWT credentials are per-user, not shared, so no secret is derived from
them: with those, the TCP plane needs ``--request-plane-token``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import secrets
from typing import Any

from dynamo_worker.core.errors import UsageError

NONCE_BYTES = 16
#: What the derivation from the NATS token mixes in, so the result is this plane's alone.
_DERIVATION_LABEL = b"dynamo-worker tcp request plane v1\0"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    from dynamo_worker.core.options import env_default

    group.add_argument(
        "--request-plane-token",
        default=env_default("DYN_REQUEST_PLANE_TOKEN", None),
        metavar="TOKEN",
        help="the deployment's secret for the TCP request plane: every connection proves it before its "
        "first call (default: derived from --nats-token; env DYN_REQUEST_PLANE_TOKEN, preferred: a flag "
        "is visible in ps)",
    )


def secret_from(options: Any) -> bytes | None:
    """The TCP plane's secret for these options, or None when the deployment has none."""
    if options.request_plane_token:
        return str(options.request_plane_token).encode()
    if options.nats_token:
        return hashlib.sha256(_DERIVATION_LABEL + str(options.nats_token).encode()).digest()
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: assume it is reachable from elsewhere
        return False


def check(options: Any) -> None:
    """One-line :class:`UsageError` for a TCP plane that would serve (or call) without a secret
    where one is needed."""
    if options.request_plane_token is not None and not str(options.request_plane_token).strip():
        raise UsageError(
            "--request-plane-token is blank; give a secret (or set DYN_REQUEST_PLANE_TOKEN) or leave it unset"
        )
    if options.request_plane != "tcp" or secret_from(options) is not None:
        return
    if options.nats_user or options.nats_creds:
        raise UsageError(
            "--request-plane tcp with NATS user credentials needs a shared secret for the TCP plane: "
            "set DYN_REQUEST_PLANE_TOKEN (or --request-plane-token) to the same value in every "
            "process of the deployment"
        )
    if not is_loopback(options.tcp_rpc_host):
        raise UsageError(
            f"--tcp-rpc-host {options.tcp_rpc_host}: a TCP request plane reachable from other "
            "hosts needs a secret; set DYN_REQUEST_PLANE_TOKEN (or --request-plane-token, or "
            "--nats-token) to the same value in every process of the deployment"
        )


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def _proof(secret: bytes, side: bytes, worker_nonce: str, caller_nonce: str) -> str:
    message = side + b"\0" + worker_nonce.encode() + b"\0" + caller_nonce.encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def caller_proof(secret: bytes, worker_nonce: str, caller_nonce: str) -> str:
    return _proof(secret, b"caller", worker_nonce, caller_nonce)


def worker_proof(secret: bytes, worker_nonce: str, caller_nonce: str) -> str:
    return _proof(secret, b"worker", worker_nonce, caller_nonce)


def matches(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())
