"""Dynamo's own launch scripts run unchanged: their worker command lines pass our parser.

Each case is a worker line of one of ai-dynamo/dynamo's example launch scripts (the path is
given; ``python3 -m dynamo.vllm ARGS`` becomes ``dynamo-worker ARGS``), with the environment
the script sets, run through the real parser and every configure hook (tests/configure_helpers.py:
everything ``dynamo-worker`` does before it connects to NATS). A flag with no counterpart here
is accepted with exactly one warning line; a value Dynamo refuses is refused, in one line.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest

from dynamo_worker.core.errors import UsageError
from dynamo_worker.engine import kv_transfer
from tests.configure_helpers import Configured, configure

MODEL = "Qwen/Qwen3-0.6B"  # a hub name: only parsed here, never loaded
KV_EVENTS_20080 = '{"publisher":"zmq","topic":"kv-events","endpoint":"tcp://*:20080","enable_kv_cache_events":true}'
KV_EVENTS_20082 = '{"publisher":"zmq","topic":"kv-events","endpoint":"tcp://*:20082","enable_kv_cache_events":true}'

# (script, worker command line, environment it sets, role, substrings of the warnings logged, in order)
SCRIPTS: list[tuple[str, str, dict[str, str], str, list[str]]] = [
    (
        "components/backends/vllm/launch/agg_router.sh",
        f"--model {MODEL} --block-size 64 --enforce-eager --connector none",
        {},
        "decode",
        [],
    ),
    (
        "components/backends/vllm/launch/disagg_router.sh (decode)",
        f"--model {MODEL} --block-size 64 --enforce-eager",
        {},
        "decode",
        [],
    ),
    (
        "components/backends/vllm/launch/disagg_lmcache.sh (prefill)",
        f"--model {MODEL} --is-prefill-worker --connector lmcache nixl",
        {"DYN_VLLM_KV_EVENT_PORT": "20081", "VLLM_NIXL_SIDE_CHANNEL_PORT": "20097"},
        "prefill",
        [],
    ),
    (
        "components/backends/vllm/launch/disagg_kvbm.sh (prefill)",
        "--model qwen/qwen3-0.6b --is-prefill-worker --connector kvbm nixl --enforce-eager",
        {"DYN_LOG": "debug", "DYN_KVBM_CPU_CACHE_GB": "4"},
        "prefill",
        [],
    ),
    (
        "components/backends/vllm/launch/dep.sh (rank 1 of 4)",
        "--model Qwen/Qwen3-30B-A3B --data-parallel-rank 1 --data-parallel-size 4 --enable-expert-parallel",
        {},
        "decode",
        [],
    ),
    (
        "examples/backends/vllm/launch/agg_router.sh",
        f"--model {MODEL} --block-size 64 --enforce-eager --connector none --kv-events-config '{KV_EVENTS_20080}'",
        {"DYN_SYSTEM_PORT": "8081", "NATS_SERVER": "nats://localhost:4222", "PYTHONHASHSEED": "0"},
        "decode",
        [],
    ),
    (
        "examples/backends/vllm/launch/disagg_router.sh (decode)",
        f"--model {MODEL} --block-size 64 --enforce-eager --is-decode-worker",
        {},
        "decode",
        [],
    ),
    (
        "examples/backends/vllm/launch/agg_request_planes.sh --nats",
        f"--model {MODEL} --enforce-eager",
        {"DYN_REQUEST_PLANE": "nats", "DYN_SYSTEM_PORT": "8081", "DYN_HEALTH_CHECK_ENABLED": "true"},
        "decode",
        [],
    ),
    # Dynamo's newest worker (inventory revision C) selects the role with --disaggregation-mode.
    (
        "examples/backends/vllm/launch/disagg.sh (decode, --disaggregation-mode)",
        f"--model {MODEL} --enforce-eager --disaggregation-mode decode",
        {"DYN_SYSTEM_PORT": "8081"},
        "decode",
        [],
    ),
    (
        # Dynamo's default connector is nixl, ours none: the one line added (docs/roles.md).
        "examples/backends/vllm/launch/disagg_router.sh (prefill, --disaggregation-mode; --connector nixl added)",
        f"--model {MODEL} --block-size 64 --enforce-eager --disaggregation-mode prefill "
        f"--kv-events-config '{KV_EVENTS_20082}' --connector nixl",
        {"VLLM_NIXL_SIDE_CHANNEL_PORT": "20098", "PYTHONHASHSEED": "0"},
        "prefill",
        [],
    ),
    (
        "examples/backends/vllm/launch/agg.sh, with DYN_VLLM_DISAGGREGATION_MODE=agg set",
        f"--model {MODEL} --enforce-eager --connector none",
        {"DYN_SYSTEM_PORT": "8081", "DYN_VLLM_DISAGGREGATION_MODE": "agg"},
        "decode",
        [],
    ),
    # Every worker flag of the inventory's Dynamo (components/src/dynamo/vllm/args.py) this design
    # has no counterpart for, as deployments pass them: one warning each, in the order logged.
    (
        "Dynamo deployment flags (inventory section 2)",
        (
            f"--model {MODEL} --store-kv etcd --event-plane zmq --durable-kv-events --migration-limit 3 "
            "--sleep-mode-level 2 --use-vllm-tokenizer --endpoint-types chat"
        ),
        {},
        "decode",
        [
            "--migration-limit 3 on a worker is ignored",
            "--sleep-mode-level 2 is ignored",
            "--use-vllm-tokenizer is ignored",
            "--endpoint-types chat is ignored",
            "--store-kv etcd is ignored",
            "--event-plane zmq is ignored",
            "--durable-kv-events is ignored",
        ],
    ),
    (
        "the same through Dynamo's environment variables",
        f"--model {MODEL}",
        {
            "DYN_STORE_KV": "file",
            "DYN_EVENT_PLANE": "nats",
            "DYN_DURABLE_KV_EVENTS": "true",
            "DYN_MIGRATION_LIMIT": "2",
            "DYN_VLLM_USE_TOKENIZER": "true",
            "DYN_ENDPOINT_TYPES": "chat,completions",
        },
        "decode",
        [
            "--migration-limit 2 on a worker is ignored",
            "--use-vllm-tokenizer is ignored",
            "--store-kv file is ignored",
            "--durable-kv-events is ignored",
        ],
    ),
]


@pytest.fixture
def connector_packages(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The connector packages each line asks for (nixl, lmcache, kvbm are GPU-machine packages,
    not installed here; their absence has its own test below)."""
    asked: list[list[str]] = []
    monkeypatch.setattr(kv_transfer, "check_packages", asked.append)
    monkeypatch.setenv("VLLM_NIXL_SIDE_CHANNEL_HOST", "127.0.0.1")  # restored: NIXL sets it if unset
    return asked


