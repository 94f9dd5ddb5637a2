"""Dynamo's flags that this project accepts so Dynamo launch scripts run unchanged.

Each flag here is one Dynamo deployments pass and that has no counterpart in this design, or
whose job is done elsewhere here. It is accepted with Dynamo's values and environment
variable, a value Dynamo refuses is refused the same way, and a flag that changes nothing
here logs exactly one warning line at start-up saying what happens instead (docs/roles.md,
"Dynamo's flags"). Flags we implement live with their role (``--is-decode-worker``, a
list-valued ``--connector``: :mod:`dynamo_worker.engine.kv_transfer`).

Two groups: runtime flags every Dynamo component takes (:class:`DynamoRuntimeFlags`, a core
plugin, so the frontend takes them too) and the vLLM worker's own (:func:`add_worker_arguments`,
added by the roles that serve a vLLM engine).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.hookspecs import hookimpl

STORE_KV_CHOICES = ("etcd", "file", "mem")
EVENT_PLANE_CHOICES = ("nats", "zmq")
SLEEP_LEVEL_CHOICES = (1, 2, 3)
ENDPOINT_TYPES = ("chat", "completions")  # what Dynamo's vLLM worker registers


def _env_choice(var: str, flag: str, choices: tuple[str, ...]) -> str | None:
    """A flag's default from Dynamo's environment variable; a value Dynamo refuses is refused."""
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    if raw not in choices:
        raise UsageError(f"{flag} / {var} {raw!r} is invalid; use one of {', '.join(choices)}")
    return raw


def _env_bool(var: str) -> bool | None:
    raw = os.environ.get(var, "").strip().lower()
    return None if not raw else raw == "true"  # Dynamo's test: only "true" turns it on


def _env_int(var: str, flag: str) -> int | None:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError as exc:
        raise UsageError(f"{flag} / {var} {raw!r} is not an integer") from exc


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Dynamo compatibility (accepted so Dynamo launch scripts run; see docs/roles.md)")
    g.add_argument(
        "--store-kv",
        choices=STORE_KV_CHOICES,
        default=_env_choice("DYN_STORE_KV", "--store-kv", STORE_KV_CHOICES),
        help="Dynamo's discovery store; ignored: discovery is NATS JetStream KV on --nats-url (env DYN_STORE_KV)",
    )
    g.add_argument(
        "--event-plane",
        choices=EVENT_PLANE_CHOICES,
        default=_env_choice("DYN_EVENT_PLANE", "--event-plane", EVENT_PLANE_CHOICES),
        help="Dynamo's event transport; events always travel over NATS here, so zmq is "
        "accepted with a warning (env DYN_EVENT_PLANE)",
    )
    g.add_argument(
        "--durable-kv-events",
        action="store_true",
        default=_env_bool("DYN_DURABLE_KV_EVENTS"),
        help="Dynamo's JetStream KV events (deprecated there); ignored: KV events are NATS "
        "core messages and a router that misses some re-reads the worker's kv_blocks "
        "(env DYN_DURABLE_KV_EVENTS=true)",
    )


def runtime_warnings(o: argparse.Namespace) -> list[str]:
    """One line per Dynamo runtime flag given that changes nothing here."""
    out = []
    if o.store_kv is not None:
        out.append(
            f"--store-kv {o.store_kv} is ignored: discovery is the NATS JetStream KV bucket on "
            "--nats-url (no etcd, file or memory store)"
        )
    if o.event_plane == "zmq":
        out.append("--event-plane zmq is ignored: events (load metrics, KV events) travel over NATS here")
    if o.durable_kv_events:
        out.append(
            "--durable-kv-events is ignored: KV events are NATS core messages (at most once); a router "
            "that misses events re-reads the worker's kv_blocks endpoint instead of a JetStream replay"
        )
    return out


def add_worker_arguments(group: Any) -> None:
    """Flags of Dynamo's vLLM worker (``python -m dynamo.vllm``) we accept on the vLLM roles."""
    group.add_argument(
        "--migration-limit",
        type=int,
        default=_env_int("DYN_MIGRATION_LIMIT", "--migration-limit"),
        metavar="N",
        help="Dynamo's per-worker migration limit; here the frontend's --migration-limit "
        "decides, so on a worker it only warns (env DYN_MIGRATION_LIMIT)",
    )
    group.add_argument(
        "--sleep-mode-level",
        type=int,
        choices=SLEEP_LEVEL_CHOICES,
        default=None,
        help="Dynamo's sleep level flag; POST /engine/sleep takes the level in its body, as "
        "Dynamo's does, so this only warns",
    )
    group.add_argument(
        "--use-vllm-tokenizer",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("DYN_VLLM_USE_TOKENIZER"),
        help="Dynamo's text-in/text-out mode; here workers take tokens and the frontend "
        "tokenizes with the model's own tokenizer, so this only warns "
        "(env DYN_VLLM_USE_TOKENIZER)",
    )
    group.add_argument(
        "--endpoint-types",
        default=os.environ.get("DYN_ENDPOINT_TYPES") or None,
        metavar="TYPES",
        help="Dynamo's served API list (chat,completions); the frontend serves both for every "
        "model, so this only warns when it names fewer (env DYN_ENDPOINT_TYPES)",
    )


