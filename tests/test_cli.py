"""The command line: listing roles, help, role selection and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import run_cli, worker_env

BUILT_IN = {"decode", "prefill", "processor", "encode", "ec-encoder", "frontend"}


def test_list_roles_shows_built_in_and_third_party_roles_with_their_distributions() -> None:
    out = run_cli("--list-roles")
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert BUILT_IN | {"echo"} <= set(lines)
    assert "(dynamo-worker 0.1.0)" in lines["prefill"]
    assert "(dynamo-worker-echo 0.1.0)" in lines["echo"]
    assert "Streams each request's token ids back" in lines["echo"]


def test_list_roles_json_has_name_description_distribution_version() -> None:
    out = run_cli("--list-roles", "--json")
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["echo"]["distribution"] == "dynamo-worker-echo"
    assert rows["decode"]["version"] == "0.1.0"
    assert all(r["description"] for r in rows.values())


def _modules_loaded_by(*argv: str) -> set[str]:
    """Heavy libraries and role modules imported by running the CLI with ``argv``."""
    code = (
        "import sys\n"
        "from dynamo_worker.cli import main\n"
        f"try:\n    main({list(argv)!r})\nexcept SystemExit:\n    pass\n"
        "loaded = [m for m in sys.modules if m in ('vllm', 'torch', 'transformers')"
        " or m.startswith('dynamo_worker.roles.')]\n"
        "print('@@', *loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    marker = [line for line in out.stdout.splitlines() if line.startswith("@@")]
    assert marker, out.stdout + out.stderr
    return set(marker[-1].split()[1:])


def test_help_and_list_roles_import_no_role_and_no_vllm_or_torch() -> None:
    assert _modules_loaded_by("--help") == set()
    assert _modules_loaded_by("--list-roles") == set()
    assert _modules_loaded_by("--disaggregation-mode", "prefill", "--help") <= {"dynamo_worker.roles.prefill"}


def test_role_help_imports_only_that_role_and_no_vllm_or_torch() -> None:
    for role in sorted(BUILT_IN):
        module = "dynamo_worker.roles." + role.replace("-", "_")
        assert _modules_loaded_by("--role", role, "--help") <= {module}


def test_role_help_shows_core_and_role_options() -> None:
    out = run_cli("--role", "echo", "--help")
    assert out.returncode == 0
    assert "--nats-url" in out.stdout and "--graceful-shutdown-timeout" in out.stdout
    assert "--echo-delay" in out.stdout


def test_unknown_role_lists_installed_roles_in_one_line() -> None:
    out = run_cli("--role", "nope")
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "unknown role 'nope'" in out.stderr
    assert "echo (dynamo-worker-echo 0.1.0)" in out.stderr and "decode (dynamo-worker 0.1.0)" in out.stderr


def test_debug_shows_the_traceback() -> None:
    out = run_cli("--role", "nope", "--debug")
    assert out.returncode != 0 and "Traceback" in out.stderr


def test_dynamo_alias_flags_select_the_role() -> None:
    out = run_cli("--multimodal-encode-worker", "--enable-multimodal", "--help")
    assert out.returncode == 0 and "encode role" in out.stdout
    out = run_cli("--vllm-native-encoder-worker", "--enable-multimodal", "--help")
    assert out.returncode == 0 and "ec-encoder role" in out.stdout and "--ec-storage-path" in out.stdout
    out = run_cli("--multimodal-processor", "--enable-multimodal", "--help")
    assert out.returncode == 0 and "--allowed-local-media-path" in out.stdout
    out = run_cli("--multimodal-worker", "--enable-multimodal", "--help")  # Dynamo's LLM worker of the chain
    assert out.returncode == 0 and "decode role" in out.stdout and "--ec-storage-path" in out.stdout


def test_disaggregation_mode_selects_the_role_as_dynamos_newest_worker() -> None:
    for mode, role in (("agg", "decode"), ("decode", "decode"), ("prefill", "prefill")):
        out = run_cli("--disaggregation-mode", mode, "--help")
        assert out.returncode == 0 and f"\n{role} role:" in out.stdout, (mode, out.stderr)
    out = run_cli("--disaggregation-mode", "encode", "--enable-multimodal", "--help")  # Dynamo's encode worker
    assert out.returncode == 0 and "\nencode role:" in out.stdout
    out = run_cli("--disaggregation-mode", "encode", "--model", "/nonexistent")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "--disaggregation-mode encode needs --enable-multimodal" in out.stderr
    out = run_cli("--disaggregation-mode", "split")
    assert out.returncode == 2 and "argument --disaggregation-mode: invalid choice: 'split'" in out.stderr


def test_disaggregation_mode_environment_variable_selects_the_role_or_names_itself() -> None:
    out = run_cli("--help", env=worker_env(DYN_VLLM_DISAGGREGATION_MODE="prefill"))
    assert out.returncode == 0
    out = run_cli("--engine-help", env=worker_env(DYN_VLLM_DISAGGREGATION_MODE="encode"))
    assert out.returncode == 2 and "DYN_VLLM_DISAGGREGATION_MODE=encode needs --enable-multimodal" in out.stderr
    out = run_cli("--role", "decode", env=worker_env(DYN_VLLM_DISAGGREGATION_MODE="prefill"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "--role decode and DYN_VLLM_DISAGGREGATION_MODE=prefill select different roles" in out.stderr
    out = run_cli("--model", "/nonexistent", env=worker_env(DYN_VLLM_DISAGGREGATION_MODE="pd"))
    assert out.returncode == 2 and out.stderr.strip() == (
        "dynamo-worker: error: --disaggregation-mode / DYN_VLLM_DISAGGREGATION_MODE 'pd' is invalid; "
        "use one of agg, prefill, decode, encode"
    )
    # Dynamo's frontend does not read its vLLM worker's variable, and neither does ours.
    out = run_cli("--role", "frontend", "--help", env=worker_env(DYN_VLLM_DISAGGREGATION_MODE="pd"))
    assert out.returncode == 0 and "\nfrontend role:" in out.stdout, out.stderr


def test_disaggregation_mode_conflicts_name_both_flags_in_one_line() -> None:
    for argv, message in (
        (["--role", "decode", "--disaggregation-mode", "prefill"], "--role decode and --disaggregation-mode prefill"),
        (
            ["--vllm-native-encoder-worker", "--enable-multimodal", "--disaggregation-mode", "encode"],
            "--vllm-native-encoder-worker and --disaggregation-mode encode select different roles",
        ),
        # Dynamo refuses its legacy role flags with --disaggregation-mode, even when they agree.
        (
            ["--is-prefill-worker", "--disaggregation-mode", "prefill"],
            "--is-prefill-worker and --disaggregation-mode prefill cannot be combined",
        ),
        (
            ["--multimodal-worker", "--enable-multimodal", "--disaggregation-mode", "decode"],
            "--multimodal-worker and --disaggregation-mode decode cannot be combined",
        ),
        (
            ["--multimodal-worker", "--enable-multimodal", "--disaggregation-mode", "prefill"],
            "--multimodal-worker with --disaggregation-mode prefill (Dynamo's multimodal prefill worker) is not",
        ),
    ):
        out = run_cli(*argv, "--model", "/nonexistent")
        assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert message in out.stderr, (argv, out.stderr)
    out = run_cli("--role", "encode", "--multimodal-encode-worker", "--disaggregation-mode", "encode", "--help")
    assert out.returncode == 0 and "\nencode role:" in out.stdout  # all three agree


def test_multimodal_roles_need_enable_multimodal_in_one_line() -> None:
    for argv, flag in (
        (["--multimodal-processor"], "--multimodal-processor"),
        (["--multimodal-encode-worker"], "--multimodal-encode-worker"),
        (["--vllm-native-encoder-worker"], "--vllm-native-encoder-worker"),
        (["--role", "encode"], "--role encode"),
        (["--multimodal-worker"], "--multimodal-worker"),
    ):
        out = run_cli(*argv, "--model", "/nonexistent")
        assert out.returncode == 2, out.stderr
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert f"{flag} needs --enable-multimodal; add --enable-multimodal" in out.stderr


def test_enable_multimodal_refuses_a_model_the_multimodal_roles_do_not_serve(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    for argv in (
        ["--enable-multimodal"],
        ["--vllm-native-encoder-worker", "--enable-multimodal", "--ec-storage-path", str(tmp_path)],
        ["--multimodal-encode-worker", "--enable-multimodal"],
    ):
        out = run_cli(*argv, "--model", str(tmp_path), "--nats-url", "nats://127.0.0.1:1")
        # vLLM's own import warnings may come first; the error is one line, without a traceback.
        errors = [line for line in out.stderr.splitlines() if line.startswith("dynamo-worker: error:")]
        assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
        assert f"model {tmp_path} (llama) is not one the multimodal roles serve (supported: blip-2" in out.stderr


def test_enable_multimodal_is_refused_by_roles_that_do_not_take_it() -> None:
    out = run_cli("--is-prefill-worker", "--enable-multimodal")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "--enable-multimodal does not apply to --is-prefill-worker" in out.stderr


def test_multimodal_role_flags_are_mutually_exclusive() -> None:
    out = run_cli("--multimodal-processor", "--vllm-native-encoder-worker", "--enable-multimodal")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "--multimodal-processor and --vllm-native-encoder-worker select different roles" in out.stderr


def test_multimodal_roles_check_their_model_before_serving() -> None:
    out = run_cli("--multimodal-encode-worker", "--enable-multimodal", "--nats-url", "nats://127.0.0.1:1")
    assert out.returncode == 2 and "--model is required" in out.stderr
    out = run_cli("--multimodal-processor", "--enable-multimodal", "--model", "/nonexistent")
    assert out.returncode == 2 and "cannot read /nonexistent/config.json" in out.stderr
    out = run_cli("--vllm-native-encoder-worker", "--enable-multimodal", "--model", "/nonexistent")
    assert out.returncode == 2 and "--model /nonexistent: no such directory" in out.stderr


def test_conflicting_role_flags_name_both() -> None:
    out = run_cli("--role", "decode", "--is-prefill-worker")
    assert out.returncode == 2
    assert "--role decode and --is-prefill-worker select different roles" in out.stderr
    out = run_cli("--multimodal-processor", "--multimodal-encode-worker", "--enable-multimodal")
    assert "--multimodal-processor and --multimodal-encode-worker" in out.stderr


def test_alias_agreeing_with_role_is_accepted() -> None:
    out = run_cli("--role", "prefill", "--is-prefill-worker")
    assert "select different roles" not in out.stderr


def test_bad_flag_values_are_one_line_errors_naming_the_flag() -> None:
    out = run_cli("--role", "echo", "--system-port", "70000")
    assert out.returncode == 2 and "--system-port 70000 is out of range" in out.stderr
    out = run_cli("--role", "echo", "--echo-delay", "-1")
    assert out.returncode == 2 and "--echo-delay must be 0 or more" in out.stderr
    out = run_cli("--role", "echo", "--no-such-flag")
    assert out.returncode == 2 and "unrecognized arguments: --no-such-flag" in out.stderr
    # An on/off variable with a typo is refused rather than read as off.
    out = run_cli("--role", "echo", env=worker_env(DYN_NATS_RANDOMIZE="ture"))
    assert out.returncode == 2, out.stderr
    assert "environment variable DYN_NATS_RANDOMIZE='ture' is invalid: use true or false" in out.stderr
    assert all("Traceback" not in o for o in (out.stderr,))


def test_bad_kv_router_knobs_are_one_line_errors_naming_the_flag() -> None:
    cases = [
        (("--kv-balance-requests", "-1"), {}, "--kv-balance-requests must be 0 or more (got -1.0)"),
        (
            ("--kv-balance-requests", "many"),
            {},
            "--kv-balance-requests: 'many' is neither a number of requests nor off",
        ),
        (("--kv-balance-ratio", "0.5"), {}, "--kv-balance-ratio must be at least 1 (got 0.5)"),
        ((), {"DYN_KV_PREFILL_QUEUE": "maybe"}, "environment variable DYN_KV_PREFILL_QUEUE='maybe' is invalid"),
        ((), {"DYN_BUSY_THRESHOLD": "2"}, "--busy-threshold must be above 0 and at most 1 (got 2.0)"),
    ]
    for flags, env, message in cases:
        out = run_cli("--role", "frontend", "--router-mode", "kv", *flags, env={**worker_env(), **env})
        assert out.returncode == 2, (flags, env, out.stderr)
        assert message in out.stderr.strip().splitlines()[-1], (flags, env, out.stderr)  # after argparse's usage


def test_unreachable_nats_is_one_line_naming_the_url() -> None:
    out = run_cli("--role", "echo", "--nats-url", "nats://127.0.0.1:1", "--nats-connect-timeout", "1")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "cannot reach the NATS server at nats://127.0.0.1:1" in out.stderr


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (relative) with its bytes (None for a directory)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _refusal(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dynamo-worker: error: demo-model "), out.stderr
    assert "--force" in lines[0] and out.stdout == ""
    return lines[0]


def test_demo_model_refuses_a_directory_holding_someone_elses_files(tmp_path: Path) -> None:
    target = tmp_path / "mine"
    (target / "notes").mkdir(parents=True)
    (target / "thesis.tex").write_bytes(b"\\documentclass{article}\x00\xff")
    (target / "notes" / "todo.txt").write_text("write the thesis\n")
    before = _tree(tmp_path)
    line = _refusal(run_cli("demo-model", str(target)))
    assert "not empty" in line and "dynamo_demo_model.json" in line
    _refusal(run_cli("demo-model", str(target), "--multimodal"))
    assert _tree(tmp_path) == before  # byte for byte, and nothing left beside it


def test_demo_model_refuses_a_file_at_path(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.write_bytes(b"not a model\n")
    assert "is a file" in _refusal(run_cli("demo-model", str(target)))
    assert target.read_bytes() == b"not a model\n" and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_demo_model_writes_into_an_empty_directory_replaces_its_own_and_force_replaces_anything(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    out = run_cli("demo-model", str(target), timeout=180)
    assert out.returncode == 0 and out.stdout.strip() == str(target), out.stderr
    first = _tree(target)
    assert "dynamo_demo_model.json" in first and "model.safetensors" in first
    # Over a demo model of ours: replaced (here by another seed) without --force.
    out = run_cli("demo-model", str(target), "--seed", "1", timeout=180)
    assert out.returncode == 0, out.stderr
    assert _tree(target)["model.safetensors"] != first["model.safetensors"]

    users = tmp_path / "users"
    users.mkdir()
    (users / "data.bin").write_bytes(b"\x01\x02")
    out = run_cli("demo-model", str(users), "--force", timeout=180)
    assert out.returncode == 0, out.stderr
    assert _tree(users) == first  # the same model as seed 0, and nothing of the user's left
    (tmp_path / "a-file").write_text("x")
    out = run_cli("demo-model", str(tmp_path / "a-file"), "--force", timeout=180)
    assert out.returncode == 0 and (tmp_path / "a-file" / "config.json").is_file(), out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "model", "users"]  # no temp dirs left
