"""The schedule: rounds in alternating side order (ABAB), one server at a time, warm-up first.

Round r runs every side once, in the configured order for even r and reversed for odd r. A
server side is a *session*: start, wait until served, warm up, then ``repeats`` passes over the
concurrency levels, then stop. Before each session we wait (bounded) for vLLM engines we did
not start; anything seen, and the CPU used by other processes during each level, is recorded.
After the rounds, optional profile sessions sample the server processes with py-spy at
concurrency 16 (not counted as measurements).
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks import machine, profiling, report
from benchmarks.config import BenchConfig
from benchmarks.load import run_level
from benchmarks.offline import ALL_AT_ONCE, run_offline
from benchmarks.servers import SERVERS, Server, ServerFailed

PROFILE_CONCURRENCY = 16


def _source(side: str, cfg: BenchConfig) -> Path | None:
    return Path(cfg.dynamo_source) if side.startswith("dynamo") and cfg.dynamo_source else None


def _warm_up(server: Server, prompts: list[list[int]], cfg: BenchConfig) -> dict[str, Any]:
    run = asyncio.run(
        run_level(
            server.base_url,
            "demo",
            prompts,
            concurrency=cfg.warmup_concurrency,
            requests=cfg.warmup_requests,
            max_tokens=cfg.max_tokens,
            max_seconds=60,
            request_timeout=cfg.request_timeout,
        )
    )
    summary = report.summarize_run(run)
    if summary["completed"] == 0:
        raise RuntimeError(f"{server.side}: every warm-up request failed: {summary['first_errors']}")
    return summary


def server_session(
    side: str, round_no: int, model: str, prompts: list[list[int]], cfg: BenchConfig, work_root: Path, log: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One start-measure-stop session of a server side: its samples and a session record."""
    server = SERVERS[side](model, work_root, log, source=_source(side, cfg))
    samples: list[dict[str, Any]] = []
    session: dict[str, Any] = {"side": side, "round": round_no, "log_dir": str(server.log_dir)}
    try:
        session["ready_s"] = round(server.start(cfg.startup_timeout), 1)
        session["first_answer_s"] = round(server.first_answer(prompts[0]), 2)
        log(
            f"  {side} serving after {session['ready_s']}s on {server.base_url}; first answer after "
            f"{session['first_answer_s']}s"
        )
        session["warmup"] = _warm_up(server, prompts, cfg)
        labels = server.labelled_pids()
        session["processes"] = {str(pid): label for pid, label in labels.items()}
        for repeat in range(cfg.repeats):
            for plan in cfg.levels:
                foreign = machine.foreign_engines(labels)
                meter = machine.CpuMeter(labels)
                probe = machine.StallProbe()
                probe.start()
                meter.start()
                with machine.client_priority(cfg.client_priority) as priority:
                    run = asyncio.run(
                        run_level(
                            server.base_url,
                            "demo",
                            prompts,
                            concurrency=plan.concurrency,
                            requests=plan.requests,
                            max_tokens=cfg.max_tokens,
                            max_seconds=plan.max_seconds,
                            request_timeout=cfg.request_timeout,
                        )
                    )
                cpu = meter.stop(run.client_cpu)
                stalls = probe.stop()
                s = report.summarize_run(run)
                s.update(
                    side=side,
                    round=round_no,
                    repeat=repeat,
                    concurrency=plan.concurrency,
                    cpu=cpu,
                    client_priority=priority,
                    machine_stalls=stalls,
                    foreign_engines=foreign,
                    raw=report.raw_requests(run),
                )
                samples.append(s)
                log(
                    f"  {side} r{round_no} rep{repeat} c={plan.concurrency}: {s['tok_per_s']:,.0f} tok/s, "
                    f"{s['req_per_s']:.1f} req/s, TTFT p50 {s['ttft_p50_ms'] or 0:.1f} ms, "
                    f"ITL p50 {s['itl_p50_ms'] or 0:.2f} ms, client {cpu['client_cores']:.2f} cores, "
                    f"others {cpu['other_cores']:.2f} cores, "
                    f"client loop lag max {s['client_loop_lag_max_ms'] or 0:.0f} ms, "
                    f"machine stalls {stalls.get('stalls', '?')} (max {stalls.get('max_stall_ms', 0):.0f} ms)"
                    + (f", {s['errors']} errors {s['first_errors']}" if s["errors"] else "")
                    + (f", {len(foreign)} foreign engine procs" if foreign else "")
                )
    finally:
        server.stop()
    return samples, session


