"""NATS credentials and TLS for every role: the flags, their checks, and nats-py's connect options.

A production NATS cluster asks clients to authenticate (a token, a user and password, or a
JWT ``.creds`` file) and often to speak TLS. The flags below map one to one onto
``nats.connect()`` options; the secrets are read from the environment by default so they stay
off command lines (``ps`` shows those to every user of the host). The environment names are
Dynamo's runtime names (``NATS_AUTH_*``), so a Dynamo deployment's settings carry over.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import ssl
from pathlib import Path
from typing import Any

from dynamo_worker.core.errors import UsageError


def add_arguments(group: argparse._ArgumentGroup) -> None:
    """Add the credential and TLS flags to the core's runtime group."""
    from dynamo_worker.core.options import env_default

    group.add_argument(
        "--nats-token",
        default=env_default("NATS_AUTH_TOKEN", None),
        metavar="TOKEN",
        help="authenticate to NATS with this token (env NATS_AUTH_TOKEN; prefer the variable: a flag is visible in ps)",
    )
    group.add_argument(
        "--nats-user",
        default=env_default("NATS_AUTH_USERNAME", None),
        metavar="USER",
        help="authenticate to NATS as USER, with --nats-password (env NATS_AUTH_USERNAME)",
    )
    group.add_argument(
        "--nats-password",
        default=env_default("NATS_AUTH_PASSWORD", None),
        metavar="PASSWORD",
        help="the password for --nats-user (env NATS_AUTH_PASSWORD)",
    )
    group.add_argument(
        "--nats-creds",
        default=env_default("NATS_AUTH_CREDENTIALS_FILE", None),
        metavar="FILE",
        help="authenticate to NATS with a JWT user credentials file (.creds, from nsc) "
        "(env NATS_AUTH_CREDENTIALS_FILE)",
    )
    group.add_argument(
        "--nats-tls-ca",
        default=env_default("DYN_NATS_TLS_CA", None),
        metavar="FILE",
        help="verify the NATS server's TLS certificate against this CA bundle; turns TLS on (env DYN_NATS_TLS_CA)",
    )
    group.add_argument(
        "--nats-tls-cert",
        default=env_default("DYN_NATS_TLS_CERT", None),
        metavar="FILE",
        help="client certificate for TLS client authentication, with --nats-tls-key (env DYN_NATS_TLS_CERT)",
    )
    group.add_argument(
        "--nats-tls-key",
        default=env_default("DYN_NATS_TLS_KEY", None),
        metavar="FILE",
        help="private key of --nats-tls-cert (env DYN_NATS_TLS_KEY)",
    )


def check(options: Any) -> None:
    """One-line :class:`UsageError` for a combination nats-py would reject or silently ignore."""
    token, user, password, creds = options.nats_token, options.nats_user, options.nats_password, options.nats_creds
    if user and not password:
        raise UsageError("--nats-user needs --nats-password (or NATS_AUTH_PASSWORD)")
    if password and not user:
        raise UsageError("--nats-password needs --nats-user (or NATS_AUTH_USERNAME)")
    chosen = [
        name for name, value in (("--nats-token", token), ("--nats-user", user), ("--nats-creds", creds)) if value
    ]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} are exclusive; authenticate to NATS one way")
    if creds and importlib.util.find_spec("nkeys") is None:
        raise UsageError("--nats-creds needs the nkeys package to sign with the seed: pip install 'nats-py[nkeys]'")
    if bool(options.nats_tls_cert) != bool(options.nats_tls_key):
        raise UsageError("--nats-tls-cert and --nats-tls-key go together; give both or neither")
    for flag, path in (
        ("--nats-creds", creds),
        ("--nats-tls-ca", options.nats_tls_ca),
        ("--nats-tls-cert", options.nats_tls_cert),
        ("--nats-tls-key", options.nats_tls_key),
    ):
        if path and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    if options.nats_tls_ca or options.nats_tls_cert:
        try:
            tls_context(options)
        except (ssl.SSLError, OSError) as exc:
            raise UsageError(
                f"the NATS TLS files do not load ({exc}); check --nats-tls-ca, --nats-tls-cert and --nats-tls-key"
            ) from exc


