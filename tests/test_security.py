"""Safe defaults: NATS credentials and TLS on every role, the frontend's API key, nothing unpickled.

Real nats-servers configured for a token, a user and password, JWT accounts (a .creds file)
and mutual TLS (certificates generated here with ``cryptography``); the echo role (no engine)
as the worker.
"""

from __future__ import annotations

import ast
import datetime
import ipaddress
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest

from dynamo_worker.core import nats_auth
from dynamo_worker.core.runtime import Runtime
from tests.helpers import WorkerProcess, free_port, nats_server_binary, run_cli, wait_until, worker_env

ROOT = Path(__file__).resolve().parent.parent


class ConfiguredNats:
    """A nats-server started with extra arguments (authentication, TLS)."""

    def __init__(self, *args: str, port: int | None = None, argv: list[str] | None = None) -> None:
        self.port = port or free_port()
        argv = argv or ["-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", tempfile.mkdtemp(prefix="dw-nats-")]
        self.proc = subprocess.Popen(
            [nats_server_binary(), *argv, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        wait_until(self._listening, 10, what="nats-server to listen")

    @classmethod
    def with_config(cls, config: Path, port: int) -> ConfiguredNats:
        return cls(port=port, argv=["-c", str(config)])

    def _listening(self) -> bool:
        import socket

        assert self.proc.poll() is None, self.proc.stderr.read().decode() if self.proc.stderr else ""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def echo_worker(url: str, namespace: str, *args: str, **env: str) -> WorkerProcess:
    return WorkerProcess(["--role", "echo", "--nats-url", url, "--namespace", namespace, *args], env=worker_env(**env))


async def echo_round_trip(url: str, namespace: str, **nats_options: object) -> list[int]:
    caller = await Runtime.connect(url, namespace, **nats_options)
    try:
        client = caller.client("echo", "generate")
        await client.wait_for_instances(10)
        return [x["token_ids"][0] async for x in client.generate({"token_ids": [3, 1, 4]})]
    finally:
        await caller.close()


async def test_a_token_protected_nats_is_used_with_nats_auth_token(namespace: str) -> None:
    nats = ConfiguredNats("--auth", "s3cret-token")
    worker = echo_worker(nats.url, namespace, NATS_AUTH_TOKEN="s3cret-token")
    try:
        worker.wait_for_log("serving")
        assert await echo_round_trip(nats.url, namespace, token="s3cret-token") == [3, 1, 4]
        # Without the token: one line naming the server and the credential flags, exit non-zero.
        refused = run_cli("--role", "echo", "--nats-url", nats.url, "--nats-connect-timeout", "3")
        assert refused.returncode != 0
        assert "cannot reach the NATS server" in refused.stderr and "--nats-token" in refused.stderr
        assert "Traceback" not in refused.stderr
    finally:
        worker.stop()
        nats.stop()
    assert "s3cret-token" not in worker.log()


async def test_a_user_and_password_protected_nats_is_used_with_the_flags(namespace: str) -> None:
    nats = ConfiguredNats("--user", "dyn", "--pass", "pw-123")
    worker = echo_worker(nats.url, namespace, "--nats-user", "dyn", NATS_AUTH_PASSWORD="pw-123")
    try:
        worker.wait_for_log("serving")
        assert await echo_round_trip(nats.url, namespace, user="dyn", password="pw-123") == [3, 1, 4]
        wrong = run_cli(
            "--role",
            "echo",
            "--nats-url",
            nats.url,
            "--nats-user",
            "dyn",
            "--nats-password",
            "no",
            "--nats-connect-timeout",
            "3",
        )
        assert wrong.returncode != 0 and "cannot reach the NATS server" in wrong.stderr
    finally:
        worker.stop()
        nats.stop()


def _certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def build(
        subject: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name | None,
        issuer_key: ec.EllipticCurvePrivateKey,
        ca: bool,
        usage: x509.ObjectIdentifier | None,
    ) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                ),
                critical=False,
            )
        return b.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("dw-test-ca", ca_key, None, ca_key, True, None)
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(f"dw-test-{who}", key, ca.subject, ca_key, False, usage)
        paths[f"{who}-cert"] = directory / f"{who}.pem"
        paths[f"{who}-key"] = directory / f"{who}.key"
        paths[f"{who}-cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{who}-key"].write_bytes(key_pem(key))
    return paths


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _certificates(tmp_path_factory.mktemp("certs"))


