"""The CI configuration keeps up with the suite.

* GitHub's matrix (.github/workflows/ci.yml: each job runs the modules in its ``tests:``) covers
  every test module pytest collects with no arguments (what ``.ci/run`` and ``scripts/test.sh`` run),
  each once, and names none that does not exist;
* Hypothesis runs derandomized, with the failure blob, when CI=true (tests/conftest.py's profile);
* the run lints first (scripts/lint.sh: formatter, linter, mypy, shellcheck, actionlint), each check
  failing the run on its own kind of mistake, and the workflow passes actionlint's checks.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def matrix_jobs() -> list[dict[str, str]]:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = workflow["jobs"]["tests"]
    # The matrix is what runs only if the step passes each job's modules to the test script.
    runs = [step.get("run", "") for step in job["steps"]]
    assert "bash scripts/test.sh ${{ matrix.tests }}" in runs, runs
    return job["strategy"]["matrix"]["include"]


def collected_modules(config: pytest.Config) -> set[str]:
    """The test modules pytest collects with no arguments: every file under ``testpaths`` whose
    name matches ``python_files`` (read from pytest's own configuration)."""
    patterns = config.getini("python_files")
    found = set()
    for testpath in config.getini("testpaths"):
        for path in (ROOT / testpath).rglob("*.py"):
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in patterns):
                found.add(path.relative_to(ROOT).as_posix())
    return found


def test_every_test_module_is_in_exactly_one_ci_job_and_every_listed_module_exists(pytestconfig: pytest.Config) -> None:
    jobs = matrix_jobs()
    assert jobs and all(job["suite"] and job["tests"].split() for job in jobs), jobs
    listed = [module for job in jobs for module in job["tests"].split()]
    modules = collected_modules(pytestconfig)
    assert "tests/test_ci.py" in modules and len(modules) > 20  # the collection found the suite
    missing = sorted(modules - set(listed))
    assert not missing, f"test modules in no job of {WORKFLOW.relative_to(ROOT)}: {missing}"
    unknown = sorted(set(listed) - modules)
    assert not unknown, f"{WORKFLOW.relative_to(ROOT)} names modules pytest does not collect: {unknown}"
    twice = sorted({m for m in listed if listed.count(m) > 1})
    assert not twice, f"modules in more than one job (run twice): {twice}"


