"""Roles are found through the ``dynamo_worker.roles`` entry-point group, like a user's plugin.

Each test writes a real ``*.dist-info`` into a temp dir and puts it on the path of a real CLI
subprocess, so discovery runs exactly as it does for an installed distribution.
"""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_cli, worker_env, write_distribution

GOOD_ROLE = '''
from dynamo_worker.core.hookspecs import hookimpl

class AcmeRole:
    """Answers every request with the word acme."""
    name = "acme"

    @hookimpl
    def dynamo_worker_add_arguments(self, parser):
        parser.add_argument_group("acme role").add_argument("--acme-level", type=int, default=1)

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar, ctx):
        async def generate(request, context):
            yield {"text": "acme"}
        registrar.endpoint("generate", generate)
'''


def test_a_third_party_distribution_is_listed_without_being_imported(tmp_path: Path) -> None:
    # The module raises on import: listing must not import it.
    write_distribution(
        tmp_path,
        "acme-roles",
        "0.2.0",
        {"acme": "acme_roles:AcmeRole"},
        {"acme_roles": GOOD_ROLE + "\nraise RuntimeError('imported!')\n"},
    )
    out = run_cli("--list-roles", env=worker_env(tmp_path))
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("acme "))
    assert "Answers every request with the word acme." in line and "(acme-roles 0.2.0)" in line
    assert "(dynamo-worker 0.1.0)" in out.stdout


def test_third_party_role_options_appear_in_its_help(tmp_path: Path) -> None:
    write_distribution(tmp_path, "acme-roles", "0.2.0", {"acme": "acme_roles:AcmeRole"}, {"acme_roles": GOOD_ROLE})
    out = run_cli("--role", "acme", "--help", env=worker_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "--acme-level" in out.stdout and "--nats-url" in out.stdout


def test_two_distributions_claiming_one_role_name_is_an_error_listing_both(tmp_path: Path) -> None:
    write_distribution(tmp_path, "acme-roles", "0.2.0", {"acme": "acme_roles:AcmeRole"}, {"acme_roles": GOOD_ROLE})
    write_distribution(tmp_path, "other-roles", "1.0.0", {"acme": "other_roles:AcmeRole"}, {"other_roles": GOOD_ROLE})
    out = run_cli("--role", "acme", env=worker_env(tmp_path))
    assert out.returncode == 2
    assert "role 'acme' is declared by more than one distribution" in out.stderr
    assert "acme-roles 0.2.0 (acme_roles:AcmeRole)" in out.stderr
    assert "other-roles 1.0.0 (other_roles:AcmeRole)" in out.stderr
    assert out.stderr.count("\n") == 1


def test_a_role_that_fails_to_import_names_role_entry_point_distribution_and_cause(tmp_path: Path) -> None:
    write_distribution(
        tmp_path,
        "broken-roles",
        "0.3.0",
        {"broken": "broken_roles:BrokenRole"},
        {"broken_roles": "import does_not_exist_anywhere\n"},
    )
    out = run_cli("--role", "broken", env=worker_env(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    err = out.stderr
    assert "role 'broken' failed to import" in err and "'broken_roles:BrokenRole'" in err
    assert "broken-roles 0.3.0" in err and "No module named 'does_not_exist_anywhere'" in err
    debug = run_cli("--role", "broken", "--debug", env=worker_env(tmp_path))
    assert "ModuleNotFoundError" in debug.stderr and "The above exception was the direct cause" in debug.stderr


def test_a_role_missing_the_required_hook_is_an_error(tmp_path: Path) -> None:
    source = "class LazyRole:\n    name = 'lazy'\n"
    write_distribution(tmp_path, "lazy-roles", "0.1.0", {"lazy": "lazy_roles:LazyRole"}, {"lazy_roles": source})
    out = run_cli("--role", "lazy", env=worker_env(tmp_path))
    assert out.returncode == 2
    assert "role 'lazy' does not implement required hook(s) dynamo_worker_register_endpoints" in out.stderr


def test_a_misspelled_hook_fails_loudly(tmp_path: Path) -> None:
    source = GOOD_ROLE.replace("class AcmeRole:", "class AcmeRole:").replace(
        "def dynamo_worker_add_arguments", "def dynamo_worker_add_argument"
    )
    write_distribution(tmp_path, "typo-roles", "0.1.0", {"acme": "typo_roles:AcmeRole"}, {"typo_roles": source})
    out = run_cli("--role", "acme", env=worker_env(tmp_path))
    assert out.returncode == 2
    assert "role 'acme' is invalid" in out.stderr and "dynamo_worker_add_argument" in out.stderr


def test_a_role_whose_name_differs_from_its_entry_point_is_an_error(tmp_path: Path) -> None:
    write_distribution(tmp_path, "acme-roles", "0.2.0", {"acme2": "acme_roles:AcmeRole"}, {"acme_roles": GOOD_ROLE})
    out = run_cli("--role", "acme2", env=worker_env(tmp_path))
    assert out.returncode == 2 and "has name='acme'" in out.stderr