async def test_a_mutual_tls_nats_is_used_with_the_tls_flags(namespace: str, certs: dict[str, Path]) -> None:
    nats = ConfiguredNats(
        "--tlsverify",
        "--tlscert",
        str(certs["server-cert"]),
        "--tlskey",
        str(certs["server-key"]),
        "--tlscacert",
        str(certs["ca"]),
    )
    worker = echo_worker(
        nats.url,
        namespace,
        "--nats-tls-ca",
        str(certs["ca"]),
        DYN_NATS_TLS_CERT=str(certs["client-cert"]),
        DYN_NATS_TLS_KEY=str(certs["client-key"]),
    )
    try:
        worker.wait_for_log("serving")
        tls = nats_auth.tls_context(
            SimpleNamespace(
                nats_tls_ca=str(certs["ca"]),
                nats_tls_cert=str(certs["client-cert"]),
                nats_tls_key=str(certs["client-key"]),
            )
        )
        assert await echo_round_trip(nats.url, namespace, tls=tls) == [3, 1, 4]
        # Without a client certificate the server refuses the connection.
        refused = run_cli(
            "--role", "echo", "--nats-url", nats.url, "--nats-tls-ca", str(certs["ca"]), "--nats-connect-timeout", "3"
        )
        assert refused.returncode != 0 and "cannot reach the NATS server" in refused.stderr
    finally:
        worker.stop()
        nats.stop()


def _operator_mode(directory: Path, port: int) -> Path:
    """A nats-server config in JWT (operator) mode, and a user's .creds file; returns the config.

    What ``nsc`` would write: an operator, a system account, an account with JetStream, and a
    user of it, each an nkey, their JWTs signed by their issuer (ed25519, base64url).
    """
    import base64
    import hashlib
    import json
    import os
    import time

    import nkeys

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def keypair(prefix: int) -> nkeys.KeyPair:
        return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))

    def jwt(issuer: nkeys.KeyPair, subject: nkeys.KeyPair, nats: dict[str, object]) -> str:
        claims = {
            "iat": int(time.time()),
            "iss": issuer.public_key.decode(),
            "name": "test",
            "sub": subject.public_key.decode(),
            "nats": {**nats, "version": 2},
        }
        claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
        signed = f"{b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{b64(json.dumps(claims).encode())}"
        return f"{signed}.{b64(issuer.sign(signed.encode()))}"

    unlimited = {k: -1 for k in ("subs", "data", "payload", "imports", "exports", "conn", "leaf")}
    operator, system, account, user = (
        keypair(p)
        for p in (
            nkeys.PREFIX_BYTE_OPERATOR,
            nkeys.PREFIX_BYTE_ACCOUNT,
            nkeys.PREFIX_BYTE_ACCOUNT,
            nkeys.PREFIX_BYTE_USER,
        )
    )
    accounts = {
        system.public_key.decode(): jwt(operator, system, {"type": "account", "limits": unlimited}),
        account.public_key.decode(): jwt(
            operator,
            account,
            {
                "type": "account",
                "limits": {
                    **unlimited,
                    "wildcards": True,
                    "mem_storage": -1,
                    "disk_storage": -1,
                    "streams": -1,
                    "consumer": -1,
                },
            },
        ),
    }
    preload = ", ".join(f'{k}: "{v}"' for k, v in accounts.items())
    config = directory / "operator.conf"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\njetstream {{ store_dir: "{directory / "js"}" }}\n'
        f'operator: "{jwt(operator, operator, {"type": "operator"})}"\nresolver: MEMORY\n'
        f"system_account: {system.public_key.decode()}\nresolver_preload: {{ {preload} }}\n"
    )
    user_jwt = jwt(account, user, {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    (directory / "user.creds").write_text(
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed.decode()}\n------END USER NKEY SEED------\n"
    )
    return config


async def test_a_jwt_nats_is_used_with_a_creds_file(namespace: str, tmp_path: Path) -> None:
    port = free_port()
    config = _operator_mode(tmp_path, port)
    nats = ConfiguredNats.with_config(config, port)
    creds = str(tmp_path / "user.creds")
    worker = echo_worker(nats.url, namespace, NATS_AUTH_CREDENTIALS_FILE=creds)
    try:
        worker.wait_for_log("serving")  # discovery (JetStream KV) works under the account
        assert await echo_round_trip(nats.url, namespace, user_credentials=creds) == [3, 1, 4]
        refused = run_cli("--role", "echo", "--nats-url", nats.url, "--nats-connect-timeout", "3")
        assert refused.returncode != 0 and "cannot reach the NATS server" in refused.stderr
    finally:
        worker.stop()
        nats.stop()


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--nats-user", "u"], {}, "--nats-user needs --nats-password"),
        (["--nats-password", "p"], {}, "--nats-password needs --nats-user"),
        (
            ["--nats-token", "t", "--nats-user", "u", "--nats-password", "p"],
            {},
            "--nats-token and --nats-user are exclusive",
        ),
        (
            [],
            {"NATS_AUTH_TOKEN": "t", "NATS_AUTH_CREDENTIALS_FILE": "/etc/hostname"},
            "--nats-token and --nats-creds are exclusive",
        ),
        (["--nats-creds", "/no/such.creds"], {}, "--nats-creds /no/such.creds: no such file"),
        (["--nats-tls-cert", "/etc/hostname"], {}, "--nats-tls-cert and --nats-tls-key go together"),
        (["--nats-tls-ca", "/etc/hostname"], {}, "the NATS TLS files do not load"),
    ],
)
def test_nats_credential_mistakes_are_one_line_errors(args: list[str], env: dict[str, str], message: str) -> None:
    out = run_cli("--role", "echo", *args, env=worker_env(**env))
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_secrets_are_not_in_the_config_dump_or_the_logged_url(tmp_path: Path) -> None:
    options = {
        "nats_token": "tok",
        "nats_password": "pw",
        "api_key": "k",
        "nats_user": "u",
        "nats_url": "nats://u:pw@10.0.0.1:4222,nats://tok@10.0.0.2:4222",
    }
    safe = nats_auth.without_secrets(options)
    assert safe == {
        "nats_token": "***",
        "nats_password": "***",
        "api_key": "***",
        "nats_user": "u",
        "nats_url": "nats://***@10.0.0.1:4222,nats://***@10.0.0.2:4222",
    }


