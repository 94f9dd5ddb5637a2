"""The public plugin interface (dynamo_worker.plugin): one import for role authors, typed,
and pluggy used as pluggy (arguments by name, wrappers refused clearly, core plugins a tuple)."""

from __future__ import annotations

import argparse
import ast
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import dynamo_worker.plugin
from dynamo_worker.core import hookspecs
from dynamo_worker.core.plugins import CORE_PLUGINS, HookRelay
from dynamo_worker.plugin import HealthCheck, Registrar, WorkerContext, hookimpl
from tests.helpers import run_cli, worker_env, write_distribution

ROOT = Path(__file__).resolve().parent.parent
EXPORTED = set(dynamo_worker.plugin.__all__)


def python_sources() -> dict[str, str]:
    """What role authors read or copy: the docs' Python blocks, the example plugin, the built-in
    roles (dynamo_worker/roles and their shared base, dynamo_worker/engine/role.py)."""
    from tests.test_docs import kind, python_blocks

    sources = {f"{path}:{line}": code for path, line, code, marker in python_blocks() if kind(marker)[0] != "signature"}
    for path in [
        *sorted((ROOT / "plugins").rglob("*.py")),
        *sorted((ROOT / "dynamo_worker" / "roles").glob("*.py")),
        ROOT / "dynamo_worker" / "engine" / "role.py",
    ]:
        if "egg-info" not in str(path):
            sources[str(path.relative_to(ROOT))] = path.read_text()
    return sources


def internal_imports_of_public_names(source: str) -> list[str]:
    """``from dynamo_worker.core.X import NAME`` (or ``import dynamo_worker.core.X``) where the
    public module exports what is used."""
    found = []
    tree = compile(source, "<source>", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dynamo_worker.core"):
            found += [f"{node.module}.{a.name}" for a in node.names if a.name in EXPORTED]
    return found


def test_docs_plugins_and_built_in_roles_import_public_names_from_the_public_module() -> None:
    sources = python_sources()
    assert (
        any(name.startswith("docs/") for name in sources) and "plugins/echo/dynamo_worker_echo/__init__.py" in sources
    )
    offenders = {where: names for where, src in sources.items() if (names := internal_imports_of_public_names(src))}
    assert not offenders, f"import these from dynamo_worker.plugin instead: {offenders}"


def test_the_import_check_catches_an_internal_import() -> None:
    bad = "from dynamo_worker.core.request_plane import RequestError, wire\n"
    assert internal_imports_of_public_names(bad) == ["dynamo_worker.core.request_plane.RequestError"]


def test_every_exported_name_exists_and_hookimpl_is_the_cores() -> None:
    assert all(hasattr(dynamo_worker.plugin, name) for name in EXPORTED)
    assert dynamo_worker.plugin.hookimpl is hookspecs.hookimpl
    assert {
        "hookimpl",
        "WorkerContext",
        "Registrar",
        "RequestContext",
        "RequestError",
        "UsageError",
        "EngineDead",
        "env_default",
        "Runtime",
        "Client",
        "HealthCheck",
    } <= EXPORTED


def test_the_public_module_and_the_roles_type_check_with_mypy(tmp_path: Path) -> None:
    # pyproject.toml's [tool.mypy] names the files: the public module, the testing helper,
    # the built-in roles and the example plugin. A few seconds.
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dynamo_worker/roles" in (ROOT / "pyproject.toml").read_text()


def test_core_plugins_are_a_plain_tuple_registered_first() -> None:
    assert isinstance(CORE_PLUGINS, tuple) and CORE_PLUGINS
    relay = HookRelay("minimal", MinimalRole())
    names = [relay.pm.get_name(p) for p in relay.pm.get_plugins()]
    assert sorted(names) == sorted([f"core.{p.__name__}" for p in CORE_PLUGINS] + ["role.minimal"])


class MinimalRole:
    """Takes no hook argument at all: pluggy passes arguments by name, so fewer is fine."""

    name = "minimal"
    component = "minimal"

    def __init__(self) -> None:
        self.called: list[str] = []

    @hookimpl
    def dynamo_worker_configure(self) -> None:
        self.called.append("configure")

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Registrar) -> None:
        self.called.append("register_endpoints")

    @hookimpl
    def dynamo_worker_health_payload(self) -> HealthCheck:
        self.called.append("health_payload")
        return HealthCheck({"ping": 1}, endpoint="ping")

    @hookimpl
    def dynamo_worker_shutdown(self) -> None:
        self.called.append("shutdown")


def parsed_context(relay: HookRelay) -> WorkerContext:
    """A context with every option at its default, as the core's and the role's parsers give them."""
    parser = argparse.ArgumentParser()
    relay.add_arguments(parser)
    return WorkerContext(
        role=None,
        options=parser.parse_args([]),
        runtime=None,  # type: ignore[arg-type]
        log=logging.getLogger("test"),
    )


async def test_hooks_are_called_by_argument_name_so_an_implementation_takes_what_it_needs() -> None:
    role = MinimalRole()
    relay = HookRelay("minimal", role)
    ctx = parsed_context(relay)
    await relay.configure(ctx)
    await relay.register_endpoints(Registrar(role="minimal", component="minimal"), ctx)
    assert await relay.health_payload(ctx) == HealthCheck({"ping": 1}, "ping")
    assert await relay.shutdown(ctx) == []
    assert role.called == ["configure", "register_endpoints", "health_payload", "shutdown"]


async def test_a_bare_dict_health_payload_goes_to_generate() -> None:
    class DictRole(MinimalRole):
        @hookimpl
        def dynamo_worker_health_payload(self) -> dict[str, Any]:
            return {"token_ids": [1]}

    relay = HookRelay("minimal", DictRole())
    assert await relay.health_payload(parsed_context(relay)) == HealthCheck({"token_ids": [1]}, "generate")