def _endpoint_types(raw: str) -> list[str]:
    """Dynamo's rules: a comma-separated list of chat and completions, or ``none`` alone."""
    types = [t.strip() for t in raw.split(",") if t.strip()]
    if types == ["none"]:
        return types
    unknown = [t for t in types if t not in ENDPOINT_TYPES]
    if not types or unknown:
        shown = ", ".join(unknown) or repr(raw)
        raise UsageError(
            f"--endpoint-types {shown}: unknown endpoint type; use a comma-separated list of "
            f"{', '.join(ENDPOINT_TYPES)}, or none alone"
        )
    return types


def worker_warnings(o: argparse.Namespace) -> list[str]:
    """One line per Dynamo worker flag given that changes nothing here; a bad value is a UsageError."""
    out = []
    if o.migration_limit is not None:
        if o.migration_limit < 0:
            raise UsageError(f"--migration-limit must be 0 or more (got {o.migration_limit})")
        out.append(
            f"--migration-limit {o.migration_limit} on a worker is ignored: the frontend's "
            "--migration-limit decides how often a stream moves to another worker; pass it there"
        )
    if o.sleep_mode_level is not None:
        out.append(
            f"--sleep-mode-level {o.sleep_mode_level} is ignored: POST /engine/sleep takes the level in "
            'its body ({"level": N}, default 1), as Dynamo\'s does'
        )
    if o.use_vllm_tokenizer:
        out.append(
            "--use-vllm-tokenizer is ignored: the worker takes token ids and the frontend tokenizes and "
            "detokenizes with the model's own tokenizer (the one vLLM would load)"
        )
    if o.endpoint_types is not None:
        types = _endpoint_types(o.endpoint_types)
        if types == ["none"]:
            out.append(
                "--endpoint-types none is ignored: the frontend serves every worker's model on "
                "/v1/chat/completions and /v1/completions"
            )
        elif set(types) != set(ENDPOINT_TYPES):
            out.append(
                f"--endpoint-types {o.endpoint_types} is ignored: the frontend serves both "
                "/v1/chat/completions and /v1/completions for every model"
            )
    return out


class DynamoRuntimeFlags:
    """Core plugin: Dynamo's runtime flags on every role, each warned about once at configure."""

    @hookimpl(trylast=True)  # after the core's own groups in --help
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_runtime_arguments(parser)

    @hookimpl
    def dynamo_worker_configure(self, ctx: Any) -> None:
        for line in runtime_warnings(ctx.options):
            ctx.log.warning("%s", line)