def test_the_config_dump_redacts_secret_names_at_any_depth_and_nothing_else() -> None:
    """vLLM's engine arguments and a connector's extra config go through the same redaction as
    our options: whole name parts decide, values that are not secrets stay."""
    hf = "hf_SECRETabcdefghijkl"
    config = {
        "options": {
            "nats_token": "nats-tok-123",
            "request_plane_token": "rp-secret-456",
            "system_admin_token": "adm-secret-789",
            "nats_user": "dyn",
            "nats_password": "",
            "nats_url": "nats://dyn:p@ss@10.0.0.1:4222",
            "api_key": None,
        },
        "engine_args": {
            "hf_token": hf,
            "max_num_batched_tokens": 2048,
            "tokenizer": "/models/tok",
            "skip_tokenizer_init": False,
            "kv_cache_dtype": "auto",
            "enable_prefix_caching": True,
            "long_prefill_token_threshold": 0,
            "tokens_only": False,
            "tokenizer_mode": "auto",
            "otlp_traces_endpoint": "https://collector:4317/v1/traces?api_key=otlp-k&service=dw",
            "hf_overrides": {"author": "someone", "keyboard": "qwerty"},
            "kv_transfer_config": {
                "kv_connector": "LMCacheConnectorV1",
                "kv_connector_extra_config": {
                    "remote_url": "redis://admin:redis-pw-2@cache:6379/0",
                    "accessToken": "at-abc",
                    "AWS_SECRET_ACCESS_KEY": "aws-xyz",
                    "credentials": {"user": "u", "pass": "in-a-secret-dict"},
                    "apiKeys": ["k-one", "k-two"],
                    "chunk_size": 256,
                },
            },
            "model_repr": f"ModelConfig(model='/m', hf_token='{hf}')",  # found by name, scrubbed here
        },
        "hf_token_flag": True,  # "use the stored login": not itself a secret
    }
    safe = nats_auth.without_secrets(config)
    text = str(safe)
    for secret in (
        hf,
        "nats-tok-123",
        "rp-secret-456",
        "adm-secret-789",
        "p@ss",
        "otlp-k",
        "redis-pw-2",
        "at-abc",
        "aws-xyz",
        "in-a-secret-dict",
        "k-one",
        "k-two",
    ):
        assert secret not in text, secret
    o, e = safe["options"], safe["engine_args"]
    assert o["nats_token"] == o["request_plane_token"] == o["system_admin_token"] == "***"
    assert (o["nats_user"], o["nats_password"], o["api_key"]) == ("dyn", "", None)  # nothing to hide
    assert o["nats_url"] == "nats://***@10.0.0.1:4222"
    assert e["hf_token"] == "***" and e["model_repr"] == "ModelConfig(model='/m', hf_token='***')"
    assert e["otlp_traces_endpoint"] == "https://collector:4317/v1/traces?api_key=***&service=dw"
    extra = e["kv_transfer_config"]["kv_connector_extra_config"]
    assert extra == {
        "remote_url": "redis://***@cache:6379/0",
        "accessToken": "***",
        "AWS_SECRET_ACCESS_KEY": "***",
        "credentials": {"user": "***", "pass": "***"},
        "apiKeys": ["***", "***"],
        "chunk_size": 256,
    }
    assert e["kv_transfer_config"]["kv_connector"] == "LMCacheConnectorV1"
    untouched = (
        "max_num_batched_tokens",
        "tokenizer",
        "skip_tokenizer_init",
        "kv_cache_dtype",
        "enable_prefix_caching",
        "long_prefill_token_threshold",
        "tokens_only",
        "tokenizer_mode",
        "hf_overrides",
    )
    assert {k: e[k] for k in untouched} == {k: config["engine_args"][k] for k in untouched}
    assert safe["hf_token_flag"] is True


