"""The Kubernetes manifests (deploy/k8s/base) and the image (deploy/Containerfile), checked offline.

A cluster cannot run here, so each property an operator relies on is checked against the code
it depends on: the manifests against Kubernetes' own schemas (kubernetes-validate bundles them),
every container's command line against dynamo-worker's real parser and configure hooks, probes
against the status server's routes, the grace period against the drain the flags ask for, the
NATS configuration against nats-server itself.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dynamo_worker.core.errors import UsageError
from tests.configure_helpers import configure

ROOT = Path(__file__).resolve().parent.parent
BASE = ROOT / "deploy" / "k8s" / "base"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
IMAGE = "dynamo-worker"  # the image name the manifests use; the kustomization's images: sets the real one
NATS_SERVER = Path(sys.executable).parent / "nats-server"
SECRET = "dynamo-worker-secrets"


def render(base: Path) -> list[dict[str, Any]]:
    """What ``kubectl kustomize BASE`` prints, for the features our kustomization uses:
    ``resources`` (files), ``namespace``, ``labels`` (metadata only, kustomize's default) and
    ``images``. Anything else in it is an error, so this renderer cannot silently fall behind."""
    kustomization = yaml.safe_load((base / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "images"}
    assert set(kustomization) <= known, f"render() does not implement {set(kustomization) - known}"
    images = {i["name"]: f"{i.get('newName', i['name'])}:{i['newTag']}" for i in kustomization.get("images", [])}
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((base / resource).read_text()) if d]
    for doc in docs:
        meta = doc["metadata"]
        if "namespace" in kustomization and doc["kind"] != "Namespace":
            meta["namespace"] = kustomization["namespace"]
        for entry in kustomization.get("labels", []):
            assert not entry.get("includeSelectors") and not entry.get("includeTemplates")
            meta.setdefault("labels", {}).update(entry["pairs"])
        for container in pod_spec(doc).get("containers", []) if pod_spec(doc) else []:
            name = container["image"].partition(":")[0]
            if name in images:
                container["image"] = images[name]
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    return doc["spec"]["template"]["spec"] if doc["kind"] in ("Deployment", "StatefulSet") else None


DOCS = render(BASE)
WORKLOADS = [d for d in DOCS if pod_spec(d) is not None]
OURS = [(d, c) for d in WORKLOADS for c in pod_spec(d)["containers"] if c["image"].split(":")[0].endswith(IMAGE)]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == kind]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_every_manifest_is_valid_against_the_kubernetes_schemas() -> None:
    version = kubernetes_validate.latest_version()
    assert len(DOCS) >= 10
    for doc in DOCS:
        # strict: an unknown field (a typo such as readinesProbe) is an error, not ignored.
        kubernetes_validate.validate(doc, version, strict=True)
    broken = copy.deepcopy(by_kind("Deployment")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_rendering_checked_here_is_what_kubectl_kustomize_renders() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to cross-check the renderer (GitHub's runners have it)"
    out = subprocess.run([kubectl, "kustomize", str(BASE)], capture_output=True, text=True, timeout=60, check=True)
    theirs = [d for d in yaml.safe_load_all(out.stdout) if d]

    def key(d: dict[str, Any]) -> tuple[str, str]:
        return d["kind"], d["metadata"]["name"]

    assert sorted(theirs, key=key) == sorted(DOCS, key=key)


def test_the_deployment_has_nats_a_frontend_and_decode_and_prefill_workers() -> None:
    (nats,) = by_kind("StatefulSet")
    assert nats["spec"]["replicas"] == 3 and nats["spec"]["serviceName"] == "nats-headless"
    headless = next(s for s in by_kind("Service") if s["metadata"]["name"] == "nats-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    roles = {flag(c["args"], "--role"): d["kind"] for d, c in OURS}
    assert roles == {"frontend": "Deployment", "decode": "Deployment", "prefill": "Deployment"}
    frontend_service = next(s for s in by_kind("Service") if s["metadata"]["name"] == "frontend")
    assert frontend_service["spec"]["ports"][0]["port"] == 8000
    assert all(d["metadata"]["namespace"] == "dynamo" for d in DOCS if d["kind"] != "Namespace")


def test_nats_config_is_accepted_by_nats_server_and_clusters_three_servers_with_jetstream(tmp_path: Path) -> None:
    config = next(c for c in by_kind("ConfigMap") if c["metadata"]["name"] == "nats-config")["data"]["nats.conf"]
    routes = re.findall(r"nats-route://(nats-\d)\.nats-headless:6222", config)
    assert routes == ["nats-0", "nats-1", "nats-2"] and "jetstream" in config
    path = tmp_path / "nats.conf"
    path.write_text(config)
    env = {"POD_NAME": "nats-0", "NATS_AUTH_TOKEN": "s3cret", "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(path)], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert ok.returncode == 0, ok.stderr
    path.write_text(config.replace("jetstream {", "jetstream {\n  no_such_option: 1"))
    bad = subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(path)], capture_output=True, text=True, env=env, timeout=30, check=False
    )
    assert bad.returncode != 0  # the check above can fail


def _container_env(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Set the container's environment: a secret's value is a placeholder naming its key, a pod
    field a sample address."""
    values = {}
    for var in container.get("env", []):
        if "value" in var:
            value = var["value"]
        elif "secretKeyRef" in var["valueFrom"]:
            value = f"secret-{var['valueFrom']['secretKeyRef']['key']}"
        else:
            assert var["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            value = "10.1.2.3"
        monkeypatch.setenv(var["name"], value)
        values[var["name"]] = value
    return values


def test_every_container_command_line_is_accepted_by_dynamo_workers_own_parser(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # The volumes' paths exist in the pods, not here: point them at directories that do.
    paths = {"/models/model": tmp_path / "model", "/kv": tmp_path / "kv"}
    for path in paths.values():
        path.mkdir()
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")
    assert len(OURS) == 3
    for doc, container in OURS:
        with monkeypatch.context() as m:
            env = _container_env(container, m)
            args = [str(paths.get(a, a)) for a in container["args"]]
            done = configure(args, caplog)
        o = done.options
        assert done.warnings == [], (doc["metadata"]["name"], done.warnings)
        # Every secret reaches the option that reads it (a misspelt variable would be ignored).
        secrets = {v: k for k, v in env.items() if v.startswith("secret-")}
        read = {value for value in vars(o).values() if isinstance(value, str)}
        assert set(secrets) <= read, f"{doc['metadata']['name']}: {[secrets[s] for s in set(secrets) - read]} unread"
        assert o.request_plane != "tcp" or o.request_plane_token == "secret-request-plane-token"
        if done.role != "frontend":  # workers publish the pod's address for the TCP request plane
            assert o.tcp_rpc_host == "0.0.0.0" and o.tcp_rpc_advertise_host == "10.1.2.3"
        assert o.discovery_replicas == 3  # one per nats-server: discovery survives one down
    with pytest.raises(UsageError, match="--tcp-rpc-host 127.0.0.1"):  # the check can fail
        doc, container = next((d, c) for d, c in OURS if flag(c["args"], "--role") == "decode")
        args = [str(paths.get(a, a)) for a in container["args"]]
        args[args.index("--tcp-rpc-host") + 1] = "127.0.0.1"
        configure(args, caplog)


def _status_routes() -> set[str]:
    from prometheus_client import CollectorRegistry

    from dynamo_worker.core.status_server import HealthState, StatusServer

    server = StatusServer(HealthState(), CollectorRegistry())
    return {r.canonical for r in server.app.router.resources() if "{" not in r.canonical}


def test_probes_hit_the_status_servers_health_and_live_routes_on_its_port() -> None:
    routes = _status_routes()
    assert {"/health", "/live", "/metrics"} <= routes
    for doc, container in OURS:
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        system_port = int(flag(container["args"], "--system-port"))
        assert flag(container["args"], "--system-host") == "0.0.0.0"  # kubelet probes from outside the pod
        for probe, path in (("readinessProbe", "/health"), ("livenessProbe", "/live")):
            get = container[probe]["httpGet"]
            assert get["path"] == path and path in routes, (doc["metadata"]["name"], probe)
            assert ports[get["port"]] == system_port, (doc["metadata"]["name"], probe)


def test_the_grace_period_outlasts_the_drain_and_the_cleanup() -> None:
    from dynamo_worker.cli import build_parser
    from dynamo_worker.core.plugins import HookRelay

    defaults = build_parser(HookRelay("decode", None)).parse_args([])
    for doc, container in OURS:
        args = container["args"]
        drain = (
            float(flag(args, "--graceful-shutdown-timeout"))
            if "--graceful-shutdown-timeout" in args
            else defaults.graceful_shutdown_timeout
        )
        cleanup = (
            float(flag(args, "--shutdown-cleanup-timeout"))
            if "--shutdown-cleanup-timeout" in args
            else defaults.shutdown_cleanup_timeout
        )
        grace = pod_spec(doc)["terminationGracePeriodSeconds"]
        assert grace > drain + cleanup, (doc["metadata"]["name"], grace, drain, cleanup)


def test_every_pod_requests_resources_and_ours_are_scraped_on_a_port_serving_metrics() -> None:
    for doc in WORKLOADS:
        for container in pod_spec(doc)["containers"]:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), doc["metadata"]["name"]
    for doc, container in OURS:
        notes = doc["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
        port = int(notes["prometheus.io/port"])
        assert port in {p["containerPort"] for p in container["ports"]}
        role = flag(container["args"], "--role")
        served_by = "--http-port" if role == "frontend" else "--system-port"  # both serve /metrics
        assert port == int(flag(container["args"], served_by)), doc["metadata"]["name"]


def test_credentials_come_from_the_secret_that_docs_deploying_md_creates() -> None:
    keys = {
        v["valueFrom"]["secretKeyRef"]["key"]
        for d in WORKLOADS
        for c in pod_spec(d)["containers"]
        for v in c.get("env", [])
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    names = {
        v["valueFrom"]["secretKeyRef"]["name"]
        for d in WORKLOADS
        for c in pod_spec(d)["containers"]
        for v in c.get("env", [])
        if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert names == {SECRET}
    assert keys == {"nats-token", "request-plane-token", "api-key", "system-admin-token"}
    for _, container in OURS:  # no secret on a command line (visible in ps and in the pod spec)
        assert not any(a in container["args"] for a in ("--nats-token", "--request-plane-token", "--api-key"))
    doc = (ROOT / "docs" / "deploying.md").read_text()
    command = re.search(rf"kubectl -n dynamo create secret generic {SECRET}(.*?)\n\n", doc, re.DOTALL)
    assert command, "docs/deploying.md must show the command creating the Secret"
    assert set(re.findall(r"--from-literal=([a-z-]+)=", command.group(1))) == keys


def test_the_containerfile_installs_the_cpu_build_as_install_sh_does() -> None:
    text = CONTAINERFILE.read_text()
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert "'.[cpu]'" in text
    removed = "pip uninstall -y torchvision torchaudio torchcodec"
    assert removed in text and "torchvision torchaudio torchcodec" in install
    assert text.index("'.[cpu]'") < text.index(removed)
    assert re.search(r'^ENTRYPOINT \["dynamo-worker"\]$', text, re.MULTILINE)
    assert re.search(r"^USER \d+$", text, re.MULTILINE)  # not root
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, re.MULTILINE).group(1).split()}
    assert exposed == {p["containerPort"] for _, c in OURS for p in c["ports"]}


def test_only_a_role_that_serves_endpoints_has_its_tcp_address_checked(caplog: pytest.LogCaptureFixture) -> None:
    # NATS over the network and the default --tcp-rpc-host 127.0.0.1: a worker would publish an
    # address no other host reaches; the frontend publishes none (it only calls), so it starts.
    remote = ["--nats-url", "nats://10.1.2.3:4222", "--request-plane", "tcp"]
    assert configure(["--role", "frontend", *remote], caplog).role == "frontend"
    with pytest.raises(UsageError, match="--tcp-rpc-host 127.0.0.1"):
        configure(["--role", "echo", *remote], caplog)