def tls_context(options: Any) -> ssl.SSLContext | None:
    """A client TLS context verifying the server (and presenting a client certificate if given)."""
    if not (options.nats_tls_ca or options.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=options.nats_tls_ca or None)
    if options.nats_tls_cert:
        ctx.load_cert_chain(options.nats_tls_cert, options.nats_tls_key)
    return ctx


def connect_options(options: Any) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect()`` (through :meth:`Runtime.connect`)."""
    kwargs: dict[str, Any] = {}
    if options.nats_token:
        kwargs["token"] = options.nats_token
    if options.nats_user:
        kwargs["user"] = options.nats_user
        kwargs["password"] = options.nats_password
    if options.nats_creds:
        kwargs["user_credentials"] = options.nats_creds
    tls = tls_context(options)
    if tls is not None:
        kwargs["tls"] = tls
    return kwargs


#: Our own secret options, redacted whatever the name rule below says.
SECRET_OPTIONS = ("nats_token", "nats_password", "api_key", "request_plane_token", "system_admin_token")
#: A name with one of these as a whole part (``hf_token``, ``apiKey``, ``aws_secret_access_key``)
#: holds a secret; ``max_num_batched_tokens``, ``tokenizer``, ``kv_cache_dtype`` do not.
SECRET_WORDS = frozenset(
    {
        "token",
        "key",
        "keys",
        "apikey",
        "secret",
        "secrets",
        "password",
        "passwords",
        "passwd",
        "passphrase",
        "credential",
        "credentials",
        "auth",
        "authorization",
    }
)
#: Found secrets this long are also searched for in every other string (a repr, a URL); shorter
#: ones would blank innocent text.
SCRUB_MIN_LENGTH = 8
_NAME_PARTS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")
_URL_QUERY = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def is_secret_name(name: str) -> bool:
    """Whether an option or field called ``name`` holds a secret (by its whole name parts)."""
    return name in SECRET_OPTIONS or any(part.lower() in SECRET_WORDS for part in _NAME_PARTS.findall(name))


def without_secrets(config: Any) -> Any:
    """``config`` (options, vLLM's engine arguments, nested dicts and lists) for a config dump.

    A non-empty string (or list of them) under a secret-like name becomes ``"***"``, at any
    depth; so does every string inside a dict or list under such a name. Numbers and booleans
    stay (``hf_token: true`` means "the stored login"; ``long_prefill_token_threshold`` counts
    tokens). In every string, a URL's ``user:password@`` (or ``token@``) and secret-named query
    parameters are hidden, and any secret found by name is blanked wherever else it appears.
    Other objects become their ``str()``.
    """
    found: set[str] = set()
    out = _redact(config, found, secret=False)
    scrub = sorted((s for s in found if len(s) >= SCRUB_MIN_LENGTH), key=len, reverse=True)
    return _scrub(out, scrub) if scrub else out


def _redact(value: Any, found: set[str], *, secret: bool) -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, found, secret=secret or is_secret_name(str(k))) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_redact(v, found, secret=secret) for v in value]
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    if secret and text:
        found.add(text)
        return "***"
    return _redact_urls(text)


def _redact_urls(text: str) -> str:
    if "://" not in text:
        return text
    text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _URL_QUERY.sub(
        lambda m: f"{m['sep']}{m['name']}=***" if is_secret_name(m["name"]) and m["value"] else m[0], text
    )


def _scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets) for v in value]
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "***")
    return value


def redact(url: str) -> str:
    """``url`` with any ``user:password@`` or ``token@`` part hidden, for logs and errors."""
    parts = []
    for one in url.split(","):
        scheme, sep, rest = one.strip().rpartition("://")
        if "@" in rest:
            rest = "***@" + rest.rpartition("@")[2]
        parts.append(f"{scheme}{sep}{rest}")
    return ",".join(parts)