WRAPPING_ROLE = '''
from dynamo_worker.plugin import hookimpl

class WrappingRole:
    """Times configure with a wrapper."""
    name = "wrapping"

    @hookimpl({kind}=True)
    def dynamo_worker_configure(self, ctx):
        result = yield
        return result

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar, ctx):
        pass
'''


@pytest.mark.parametrize("kind", ["wrapper", "hookwrapper"])
def test_a_hook_wrapper_is_refused_at_load_with_one_clear_line(tmp_path: Path, kind: str) -> None:
    write_distribution(
        tmp_path,
        "wrapping-role",
        "0.1.0",
        {"wrapping": "wrapping_role:WrappingRole"},
        {"wrapping_role": WRAPPING_ROLE.replace("{kind}", kind)},
    )
    out = run_cli("--role", "wrapping", "--nats-url", "nats://127.0.0.1:1", env=worker_env(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        (
            "dynamo-worker: error: role 'wrapping' declares hook wrapper(s) dynamo_worker_configure: dynamo-worker "
            "hooks may return awaitables that the core awaits after pluggy returns, so a wrapper would see "
            "un-awaited coroutines; implement the hook itself (drop hookwrapper=/wrapper=) and use "
            "tryfirst=/trylast= to order it"
        )
    ]


def test_built_in_roles_choose_behaviour_by_class_attributes_not_by_name() -> None:
    sources = {
        p.name: p.read_text()
        for p in [*(ROOT / "dynamo_worker" / "roles").glob("*.py"), ROOT / "dynamo_worker" / "engine" / "role.py"]
    }
    for name, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Compare):
                sides = [node.left, *node.comparators]
                assert not any(
                    isinstance(s, ast.Attribute)
                    and s.attr == "name"
                    and isinstance(s.value, ast.Name)
                    and s.value.id == "self"
                    for s in sides
                ), f"{name}:{node.lineno} compares self.name"


# ---- the testing helper (dynamo_worker.testing), as a role author's suite meets it -----------------


async def test_the_testing_helper_says_when_an_endpoint_is_not_discoverable(run_role) -> None:
    role = run_role("echo")
    with pytest.raises(TimeoutError, match=r"is not discoverable at nowhere\.generate after 0\.5s; its log:"):
        async with role.client("generate", component="nowhere", timeout=0.5):
            pass
    async with role.client("generate") as client:  # the role's own component by default
        assert [r.pid for r in client.instances()] == [role.pid]


def test_the_testing_helper_shows_the_log_of_a_role_that_exits_at_start_up(run_role) -> None:
    with pytest.raises(
        AssertionError,
        match=r"echo exited 2 before logging 'serving'"
        r"(.|\n)*--echo-delay must be 0 or more \(got -1\.0\)",
    ):
        run_role("echo", "--echo-delay", "-1")


def test_a_health_payload_of_another_type_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="returned list; return a dict, a HealthCheck or None"):
        HealthCheck.of([1])  # type: ignore[arg-type]


# ---- the generate messages (dynamo_worker.core.generate), one schema for every side ---------------


def test_fit_context_is_vllm_serves_max_tokens() -> None:
    from dynamo_worker.core.generate import ContextLengthExceeded, fit_context

    assert fit_context(10, None, 256) == 246  # the rest of the context
    assert fit_context(10, 8, 256) == 8
    assert fit_context(10, 400, 256) == 246  # lowered to what fits, not refused
    assert fit_context(255, None, 256) == 1
    for prompt in (256, 300):
        with pytest.raises(ContextLengthExceeded, match=f"maximum context length is 256 tokens.*{prompt} input tokens"):
            fit_context(prompt, None, 256)
    assert ContextLengthExceeded.parameter == "input_tokens"  # vllm serve's param


def test_a_chunk_carries_only_what_was_set_and_reads_back_the_same() -> None:
    import msgspec

    from dynamo_worker.core.generate import TopLogprob
    from dynamo_worker.plugin import GenerateChunk, Usage

    assert msgspec.json.encode(GenerateChunk([7])) == b'{"token_ids":[7]}'
    last = GenerateChunk(
        [8],
        finish_reason="length",
        log_probs=[float("-inf")],
        top_logprobs=[[TopLogprob(8, float("-inf"), 1)]],
        completion_usage=Usage.of(3, 2, cached_tokens=0),
    )
    wire = msgspec.json.decode(msgspec.json.encode(last))
    assert wire["completion_usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    back = msgspec.convert(wire, GenerateChunk)  # -inf has no JSON form: it reads back as None
    assert back.log_probs == [None] and back.top_logprobs == [[TopLogprob(8, None, 1)]]
    assert back.completion_usage == last.completion_usage
    assert "prompt_tokens_details" not in msgspec.to_builtins(Usage.of(3, 2))


def test_the_request_refuses_unknown_fields_and_a_role_can_extend_it() -> None:
    import msgspec

    from dynamo_worker.plugin import GenerateRequest

    with pytest.raises(msgspec.ValidationError, match="unknown field `surprise`"):
        msgspec.convert({"token_ids": [1], "surprise": 1}, GenerateRequest)
    with pytest.raises(msgspec.ValidationError, match=r"at `\$.stop_conditions.max_tokens`"):
        msgspec.convert({"token_ids": [1], "stop_conditions": {"max_tokens": 2**64}}, GenerateRequest)

    class WithDelay(GenerateRequest, kw_only=True):
        delay: float = 0.0

    assert msgspec.convert({"token_ids": [1], "delay": 0.5}, WithDelay).delay == 0.5