def run(
    line: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> Configured:
    with monkeypatch.context() as m:
        for name, value in env.items():
            m.setenv(name, value)
        return configure(shlex.split(line), caplog)


@pytest.mark.parametrize(("script", "line", "env", "role", "warnings"), SCRIPTS, ids=[s[0] for s in SCRIPTS])
def test_dynamo_launch_script_worker_lines_are_accepted(
    script: str,
    line: str,
    env: dict[str, str],
    role: str,
    warnings: list[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    connector_packages: list[list[str]],
) -> None:
    done = run(line, env, monkeypatch, caplog)
    assert done.role == role
    assert len(done.warnings) == len(warnings), done.warnings
    for logged, expected in zip(done.warnings, warnings):
        assert logged.startswith(expected) and "\n" not in logged, (logged, expected)


def _kv(done: Configured) -> dict[str, Any]:
    return done.ctx.resolved_config["kv_transfer"]


def test_a_connector_list_chains_the_connectors_as_dynamo_does(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, connector_packages: list[list[str]]
) -> None:
    done = run(f"--model {MODEL} --is-prefill-worker --connector lmcache nixl", {}, monkeypatch, caplog)
    kv = _kv(done)
    assert kv["kv_connector"] == "MultiConnector" and kv["from"] == "--connector lmcache nixl"
    assert [c["kv_connector"] for c in kv["kv_connector_extra_config"]["connectors"]] == [
        "LMCacheConnectorV1",
        "NixlConnector",
    ]
    assert kv["distributed_executor_backend_forced"]  # NIXL in the chain, tensor-parallel size 1: mp
    done = run(f"--model {MODEL} --is-prefill-worker --connector kvbm nixl", {}, monkeypatch, caplog)
    kvbm = _kv(done)["kv_connector_extra_config"]["connectors"][0]
    assert kvbm == {
        "kv_connector": "DynamoConnector",
        "kv_role": "kv_both",
        "kv_connector_module_path": "kvbm.vllm_integration.connector",
    }
    done = run(f"--model {MODEL} --connector nixl", {}, monkeypatch, caplog)
    assert _kv(done)["kv_connector"] == "NixlConnector"  # one connector: itself, not a chain
    assert connector_packages == [["lmcache", "nixl"], ["kvbm", "nixl"], ["nixl"]]
    for none in ("none", "null"):  # Dynamo's two spellings of no connector
        assert _kv(run(f"--model {MODEL} --connector {none}", {}, monkeypatch, caplog)) is None


def test_a_connector_package_that_is_missing_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(UsageError, match=r"--connector lmcache needs the 'lmcache' package.*pip install lmcache"):
        run(f"--model {MODEL} --is-prefill-worker --connector lmcache nixl", {}, monkeypatch, caplog)


def test_is_decode_worker_publishes_no_kv_events_as_dynamos_does(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plain = run(f"--model {MODEL} --kv-events-config '{KV_EVENTS_20080}'", {}, monkeypatch, caplog)
    assert plain.ctx.resolved_config["kv_event_ports"] is not None
    assert plain.ctx.resolved_config["engine_args"]["kv_events_config"]["enable_kv_cache_events"]
    decode = run(f"--model {MODEL} --is-decode-worker --kv-events-config '{KV_EVENTS_20080}'", {}, monkeypatch, caplog)
    assert decode.ctx.resolved_config["kv_event_ports"] is None
    assert decode.ctx.resolved_config["engine_args"]["kv_events_config"] is None


def test_disaggregation_mode_decode_is_agg_without_kv_events_as_dynamos_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Dynamo's decode mode sets its is_decode_worker (no KV events); agg keeps them. Flag or environment.
    events = f"--kv-events-config '{KV_EVENTS_20080}'"
    agg = run(f"--model {MODEL} --disaggregation-mode agg {events}", {}, monkeypatch, caplog)
    assert agg.role == "decode" and agg.ctx.resolved_config["kv_event_ports"] == [20080]
    for line, env in (
        (f"--model {MODEL} --disaggregation-mode decode {events}", {}),
        (f"--model {MODEL} {events}", {"DYN_VLLM_DISAGGREGATION_MODE": "decode"}),
    ):
        decode = run(line, env, monkeypatch, caplog)
        assert decode.role == "decode" and decode.ctx.resolved_config["kv_event_ports"] is None
        assert decode.ctx.resolved_config["engine_args"]["kv_events_config"] is None
    # Dynamo refuses its legacy --is-decode-worker with --disaggregation-mode, even when they agree.
    for mode in ("decode", "agg"):
        with pytest.raises(
            UsageError, match=f"^--is-decode-worker and --disaggregation-mode {mode} cannot be combined"
        ):
            run(f"--model {MODEL} --is-decode-worker --disaggregation-mode {mode}", {}, monkeypatch, caplog)


REFUSED = [
    ("--sleep-mode-level 4", "argument --sleep-mode-level: invalid choice: 4"),
    ("--store-kv redis", "argument --store-kv: invalid choice: 'redis'"),
    ("--event-plane kafka", "argument --event-plane: invalid choice: 'kafka'"),
    ("--endpoint-types chat,embeddings", "--endpoint-types embeddings: unknown endpoint type"),
    ("--endpoint-types none,chat", "--endpoint-types none: unknown endpoint type"),
    ("--migration-limit -1", "--migration-limit must be 0 or more"),
    ("--connector none nixl", "none/null cannot be combined"),
    ("--connector nixl nixl", "--connector names nixl more than once"),
    ("--connector bogus", "argument --connector: invalid choice: 'bogus'"),
    (
        '--connector example --kv-transfer-config \'{"kv_connector":"ExampleConnector","kv_role":"kv_both"}\'',
        "Cannot specify both --connector and --kv-transfer-config",
    ),
]


@pytest.mark.parametrize(("flags", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_values_dynamo_refuses_are_refused_in_one_line(
    flags: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In process: argparse's refusals exit 2 with their line on stderr; ours raise the UsageError
    # that the command prints as its one line (the test below runs the command itself).
    try:
        run(f"--model {MODEL} {flags}", {}, monkeypatch, caplog)
    except UsageError as exc:
        line = str(exc)
    except SystemExit as exc:
        assert exc.code == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
    else:
        pytest.fail(f"{flags} was accepted")
    assert message in line and "\n" not in line, line


def test_a_bad_dynamo_environment_value_is_refused_in_one_line(tmp_path: Path) -> None:
    from tests.helpers import run_cli, worker_env

    out = run_cli("--model", str(tmp_path), env={**worker_env(), "DYN_STORE_KV": "consul"})
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1]
        == "dynamo-worker: error: --store-kv / DYN_STORE_KV 'consul' is invalid; use one of etcd, file, mem"
    )