def test_ci_run_runs_the_whole_suite() -> None:
    """``.ci/run`` runs the test script with no arguments: pytest's ``testpaths``, every module the
    matrix splits into jobs (checked above)."""
    commands = [
        shlex.split(line)
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert ["exec", "bash", "scripts/test.sh"] in commands, commands
    script = (ROOT / "scripts" / "test.sh").read_text()
    assert '-m pytest -p no:cacheprovider -ra "$@"' in script


# ---- scripts/lint.sh ---------------------------------------------------------------------------

VENV_BIN = Path(sys.executable).parent
# actionlint's own checks: jactionlint's other profiles add policy rules (pinned SHAs, permissions).
ACTIONLINT = [
    str(VENV_BIN / "jactionlint"),
    "--profile",
    "correctness",
    "--shellcheck",
    str(VENV_BIN / "shellcheck"),
    "--ruff",
    str(VENV_BIN / "ruff"),
]


def test_ci_run_lints_after_installing_and_before_the_tests() -> None:
    lines = [line.strip() for line in (ROOT / "scripts" / "test.sh").read_text().splitlines()]
    install, linting = lines.index("bash scripts/install.sh"), lines.index("bash scripts/lint.sh")
    testing = next(n for n, line in enumerate(lines) if "-m pytest" in line)
    assert install < linting < testing, lines  # under `set -e`: a lint failure ends the run


def test_the_workflow_passes_actionlint_and_actionlint_catches_a_broken_one(tmp_path: Path) -> None:
    out = subprocess.run([*ACTIONLINT, str(WORKFLOW)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    # Control: the same workflow reading a matrix key that does not exist.
    broken = tmp_path / "ci.yml"
    broken.write_text(WORKFLOW.read_text().replace("${{ matrix.tests }}", "${{ matrix.test }}"))
    out = subprocess.run([*ACTIONLINT, str(broken)], capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1 and 'property "test" is not defined' in out.stdout, out.stdout + out.stderr


def lint_tree(root: Path, module: str, workflow: str, script: str) -> None:
    """A project of one module, laid out as scripts/lint.sh expects, with this repository's ruff
    configuration and the suite's virtualenv."""
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "lint.sh").write_text((ROOT / "scripts" / "lint.sh").read_text())
    (root / "scripts" / "build.sh").write_text(script)
    (root / ".ci").mkdir()
    (root / ".ci" / "run").write_text("#!/usr/bin/env bash\nexec bash scripts/build.sh\n")
    (root / ".github" / "workflows").mkdir(parents=True)
    (root / ".github" / "workflows" / "ci.yml").write_text(workflow)
    pyproject = (ROOT / "pyproject.toml").read_text()
    ruff = pyproject[pyproject.index("[tool.ruff]") :]
    assert "[tool.mypy]" not in ruff, "keep the [tool.ruff] sections last in pyproject.toml"
    (root / "pyproject.toml").write_text(f'[tool.mypy]\nfiles = ["mod.py"]\n\n{ruff}')
    (root / "mod.py").write_text(module)
    (root / ".venv").symlink_to(VENV_BIN.parent)


def lint(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/lint.sh", *args], cwd=root, capture_output=True, text=True, timeout=300, check=False
    )


def test_lint_fails_on_each_kind_of_mistake_and_fix_repairs_the_formatting(tmp_path: Path) -> None:
    tidy = "import sys\n\n\ndef argc() -> int:\n    return len(sys.argv)\n"
    untidy = "import sys\nimport os\ndef argc( )->int:\n    return len( sys.argv )\n"  # unsorted, unused, unformatted
    workflow = WORKFLOW.read_text()
    lint_tree(tmp_path / "clean", tidy, workflow, '#!/usr/bin/env bash\necho "$1"\n')
    out = lint(tmp_path / "clean")
    assert out.returncode == 0, out.stdout + out.stderr

    bad = tmp_path / "bad"
    lint_tree(
        bad,
        untidy + 'def name() -> int:\n    return "x"\n',
        workflow.replace("${{ matrix.tests }}", "${{ matrix.test }}"),
        "#!/usr/bin/env bash\necho $1\n",
    )
    out = lint(bad)
    assert out.returncode == 1
    failed = [line for line in out.stderr.splitlines() if line.startswith("lint failed: ")]
    assert failed == [
        f"lint failed: {name}" for name in ("ruff format", "ruff check", "mypy", "shellcheck", "actionlint")
    ], out.stdout + out.stderr
    assert "I001" in out.stdout and "F401" in out.stdout, out.stdout  # import sorting, unused import

    # --fix sorts the imports, drops the unused one and formats; the type error is left to a person.
    out = lint(bad, "--fix")
    assert (bad / "mod.py").read_text().startswith(tidy), (bad / "mod.py").read_text()
    failed = [line for line in out.stderr.splitlines() if line.startswith("lint failed: ")]
    assert failed == ["lint failed: mypy", "lint failed: shellcheck", "lint failed: actionlint"], out.stderr


# ---- Hypothesis's CI profile --------------------------------------------------------------------

# Run in a fresh interpreter (the profile is chosen when tests/conftest.py is imported): the
# profile loaded, the fuzz modules' settings (created at their import), and the inputs a
# Hypothesis test draws.
PROBE = r"""
import json
import tests.conftest
from hypothesis import given, settings, strategies as st
import tests.test_fuzz as fuzz, tests.test_fuzz_multimodal as fuzz_mm

drawn = []

@settings(max_examples=25, database=None)
@given(st.integers() | st.text())
def probe(x):
    drawn.append(x)

probe()
print("@@" + json.dumps({
    "profile": settings.get_current_profile_name(),
    "ours": settings.default is tests.conftest.HYPOTHESIS_CI,
    "fuzz": {name: [s.derandomize, s.print_blob, s.max_examples, s.database is None]
             for name, s in [("FUZZ", fuzz.FUZZ), ("BUS_FUZZ", fuzz.BUS_FUZZ),
                             ("mm BUS_FUZZ", fuzz_mm.BUS_FUZZ), ("mm RAW_FUZZ", fuzz_mm.RAW_FUZZ)]},
    "drawn": repr(drawn),
}))
"""


def probe(ci: str | None, cwd: Path) -> dict[str, Any]:
    # Only what the interpreter needs: no variable Hypothesis reads as "in CI" (GITHUB_ACTIONS, ...).
    # Run in ``cwd``: Hypothesis keeps a cache directory (.hypothesis) in the working directory.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "PYTHONPATH": str(ROOT)}
    if ci is not None:
        env["CI"] = ci
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )  # its output says what went wrong
    line = next((line for line in out.stdout.splitlines() if line.startswith("@@")), None)
    assert line, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(line[2:])


def test_hypothesis_runs_derandomized_with_the_failure_blob_when_ci_is_true(tmp_path: Path) -> None:
    first, second = probe("true", tmp_path), probe("true", tmp_path)
    # tests/conftest.py's profile itself (not only Hypothesis's built-in "ci" one, which it replaces).
    assert first["profile"] == "ci" and first["ours"] is True
    # Every fuzz settings object took the profile and kept its own example counts.
    assert first["fuzz"] == {
        "FUZZ": [True, True, 150, True],
        "BUS_FUZZ": [True, True, 60, True],
        "mm BUS_FUZZ": [True, True, 100, True],
        "mm RAW_FUZZ": [True, True, 30, True],
    }
    assert first["drawn"] == second["drawn"]  # the same inputs on every CI run

    # Control: outside CI the inputs are random on every run (and the settings not derandomized).
    local, again = probe(None, tmp_path), probe(None, tmp_path)
    assert local["profile"] == "default" and local["ours"] is False
    assert all(not derandomized for derandomized, *_ in local["fuzz"].values()), local["fuzz"]
    assert local["drawn"] != again["drawn"]