@pytest.fixture(scope="module")
def keyed_stack(nats_server, demo_model: str) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """A frontend with an API key in front of an echo backend worker."""
    ns = "apikey"
    http_port = free_port()
    worker = echo_worker(nats_server.url, ns, "--echo-model", demo_model)
    frontend = WorkerProcess(
        ["--role", "frontend", "--nats-url", nats_server.url, "--namespace", ns, "--http-port", str(http_port)],
        env=worker_env(VLLM_API_KEY="key-42"),
    )
    try:
        worker.wait_for_log("serving")
        frontend.wait_for_log("frontend listening")
        yield f"http://127.0.0.1:{http_port}"
    finally:
        frontend.stop()
        worker.stop()


def test_the_api_key_is_required_on_v1_routes_only(keyed_stack: str) -> None:
    import urllib.error
    import urllib.request

    anonymous = openai.OpenAI(base_url=f"{keyed_stack}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        anonymous.completions.create(model="echo", prompt="hello", max_tokens=3)
    assert (err.value.status_code, err.value.type, err.value.body["code"]) == (401, "UnauthorizedError", 401)
    with pytest.raises(urllib.error.HTTPError) as no_header:
        urllib.request.urlopen(f"{keyed_stack}/v1/models")
    assert no_header.value.code == 401
    client = openai.OpenAI(base_url=f"{keyed_stack}/v1", api_key="key-42", max_retries=0)
    wait_until(lambda: client.models.list().data, 15, what="the echo model in the frontend")
    out = client.completions.create(model="echo", prompt="hello world", max_tokens=3)
    assert out.usage.completion_tokens == 3
    # Probes and scrapers need no key.
    assert urllib.request.urlopen(f"{keyed_stack}/health").status == 200
    metrics = urllib.request.urlopen(f"{keyed_stack}/metrics").read().decode()
    assert 'dynamo_frontend_rejected_requests_total{reason="unauthorized"} 2.0' in metrics


UNPICKLERS = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}


def test_nothing_in_the_project_can_unpickle() -> None:
    """No module of ours imports an unpickler or calls ``torch.load``: nothing from the wire is unpickled."""
    offenders = []
    for path in [*ROOT.joinpath("dynamo_worker").rglob("*.py"), *ROOT.joinpath("plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                names = ["torch.load"]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n in UNPICKLERS or n == "torch.load"
            ]
    assert offenders == []
