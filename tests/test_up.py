"""``dynamo-worker up``: the whole stack from one command, driven with the official openai client.

One stack (nats-server, frontend, one decode worker on vLLM) for the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dynamo_worker.core.errors import RuntimeUnavailable
from dynamo_worker.core.runtime import Runtime
from tests.engine_helpers import offline_greedy_outputs
from tests.helpers import (
    DYNAMO_WORKER,
    free_port,
    process_name,
    run_cli,
    wait_until,
    worker_env,
)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class Stack:
    def __init__(self, proc: subprocess.Popen[str], port: int, log_dir: Path, cache: Path, out: Path) -> None:
        self.proc, self.port, self.log_dir, self.cache, self.out = proc, port, log_dir, cache, out
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0)

    def manifest(self) -> dict[str, Any]:
        return json.loads((self.log_dir / "stack.json").read_text())

    def worker_metric(self, name: str, **labels: str) -> float:
        port = self.manifest()["decode-0"]["system_port"]
        return self._metric(f"http://127.0.0.1:{port}/metrics", name, **labels)

    def frontend_metric(self, name: str, **labels: str) -> float:
        return self._metric(f"{self.base}/metrics", name, **labels)

    @staticmethod
    def _metric(url: str, name: str, **labels: str) -> float:
        body = urllib.request.urlopen(url).read().decode()
        return sum(
            s.value
            for fam in text_string_to_metric_families(body)
            for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def post(self, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(self.base + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)


@contextmanager
def up_stack(base: Path, *args: str, temp_log_dir: bool = False) -> Iterator[Stack]:
    """``dynamo-worker up ARGS`` with its own port, log dir and cache under ``base``, until ready.

    ``temp_log_dir``: no ``--log-dir``; up makes its own temp directory (under ``base/tmp``).
    """
    port, log_dir, cache, out = free_port(), base / "logs", base / "cache", base / "up.out"
    env = worker_env(XDG_CACHE_HOME=str(cache))
    log_flags = ["--log-dir", str(log_dir)]
    if temp_log_dir:
        log_flags = []
        env["TMPDIR"] = str(base / "tmp")
        (base / "tmp").mkdir()
    with open(out, "w") as stdout:
        proc = subprocess.Popen(
            [DYNAMO_WORKER, "up", "--http-port", str(port), *log_flags, "--namespace", f"up{port}", *args],
            stdout=stdout,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    s = Stack(proc, port, log_dir, cache, out)

    def ready() -> bool:
        assert proc.poll() is None, out.read_text()
        return "ready in" in out.read_text()

    try:
        wait_until(ready, 300, interval=0.5, what="dynamo-worker up to be ready")
        if temp_log_dir:
            s.log_dir = Path(re.search(r"logs in (\S+)", out.read_text())[1])
        yield s
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(90)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # No --log-dir, as users run it: the last test checks that the temp directory goes on stop.
    # --router-mode kv: with one decode worker every mode routes alike, so the module's tests hold
    # in any; test_up_passes_its_router_mode_to_the_frontend checks kv is what the frontend runs.
    with up_stack(tmp_path_factory.mktemp("up"), "--max-num-seqs", "16", "--router-mode", "kv", temp_log_dir=True) as s:
        yield s


def test_up_generates_the_demo_model_once_and_prints_where_to_send_requests(stack: Stack) -> None:
    text = stack.out.read_text()
    assert "preparing the demo model" in text
    assert (stack.cache / "dynamo-worker" / "demo-model" / "config.json").exists()
    assert f"http://127.0.0.1:{stack.port}/v1" in text
    assert f"curl http://127.0.0.1:{stack.port}/v1/chat/completions" in text
    assert [m.id for m in stack.client.models.list().data] == ["demo"]


def test_chat_and_completions_stream_and_not_through_the_openai_client(stack: Stack) -> None:
    messages = [{"role": "user", "content": "Tell me a story."}]
    chat = stack.client.chat.completions.create(model="demo", messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 12
    streamed = stack.client.chat.completions.create(
        model="demo",
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(streamed)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens

    completion = stack.client.completions.create(
        model="demo", prompt="the little bird", max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    assert completion.usage.completion_tokens == 10 and completion.choices[0].finish_reason == "length"
    pieces = [
        c.choices[0].text
        for c in stack.client.completions.create(
            model="demo",
            prompt="the little bird",
            max_tokens=10,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    ]
    assert "".join(pieces) == completion.choices[0].text


def test_up_passes_its_router_mode_to_the_frontend(stack: Stack) -> None:
    """The module's stack runs ``up --router-mode kv``: its frontend follows the worker's KV events
    and predicts a repeated prompt's cached prefix, which only the kv router does."""
    rng = random.Random(17)
    prompt = [0] + [rng.randrange(3, 500) for _ in range(299)]
    stack.client.completions.create(model="demo", prompt=prompt, max_tokens=2, temperature=0)
    wait_until(
        lambda: stack.frontend_metric("dynamo_frontend_kv_index_blocks") > 0,
        15,
        what="the frontend's KV index holding the prompt's blocks",
    )
    predicted = stack.frontend_metric("dynamo_frontend_kv_predicted_cached_tokens_total")
    again = stack.client.completions.create(model="demo", prompt=prompt + [5], max_tokens=2, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached and cached >= 128, again.usage
    assert stack.frontend_metric("dynamo_frontend_kv_predicted_cached_tokens_total") - predicted == cached


def test_greedy_output_equals_the_offline_engine_for_the_same_prompt_ids(stack: Stack, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model = str(stack.cache / "dynamo-worker" / "demo-model")
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompts = [tokenizer.encode("the quick river sings"), tokenizer.encode("a tiny robot walks home")]
    reference = offline_greedy_outputs(model, prompts, 16, tmp_path)
    assert reference[0]["ids"] != reference[1]["ids"], "control: different prompts must give different output"
    for prompt, expected in zip(prompts, reference):
        got = stack.client.completions.create(
            model="demo", prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        # vLLM's own text: a character the output stops inside is dropped, not U+FFFD.
        assert got.choices[0].text == expected["text"]


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{not json", 400, "JSON"),
        (json.dumps({"model": "demo", "prompt": "hi", "max_tokens": -3}).encode(), 400, "max_tokens"),
        (json.dumps({"model": "nope", "prompt": "hi"}).encode(), 404, "nope"),
        (json.dumps({"model": "demo", "prompt": "word " * 600}).encode(), 400, "maximum context length is 512 tokens"),
    ],
)
def test_bad_requests_get_the_right_status_and_the_stack_keeps_serving(
    stack: Stack, body: bytes, status: int, fragment: str
) -> None:
    code, error = stack.post("/v1/completions", body)
    assert code == status and fragment in error["error"]["message"], error
    ok = stack.client.completions.create(model="demo", prompt="hello", max_tokens=2, temperature=0)
    assert ok.choices[0].text is not None


def test_a_client_disconnect_mid_stream_aborts_the_request_on_the_worker(stack: Stack) -> None:
    def cancelled() -> float:
        return stack.worker_metric("dynamo_component_errors_total", error_type="cancelled")

    before = cancelled()
    # One disconnect that lands while the worker still generates is the proof; on a loaded
    # machine a 400-token request may finish first, so try a few times.
    for _ in range(5):
        stream = stack.client.completions.create(
            model="demo",
            prompt="once upon a time",
            max_tokens=400,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        next(iter(stream))
        stream.close()
        time.sleep(0.5)
        if cancelled() > before:
            break
    assert cancelled() == before + 1
    wait_until(
        lambda: stack.worker_metric("dynamo_component_inflight_requests", dynamo_endpoint="generate") == 0,
        15,
        what="no request left in flight on the worker",
    )


def test_up_listens_on_localhost_only_and_its_nats_needs_the_generated_token(stack: Stack) -> None:
    manifest = stack.manifest()
    config = next(Path(a) for a in psutil.Process(manifest["nats"]["pid"]).cmdline() if a.endswith("nats.conf"))
    assert config.stat().st_mode & 0o777 == 0o600  # only this user reads the token
    assert (stack.log_dir / "stack.json").stat().st_mode & 0o777 == 0o600
    # Written atomically: no temp file of the writer is left beside them.
    assert not [p.name for p in stack.log_dir.iterdir() if p.name.endswith(".tmp")]
    token = config.read_text().split('token: "')[1].split('"')[0]
    assert len(token) >= 32
    # The request plane's limit is sized for the largest body the frontend accepts (4 MiB).
    assert "max_payload: 8388608" in config.read_text()
    assert "is above the request plane's" not in (stack.log_dir / "frontend.log").read_text()
    # The TCP request plane has a secret of its own, the same in every child, in no command line.
    secrets = {
        psutil.Process(manifest[name]["pid"]).environ()["DYN_REQUEST_PLANE_TOKEN"] for name in ("frontend", "decode-0")
    }
    assert len(secrets) == 1 and len(secrets.pop()) >= 32
    for name in ("frontend", "decode-0"):
        child = psutil.Process(manifest[name]["pid"])
        env = child.environ()
        assert env["NATS_AUTH_TOKEN"] == token and token not in env["NATS_SERVER"]
        assert not any(token in arg for arg in child.cmdline())
    # Every listening socket of the stack (NATS, frontend, status servers, vLLM's) is on loopback.
    pids = descendants(stack.proc.pid) | {stack.proc.pid}
    listening = [c for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert listening and all(c.laddr.ip in ("127.0.0.1", "::1") for c in listening), listening
    nats_port = next(c.laddr.port for c in listening if c.pid == manifest["nats"]["pid"])
    # Requests take the TCP request plane (up's default): the frontend holds a connection
    # straight to a port the decode worker listens on.
    worker_ports = {c.laddr.port for c in listening if c.pid == manifest["decode-0"]["pid"]}
    frontend_peers = {
        c.raddr.port
        for c in psutil.Process(manifest["frontend"]["pid"]).net_connections("inet")
        if c.status == psutil.CONN_ESTABLISHED and c.raddr
    }
    assert worker_ports & frontend_peers, (worker_ports, frontend_peers)
    with pytest.raises(RuntimeUnavailable):
        asyncio.run(Runtime.connect(f"nats://127.0.0.1:{nats_port}", "x", timeout=3))


def test_sigterm_stops_everything_and_leaves_no_process_behind(stack: Stack) -> None:
    # Runs last in this module: it ends the stack.
    everyone = descendants(stack.proc.pid)
    names = {Path(f"/proc/{p}/comm").read_text().strip() for p in everyone if alive(p)}
    assert "nats-server" in names and any("VLLM" in n or "EngineCore" in n for n in names), names
    assert stack.log_dir.is_dir() and (stack.log_dir / "jetstream").is_dir()
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(90) == 0
    out = stack.out.read_text()
    assert "stopping: workers first" in out and "stopped." in out
    wait_until(lambda: not any(alive(p) for p in everyone), 10, what="every child process to exit")
    # A clean stop removes the temp log directory up made (no --log-dir): nothing failed.
    assert "logs kept" not in out
    assert not stack.log_dir.exists(), sorted(p.name for p in stack.log_dir.iterdir())


def test_up_flag_mistakes_are_one_line_errors() -> None:
    out = run_cli("up", "--prefill-workers", "-1")
    assert out.returncode == 2 and "--prefill-workers must be 0 or more" in out.stderr
    out = run_cli("up", "--model", "/no/such/dir")
    assert out.returncode == 2 and "--model /no/such/dir: no such directory" in out.stderr
    out = run_cli("up", "--decode-workers", "0")
    assert out.returncode == 2 and "--decode-workers must be at least 1" in out.stderr
    out = run_cli("up", "--max-request-bytes", str(40 * 1024 * 1024))
    assert out.returncode == 2 and "NATS carries at most 67108864 bytes per message" in out.stderr
    out = run_cli("up", "--enable-auto-tool-choice")  # as vllm serve: auto tool choice needs a parser
    assert out.returncode == 2 and "--enable-auto-tool-choice requires --tool-call-parser" in out.stderr
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        out = run_cli("up", "--http-port", str(busy.getsockname()[1]))
    assert out.returncode == 2 and "is in use" in out.stderr
    assert all(line.startswith("dynamo-worker: error:") for line in out.stderr.strip().splitlines())


def test_a_failed_start_keeps_the_temp_log_dir_and_removes_the_scratch_state(tmp_path: Path) -> None:
    # The workers fail fast on a directory that holds no model; no engine loads.
    (tmp_path / "empty").mkdir()
    (tmp_path / "tmp").mkdir()
    out = run_cli(
        "up",
        "--model",
        str(tmp_path / "empty"),
        "--prefill-workers",
        "1",
        "--http-port",
        str(free_port()),
        "--namespace",
        f"up{os.getpid()}",
        env=worker_env(TMPDIR=str(tmp_path / "tmp")),
        timeout=180,
    )
    assert out.returncode == 1, out.stderr
    failed = re.search(r"exited with status 1 during start-up; last lines of (\S+):", out.stderr)
    kept = re.search(r"^logs kept in (\S+)", out.stderr, re.MULTILINE)
    assert failed and kept, out.stderr
    log_dir = Path(kept[1])
    assert log_dir.parent == tmp_path / "tmp"
    # The log the error pointed to is still there to read.
    assert Path(failed[1]).parent == log_dir
    assert "Invalid repository ID or local directory" in Path(failed[1]).read_text()
    assert (log_dir / "stack.json").is_file()
    # The KV connector's files, the JetStream store and the token's file go even so.
    assert not {"kv-shared", "jetstream", "nats.conf"} & {p.name for p in log_dir.iterdir()}


def test_a_sigkilled_up_leaves_no_process_behind(tmp_path: Path) -> None:
    # Runs after test_sigterm_stops_everything_and_leaves_no_process_behind ended the module's
    # stack: one engine at a time.
    everyone: set[int] = set()
    try:
        with up_stack(tmp_path, "--max-num-seqs", "4") as stack:
            pids = {child["pid"] for child in stack.manifest().values()}
            everyone = descendants(stack.proc.pid)
            assert pids <= everyone and len(everyone) > len(pids), (pids, everyone)  # engine cores too
            # nats-server and every worker lead sessions of their own: when up dies nothing but
            # the kernel (PR_SET_PDEATHSIG) signals them.
            assert all(os.getsid(pid) == pid for pid in pids)
            stack.proc.kill()
            stack.proc.wait(10)
            deadline = time.monotonic() + 5
            while any(alive(p) for p in everyone) and time.monotonic() < deadline:
                time.sleep(0.1)
            survivors = {p: process_name(p) for p in everyone if alive(p)}
            assert not survivors, f"still running 5 s after up was SIGKILLed: {survivors}"
    finally:
        for pid in everyone:  # the stack's own processes, should the assertion have failed
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
