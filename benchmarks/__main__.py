"""``python -m benchmarks``: offline vLLM vs ``vllm serve`` vs ``dynamo-worker up`` on one load.

Run from the repo root with the venv's python. Prints a table per concurrency and writes
``benchmarks/results/<timestamp>.json`` (raw samples, per-request times, CPU per process,
profiles) and ``<timestamp>.png`` beside it. ``--kv-routing`` adds the KV-aware routing section:
``python -m benchmarks.kv_routing`` with its defaults, after the rest, its results file recorded
in this run's JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import attrs

from benchmarks import extras, kv_routing, machine, profiling, report, rounds
from benchmarks.config import (
    BENCH_ENV,
    ENGINE_FLAGS,
    RESULTS_DIR,
    SIDES,
    BenchConfig,
    LevelPlan,
    measured_source,
    start_run,
)
from benchmarks.workload import make_prompts


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="a short smoke run: 1 round, 1 repeat, few requests, no profile"
    )
    p.add_argument("--concurrency", default="1,16,64", help="comma-separated levels (default %(default)s)")
    p.add_argument(
        "--requests",
        type=int,
        default=600,
        help="requests per level (default %(default)s: at concurrency 64 a level then lasts about 5 s, "
        "long enough that a start-up burst or one slow second does not decide the ratio)",
    )
    p.add_argument("--requests-c1", type=int, default=100, help="requests at concurrency 1 (default %(default)s)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="no new request starts after this long in one level (default %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=2, help="ABAB rounds, each side once per round (default %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="passes over the levels per session (default %(default)s)")
    p.add_argument("--sides", default=",".join(SIDES), help="which sides, in round-1 order (default %(default)s)")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=attrs.fields(BenchConfig).prompt_tokens.default,
        help="prompt length in token ids (default %(default)s: above one 128-token CPU KV block, "
        "so the disaggregated side really moves KV)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=attrs.fields(BenchConfig).max_tokens.default,
        help="output tokens per request (default %(default)s)",
    )
    p.add_argument("--no-extras", action="store_true", help="skip the request-plane and killed-worker measurements")
    p.add_argument("--seed", type=int, default=0, help="prompt seed (default %(default)s)")
    p.add_argument("--no-profile", action="store_true", help="skip the py-spy profile sessions")
    p.add_argument("--profile-seconds", type=float, default=20.0, help="py-spy sampling time (default %(default)s)")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    p.add_argument(
        "--foreign-wait",
        type=float,
        default=600.0,
        help="wait at most this long for vLLM engines we did not start (default %(default)s)",
    )
    p.add_argument(
        "--session-wait",
        type=float,
        default=120.0,
        help="between the sessions of a round, wait at most this long (default %(default)s)",
    )
    p.add_argument(
        "--client-priority",
        choices=("realtime", "nice", "normal"),
        default="realtime",
        help="scheduling of the load client's thread during levels (default %(default)s; see benchmarks/machine.py)",
    )
    p.add_argument(
        "--dynamo-ref",
        default="HEAD",
        help="git ref of dynamo_worker/ to measure, exported once so edits during the run do not "
        "change it; 'worktree' uses the live files (default %(default)s)",
    )
    p.add_argument(
        "--kv-routing",
        action="store_true",
        help="also run the KV-aware routing benchmark (python -m benchmarks.kv_routing, about 5 more "
        "minutes; with --quick, its --quick)",
    )
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default benchmarks/results)")
    return p.parse_args(argv)


def config(args: argparse.Namespace) -> BenchConfig:
    concurrencies = [int(c) for c in args.concurrency.split(",") if c.strip()]
    sides = tuple(s.strip() for s in args.sides.split(",") if s.strip())
    unknown = set(sides) - set(SIDES)
    if unknown or not concurrencies or min(concurrencies) < 1:
        raise SystemExit(
            f"error: bad --sides {sorted(unknown)} (choose from {','.join(SIDES)}) "
            f"or --concurrency {args.concurrency!r}"
        )
    if not 1 <= args.prompt_tokens <= 400 or not 1 <= args.max_tokens <= 100:
        raise SystemExit("error: --prompt-tokens must be 1-400 and --max-tokens 1-100 (max-model-len is 512)")
    shape = {"prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "extras": not args.no_extras}
    if args.quick:
        levels = tuple(LevelPlan(c, 10 if c == 1 else max(32, 2 * c), 30.0) for c in concurrencies)
        return BenchConfig(
            levels=levels,
            sides=sides,
            rounds=1,
            repeats=1,
            seed=args.seed,
            warmup_requests=16,
            profile=False,
            chart=not args.no_chart,
            quick=True,
            foreign_wait=args.foreign_wait,
            session_wait=args.session_wait,
            client_priority=args.client_priority,
            dynamo_ref=args.dynamo_ref,
            **shape,
        )
    levels = tuple(LevelPlan(c, args.requests_c1 if c == 1 else args.requests, args.max_seconds) for c in concurrencies)
    return BenchConfig(
        levels=levels,
        sides=sides,
        rounds=args.rounds,
        repeats=args.repeats,
        seed=args.seed,
        profile=not args.no_profile,
        profile_seconds=args.profile_seconds,
        chart=not args.no_chart,
        foreign_wait=args.foreign_wait,
        session_wait=args.session_wait,
        client_priority=args.client_priority,
        dynamo_ref=args.dynamo_ref,
        **shape,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config(args)
    out_dir: Path = args.out
    run = start_run(out_dir)
    stamp, work_root, log = run.stamp, run.work_root, run.log
    t0 = time.monotonic()

    from dynamo_worker.demo_model import ensure_demo_model

    model = str(ensure_demo_model())
    prompts = make_prompts(max(p.requests for p in cfg.levels), cfg.prompt_tokens, cfg.seed)
    log(
        f"model {model}; {len(prompts)} prompts of {cfg.prompt_tokens} token ids (seed {cfg.seed}); "
        f"levels {[(p.concurrency, p.requests) for p in cfg.levels]}; {cfg.rounds} round(s) x {cfg.repeats} repeat(s); "
        f"logs in {work_root}"
    )
    info = machine.machine_info()
    measures_dynamo = any(side.startswith("dynamo") for side in cfg.sides)
    source = measured_source(cfg.dynamo_ref if measures_dynamo else "worktree", work_root, info, log)
    if source is not None:
        cfg = attrs.evolve(cfg, dynamo_source=str(source))
    json_path = out_dir / f"{stamp}.json"

    def checkpoint(partial: dict[str, object]) -> None:  # an interrupted run keeps what it measured
        report.write_json(json_path, {"partial": True, "timestamp": stamp, "machine": info, **partial})

    raw = rounds.run(cfg, model, prompts, work_root, log, checkpoint)
    if cfg.extras:
        raw["extras"] = extras.run(work_root, log, cfg.dynamo_source)
    if args.kv_routing:
        log("KV-aware routing section: python -m benchmarks.kv_routing")
        kv_argv = ["--out", str(out_dir), "--dynamo-ref", cfg.dynamo_ref, *(["--quick"] if cfg.quick else [])]
        results = kv_routing.run_benchmark(kv_argv)
        raw["kv_routing"] = {"command": "python -m benchmarks.kv_routing " + " ".join(kv_argv), "results": str(results)}
    agg = report.aggregate(raw["samples"])
    elapsed = time.monotonic() - t0
    result = {
        "command": "python -m benchmarks " + " ".join(sys.argv[1:] if argv is None else argv),
        "timestamp": stamp,
        "elapsed_s": round(elapsed, 1),
        "machine": info,
        "config": {
            "levels": [(p.concurrency, p.requests, p.max_seconds) for p in cfg.levels],
            "sides": cfg.sides,
            "rounds": cfg.rounds,
            "repeats": cfg.repeats,
            "prompt_tokens": cfg.prompt_tokens,
            "max_tokens": cfg.max_tokens,
            "seed": cfg.seed,
            "warmup_requests": cfg.warmup_requests,
            "engine_flags": ENGINE_FLAGS,
            "env": BENCH_ENV,
            "client_priority": cfg.client_priority,
            "foreign_wait": cfg.foreign_wait,
            "session_wait": cfg.session_wait,
        },
        "summary": {side: {str(c): a for c, a in per.items()} for side, per in agg.items()},
        **raw,
    }
    print()
    print(report.tables(agg))
    print(report.quiet_table(agg))
    print(report.cpu_table(agg))
    print(report.startup_table(raw["sessions"]))
    if "extras" in raw:
        print(extras.render(raw["extras"]))
    if raw["profiles"]:
        print(
            profiling.render(
                {k: v["processes"] for k, v in raw["profiles"].items() if isinstance(v, dict) and "processes" in v}
            )
        )
    if cfg.chart:
        png = out_dir / f"{stamp}.png"
        title = (
            f"{cfg.prompt_tokens} in / {cfg.max_tokens} out tokens, streaming /v1/completions; medians of "
            f"{cfg.rounds}x{cfg.repeats} samples, whiskers min-max ({info['logical_cpus']} CPUs)"
        )
        problem = report.chart(png, agg, title)
        result["chart"] = problem or str(png)
        print(problem or f"chart: {png}")
    report.write_json(json_path, result)
    print(f"results: {json_path}  ({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
