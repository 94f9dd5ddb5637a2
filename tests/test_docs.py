"""The docs keep up with the code: every hook documented with its exact signature and tested, and
every Python block in docs/ run, imported or (when it needs a live deployment) compiled with its
imports resolved.

Every Python block says its kind in an HTML comment on the line before its fence (invisible when rendered):

* ``<!-- docs-test: module NAME -->``: the module ``NAME.py``, imported (and importable by the
  doc's other blocks);
* ``<!-- docs-test: pytest -->``: a test file, run by pytest in a subprocess with the doc's
  modules on the path, its ``toml`` block's entry points installed as a distribution, and the
  package's pytest plugin (dynamo_worker.testing) active;
* ``<!-- docs-test: signature -->``: a hook's signature (docs/hooks.md), checked against the spec;
* ``<!-- docs-test: live (WHY) -->``: needs a live deployment: compiled, and every name it
  imports imported.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

from dynamo_worker.core import hookspecs
from tests.helpers import worker_env, write_distribution

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKER = re.compile(r"^\s*<!-- docs-test: (?P<kind>module|pytest|signature|live)\b\s*(?P<arg>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>\w*)\s*$")


def code_blocks(path: Path) -> list[tuple[int, str, str, str]]:
    """``(line, language, code, marker)`` of every fenced block of ``path``; ``marker`` is the
    docs-test comment right before it ("" if none)."""
    lines = path.read_text().splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None or not fence["lang"]:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        marker = lines[start - 2].strip() if start >= 2 and MARKER.match(lines[start - 2]) else ""
        blocks.append((start, fence["lang"], textwrap.dedent("\n".join(body)) + "\n", marker))
    return blocks


def python_blocks() -> list[tuple[str, int, str, str]]:
    """``(doc path, line, code, marker)`` of every Python block in docs/."""
    return [
        (str(p.relative_to(ROOT)), line, code, marker)
        for p in DOCS
        for line, lang, code, marker in code_blocks(p)
        if lang == "python"
    ]


def kind(marker: str) -> tuple[str, str]:
    match = MARKER.match(marker)
    return ("", "") if match is None else (match["kind"], match["arg"])


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


def test_every_python_block_in_the_docs_has_a_kind_this_module_tests() -> None:
    blocks = python_blocks()
    assert len(blocks) >= 15
    unmarked = [f"{where}:{line}" for where, line, _, marker in blocks if not kind(marker)[0]]
    assert not unmarked, f"Python blocks with no docs-test marker (module, pytest, signature or live): {unmarked}"
    # A marker that does not parse would silently make its block a script: refuse near-misses.
    for p in DOCS:
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if "docs-test" in line:
                assert MARKER.match(line), f"{p.name}:{n}: malformed docs-test marker {line!r}"


def test_signature_blocks_are_the_hooks_exact_signatures() -> None:
    signatures = hook_signatures()
    seen = []
    for where, line, code, marker in python_blocks():
        if kind(marker)[0] != "signature":
            continue
        tree = ast.parse(code.rstrip() + ": ...", f"{where}:{line}")
        (fn,) = tree.body
        assert isinstance(fn, ast.FunctionDef) and fn.name in signatures, f"{where}:{line}"
        assert code.strip() == signatures[fn.name], f"{where}:{line}"
        seen.append(fn.name)
    assert sorted(seen) == sorted(signatures)


def module_source(module: str) -> tuple[Path, bool]:
    """The file of ``module`` and whether it is a package, found without importing it or its
    parents (``importlib.util.find_spec`` imports parents: seconds for vLLM's)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    assert spec is not None and spec.origin is not None, f"no module {top}"
    path = Path(spec.origin)
    for part in rest:
        assert path.name == "__init__.py", f"{module}: {path.parent.name} is not a package"
        package = path.parent / part
        path = package / "__init__.py" if (package / "__init__.py").exists() else path.parent / f"{part}.py"
        assert path.exists(), f"no module {module}"
    return path, path.name == "__init__.py"


def binds(module: str, name: str) -> bool:
    """Whether ``from module import name`` finds ``name``, read from the module's source rather
    than imported (vLLM's modules take seconds to import): a submodule of that name, a top-level
    definition, assignment or import of it, or a lazy ``__getattr__`` table naming it."""
    path, is_package = module_source(module)
    if is_package and ((path.parent / name / "__init__.py").exists() or (path.parent / f"{name}.py").exists()):
        return True
    if path.suffix != ".py":  # a C extension
        return hasattr(importlib.import_module(module), name)
    source = path.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            (a.asname or a.name.split(".")[0]) == name for a in node.names
        ):
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and name in ast.unparse(node).split("=")[0]:
            return True
    return "def __getattr__" in source and re.search(rf"[\"']{re.escape(name)}[\"']", source) is not None