def offline_session(
    round_no: int, model: str, prompts: list[list[int]], cfg: BenchConfig, work_root: Path, log: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    levels = [(p.concurrency, p.requests) for p in cfg.levels]
    levels.append((ALL_AT_ONCE, max(p.requests for p in cfg.levels)))
    budget = cfg.startup_timeout + sum(p.max_seconds for p in cfg.levels) * cfg.repeats + 120
    result = run_offline(model, prompts, levels, cfg.repeats, cfg.max_tokens, work_root, budget, log)
    samples = []
    for raw in result["samples"]:
        s = report.summarize_offline(raw)
        s.update(side="offline", round=round_no, repeat=raw["repeat"], concurrency=raw["concurrency"])
        samples.append(s)
        log(f"  offline r{round_no} rep{raw['repeat']} c={raw['concurrency'] or 'all'}: {s['tok_per_s']:,.0f} tok/s")
    return samples, {
        "side": "offline",
        "round": round_no,
        "ready_s": result["ready_s"],
        "total_s": result["total_s"],
        "log": result["log"],
    }


def profile_session(
    side: str, model: str, prompts: list[list[int]], cfg: BenchConfig, work_root: Path, log: Any
) -> dict[str, Any]:
    """Sample the side's Python processes with py-spy during a concurrency-16 load."""
    server = SERVERS[side](model, work_root, log, source=_source(side, cfg))
    out: dict[str, Any] = {}
    try:
        server.start(cfg.startup_timeout)
        _warm_up(server, prompts, cfg)
        labels = server.labelled_pids()
        targets = server.profile_targets()
        seconds = cfg.profile_seconds
        spies = {
            name: (
                profiling.start(pid, seconds, server.log_dir / f"profile-{name}.txt"),
                server.log_dir / f"profile-{name}.txt",
            )
            for name, pid in targets.items()
        }
        time.sleep(1.0)  # py-spy attaches
        meter = machine.CpuMeter(labels)
        meter.start()
        with machine.client_priority(cfg.client_priority):
            run = asyncio.run(
                run_level(
                    server.base_url,
                    "demo",
                    prompts,
                    concurrency=PROFILE_CONCURRENCY,
                    requests=10**6,
                    max_tokens=cfg.max_tokens,
                    max_seconds=seconds - 2,
                    request_timeout=cfg.request_timeout,
                )
            )
        cpu = meter.stop(run.client_cpu)
        for proc, _ in spies.values():
            try:
                proc.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        s = report.summarize_run(run)
        out = {
            "load": {k: s[k] for k in ("completed", "errors", "tok_per_s", "req_per_s", "ttft_p50_ms", "itl_p50_ms")},
            "cpu": cpu,
            "processes": {name: profiling.summarize(path, seconds) for name, (_, path) in spies.items()},
            "files": {name: str(path) for name, (_, path) in spies.items()},
        }
        log(f"  profiled {side} at c={PROFILE_CONCURRENCY}: {s['tok_per_s']:,.0f} tok/s under py-spy")
    except Exception as exc:  # noqa: BLE001 -- a profile is a bonus: report it, keep the measurements
        out = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"  profiling {side} failed: {out['error']}")
    finally:
        server.stop()
    return out


def _wait_quiet(max_wait: float, cfg: BenchConfig, side: str, log: Any) -> dict[str, Any]:
    waited = machine.wait_for_quiet(max_wait, cfg.foreign_poll, log)
    if not waited["quiet"]:
        log(
            f"  note: starting {side} beside other work after waiting {waited['waited_s']}s: "
            f"{len(waited['engines_after_wait'])} foreign engine process(es), busy "
            f"{[b['cmd'][:50] for b in waited['busy_after_wait']]}"
        )
    elif waited["waited_s"] > 1:
        log(f"  machine quiet after waiting {waited['waited_s']}s")
    return waited


def run(
    cfg: BenchConfig, model: str, prompts: list[list[int]], work_root: Path, log: Any, checkpoint: Any = None
) -> dict[str, Any]:
    """All rounds (and profiles); returns the raw result dict. ``checkpoint(partial)`` after each session."""
    samples: list[dict[str, Any]] = []
    sessions: list[dict[str, Any]] = []
    for round_no in range(cfg.rounds):
        order = list(cfg.sides) if round_no % 2 == 0 else list(reversed(cfg.sides))
        log(f"round {round_no + 1}/{cfg.rounds}: {' -> '.join(order)}")
        for i, side in enumerate(order):
            # Before a round: wait up to foreign_wait for other people's engines; between the
            # sessions of a round, only up to session_wait (the run must end in bounded time).
            waited = _wait_quiet(cfg.foreign_wait if i == 0 else cfg.session_wait, cfg, side, log)
            started = time.monotonic()
            if side == "offline":
                got, session = offline_session(round_no, model, prompts, cfg, work_root, log)
            else:
                try:
                    got, session = server_session(side, round_no, model, prompts, cfg, work_root, log)
                except ServerFailed as exc:  # e.g. a shared venv caught mid-reinstall: one more try
                    log(f"  {exc}; trying once more in 30s")
                    time.sleep(30)
                    got, session = server_session(side, round_no, model, prompts, cfg, work_root, log)
                    session["retried_after"] = str(exc)
            session.update(foreign_before=waited, session_s=round(time.monotonic() - started, 1))
            samples += got
            sessions.append(session)
            if checkpoint is not None:
                checkpoint({"samples": samples, "sessions": sessions, "profiles": {}})
    profiles: dict[str, Any] = {}
    if cfg.profile:
        if profiling.py_spy() is None:
            profiles["error"] = "py-spy is not installed (pip install -e '.[bench]')"
        else:
            for side in ("dynamo", "dynamo-disagg", "vllm-serve"):
                if side in cfg.sides:
                    _wait_quiet(cfg.session_wait, cfg, side, log)
                    profiles[side] = profile_session(side, model, prompts, cfg, work_root, log)
    return {"samples": samples, "sessions": sessions, "profiles": profiles}
