"""The docs keep up with the code: every hook documented with its exact signature, and tested."""

from __future__ import annotations

import inspect
from pathlib import Path

from dynamo_worker.core import hookspecs

ROOT = Path(__file__).resolve().parent.parent


def hook_signatures() -> dict[str, str]:
    out = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("dynamo_worker_"):
            sig = inspect.signature(fn)
            params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
            out[name] = f"def {name}({params}) -> {sig.return_annotation}"
    return out


def test_there_are_hooks() -> None:
    assert len(hook_signatures()) >= 8


def test_every_hook_is_documented_with_its_exact_signature() -> None:
    doc = (ROOT / "docs" / "hooks.md").read_text()
    for name, signature in hook_signatures().items():
        assert f"## {name}\n" in doc, f"{name} has no section in docs/hooks.md"
        assert signature in doc, f"docs/hooks.md does not show {signature!r}"


def test_docs_document_no_hook_that_does_not_exist() -> None:
    doc = (ROOT / "docs" / "hooks.md").read_text()
    documented = {line[3:].strip() for line in doc.splitlines() if line.startswith("## dynamo_worker_")}
    assert documented == set(hook_signatures())


def test_every_hook_is_exercised_by_a_test() -> None:
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py")
    for name in hook_signatures():
        assert f"def {name}(" in tests, f"no test implements {name}"


def test_the_plugin_tutorial_shows_the_real_example_plugin() -> None:
    tutorial = (ROOT / "docs" / "writing-a-role.md").read_text()
    source = (ROOT / "plugins" / "echo" / "dynamo_worker_echo" / "__init__.py").read_text()
    assert 'echo = "dynamo_worker_echo:EchoRole"' in tutorial
    # Every code line the tutorial quotes from the plugin is really in the plugin.
    quoted = [line for line in tutorial.split("```python")[1:]]
    assert quoted
    for block in quoted:
        for line in block.split("```")[0].splitlines():
            if line.strip() and not line.strip().startswith("#"):
                assert line.rstrip() in source, f"tutorial line not in the plugin: {line!r}"