def test_live_blocks_compile_and_every_name_they_import_exists() -> None:
    checked = 0
    for where, line, code, marker in python_blocks():
        if kind(marker)[0] != "live":
            continue
        assert kind(marker)[1], f"{where}:{line}: say why the block needs a live deployment"
        tree = compile(code, f"{where}:{line}", "exec", ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    module_source(alias.name)
                    checked += 1
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    assert binds(str(node.module), alias.name), f"{where}:{line}: {node.module} has no {alias.name}"
                    checked += 1
    assert checked >= 5


def test_the_live_import_check_catches_a_wrong_name() -> None:
    assert binds("vllm.v1.engine.async_llm", "AsyncLLM")
    assert not binds("vllm.v1.engine.async_llm", "AsyncLLMEngine2")


def doc_modules(doc: Path) -> dict[str, str]:
    return {kind(m)[1]: code for _, lang, code, m in code_blocks(doc) if lang == "python" and kind(m)[0] == "module"}


def test_module_blocks_import_and_their_roles_load() -> None:
    from dynamo_worker.core.plugins import HookRelay

    loaded = 0
    for doc in DOCS:
        for name, code in doc_modules(doc).items():
            spec = importlib.util.spec_from_loader(f"docs_{name}", loader=None)
            assert spec is not None
            module = importlib.util.module_from_spec(spec)
            exec(compile(code, f"{doc.name}:{name}", "exec"), module.__dict__)
            for obj in vars(module).values():
                if isinstance(obj, type) and obj.__module__ == module.__name__ and hasattr(obj, "name"):
                    HookRelay(obj.name, obj())  # hooks spelled right, the required one present
                    loaded += 1
    assert loaded >= 1


@pytest.mark.parametrize(
    "doc", [d for d in DOCS if any(kind(m)[0] == "pytest" for _, _, _, m in code_blocks(d))], ids=lambda d: d.name
)
def test_the_docs_test_files_pass_against_the_docs_own_role(doc: Path, tmp_path: Path) -> None:
    """The tutorial's role installed as a distribution, its test file run by pytest: what a role
    author who copied the blocks would get."""
    site = tmp_path / "site"
    (toml,) = [tomllib.loads(code) for _, lang, code, _ in code_blocks(doc) if lang == "toml"]
    roles = toml["project"]["entry-points"]["dynamo_worker.roles"]
    write_distribution(site, toml["project"]["name"], toml["project"]["version"], roles, doc_modules(doc))
    tests = [code for _, lang, code, m in code_blocks(doc) if lang == "python" and kind(m)[0] == "pytest"]
    for n, code in enumerate(tests):
        (tmp_path / f"test_docs_block_{n}.py").write_text(code)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-W",
            "ignore::DeprecationWarning",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=worker_env(site),
    )
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert re.search(r"\b\d+ passed\b", out.stdout) and "failed" not in out.stdout and "skipped" not in out.stdout


def test_the_tutorial_imports_only_the_public_module_of_dynamo_worker() -> None:
    for _, lang, code, _ in code_blocks(ROOT / "docs" / "writing-a-role.md"):
        if lang == "python":
            for node in ast.walk(ast.parse(code)):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dynamo_worker"):
                    assert node.module == "dynamo_worker.plugin", node.module
