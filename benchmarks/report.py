"""Statistics, the printed tables, the JSON file and the chart.

A *sample* is one measured level (one side, one concurrency, one repeat of one round). Per
sample: output tokens/s and requests/s over the level's wall time, and TTFT / inter-token
percentiles over its requests. Per side and concurrency the tables show the median over
samples and, for throughput, the spread (min-max); ratios are to ``vllm serve``'s median.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.config import BASELINE, SAME_LAYOUT_BASELINE, SIDES
from benchmarks.load import LevelRun

SIDE_ORDER = SIDES


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (``q`` in 0..100) or None for no values."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def summarize_run(run: LevelRun) -> dict[str, Any]:
    """One online sample's figures (times in milliseconds)."""
    ok = [r for r in run.requests if r.ok]
    tokens = sum(r.output_tokens or 0 for r in ok)
    ttfts = [r.ttft * 1000 for r in ok if r.ttft is not None]
    gaps = [g * 1000 for r in ok for g in r.gaps()]
    chunks = [len(r.chunk_times) for r in ok]
    choice_chunks = [r.choice_chunks for r in ok]
    return {
        "requests": len(run.requests),
        "completed": len(ok),
        "errors": len(run.requests) - len(ok),
        "first_errors": sorted({r.error for r in run.requests if r.error})[:3],
        "output_tokens": tokens,
        "tokens_per_request": sorted({r.output_tokens for r in ok}),
        "text_chunks_per_request_mean": round(statistics.fmean(chunks), 2) if chunks else None,
        "choice_chunks_per_request_mean": round(statistics.fmean(choice_chunks), 2) if choice_chunks else None,
        "wall_s": round(run.wall, 4),
        "req_per_s": len(ok) / run.wall if run.wall > 0 else 0.0,
        "tok_per_s": tokens / run.wall if run.wall > 0 else 0.0,
        "ttft_p50_ms": percentile(ttfts, 50),
        "ttft_p99_ms": percentile(ttfts, 99),
        "itl_p50_ms": percentile(gaps, 50),
        "itl_p99_ms": percentile(gaps, 99),
        "client_cpu_s": round(run.client_cpu, 3),
        "client_loop_lag_p99_ms": _ms(percentile(run.loop_lags, 99)),
        "client_loop_lag_max_ms": _ms(max(run.loop_lags, default=None)),
        "stopped_by_deadline": run.stopped_by_deadline,
    }


def raw_requests(run: LevelRun) -> list[dict[str, Any]]:
    """Per-request records for the JSON file (ms, rounded to 0.01)."""
    return [
        {
            "i": r.index,
            "ok": r.ok,
            "error": r.error,
            "ttft_ms": None if r.ttft is None else round(r.ttft * 1000, 2),
            "done_ms": None if r.done is None else round(r.done * 1000, 2),
            "output_tokens": r.output_tokens,
            "itl_ms": [round(g * 1000, 2) for g in r.gaps()],
        }
        for r in run.requests
    ]


def summarize_offline(sample: dict[str, Any]) -> dict[str, Any]:
    wall = sample["wall_s"]
    return {
        "requests": sample["requests"],
        "completed": sample["requests"],
        "errors": 0,
        "output_tokens": sample["output_tokens"],
        "wall_s": round(wall, 4),
        "req_per_s": sample["requests"] / wall,
        "tok_per_s": sample["output_tokens"] / wall,
        "ttft_p50_ms": None,
        "ttft_p99_ms": None,
        "itl_p50_ms": None,
        "itl_p99_ms": None,
    }


#: Other processes using this many cores during a sample mark it as disturbed (shown, not dropped).
DISTURBED_CORES = 0.3


def disturbed(sample: dict[str, Any]) -> bool:
    """Did other work (someone's engine, a test suite) run beside this sample?"""
    live = [e for e in sample.get("foreign_engines") or [] if not e.get("orphaned")]
    return bool(live) or (sample.get("cpu") or {}).get("other_cores", 0.0) >= DISTURBED_CORES


ENGINE_PROCESSES = ("/EngineCore", "/Worker", "/resource_tracker")


def serving_path_cpu_ms_per_token(sample: dict[str, Any]) -> float | None:
    """CPU milliseconds per output token of the server's processes other than vLLM's engine.

    That is the API server for ``vllm serve``; the decode worker's own process, the frontend and
    nats-server for dynamo: the work a serving layer adds around the same engine.
    """
    cpu = sample.get("cpu") or {}
    if not cpu.get("server_cores") or not sample.get("output_tokens"):
        return None
    cores = sum(v for k, v in cpu["server_cores"].items() if not k.endswith(ENGINE_PROCESSES))
    return cores * cpu["wall_s"] / sample["output_tokens"] * 1000


METRICS = ("tok_per_s", "req_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def aggregate(samples: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """``{side: {concurrency: {metric: median, metric_min, metric_max, n, ...}}}``."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for s in samples:
        groups.setdefault((s["side"], s["concurrency"]), []).append(s)
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for (side, conc), group in groups.items():
        agg: dict[str, Any] = {
            "n": len(group),
            "errors": sum(s["errors"] for s in group),
            "disturbed": sum(1 for s in group if disturbed(s)),
        }
        for m in METRICS:
            values = [s[m] for s in group if s.get(m) is not None]
            agg[m] = statistics.median(values) if values else None
            agg[f"{m}_min"] = min(values) if values else None
            agg[f"{m}_max"] = max(values) if values else None
        quiet = [s["tok_per_s"] for s in group if not disturbed(s)]
        agg["tok_per_s_quiet"] = statistics.median(quiet) if quiet else None
        agg["n_quiet"] = len(quiet)
        for key in ("client_cores", "other_cores", "server_cores_total"):
            values = [s["cpu"][key] for s in group if s.get("cpu")]
            agg[key] = statistics.median(values) if values else None
        per_proc: dict[str, list[float]] = {}
        for s in group:
            for label, cores in (s.get("cpu") or {}).get("server_cores", {}).items():
                per_proc.setdefault(label, []).append(cores)
        agg["server_cores"] = {k: round(statistics.median(v), 3) for k, v in sorted(per_proc.items())}
        path = [serving_path_cpu_ms_per_token(s) for s in group]
        path = [v for v in path if v is not None]
        agg["path_cpu_ms_per_token"] = round(statistics.median(path), 4) if path else None
        per_wait: dict[str, list[float]] = {}
        for s in group:
            for label, wait in (s.get("cpu") or {}).get("runq_wait_per_s", {}).items():
                per_wait.setdefault(label, []).append(wait)
        agg["runq_wait_per_s"] = {k: round(statistics.median(v), 3) for k, v in sorted(per_wait.items())}
        out.setdefault(side, {})[conc] = agg
    for side in list(out):
        out[side] = dict(sorted(out[side].items()))
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return ""
    return f" ({value / base:.2f}x)"


def tables(agg: dict[str, dict[int, dict[str, Any]]]) -> str:
    """One markdown table per concurrency; each figure with its ratio to ``vllm serve``."""
    lines: list[str] = []
    concurrencies = sorted({c for side in agg.values() for c in side if c != 0})
    for conc in concurrencies:
        base = agg.get(BASELINE, {}).get(conc, {})
        lines += [
            f"### concurrency {conc}",
            "",
            (
                "| side | output tok/s (min-max) | req/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
                "| client CPU | n |"
            ),
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for side in SIDE_ORDER:
            a = agg.get(side, {}).get(conc)
            if a is None:
                continue
            cells = [
                (
                    f"{_fmt(a['tok_per_s'])}{_ratio(a['tok_per_s'], base.get('tok_per_s'))} "
                    f"({_fmt(a['tok_per_s_min'])}-{_fmt(a['tok_per_s_max'])})"
                ),
                f"{_fmt(a['req_per_s'], 1)}{_ratio(a['req_per_s'], base.get('req_per_s'))}",
            ]
            for m in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
                cells.append(f"{_fmt(a[m], 2)}{_ratio(a[m], base.get(m))}")
            client = a.get("client_cores")
            cells.append("-" if client is None else f"{client:.2f} cores")
            cells.append(
                f"{a['n']}"
                + (f", {a['errors']} errors" if a["errors"] else "")
                + (f", {a['disturbed']} disturbed" if a["disturbed"] else "")
            )
            lines.append(f"| {side} | " + " | ".join(cells) + " |")
        lines.append("")
    ceiling = agg.get("offline", {}).get(0)
    if ceiling:
        lines.append(
            f"offline, all requests in one generate() call: {_fmt(ceiling['tok_per_s'])} output tok/s "
            f"(min-max {_fmt(ceiling['tok_per_s_min'])}-{_fmt(ceiling['tok_per_s_max'])}, n={ceiling['n']})"
        )
        lines.append("")
    return "\n".join(lines)


def quiet_table(agg: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Output tok/s medians over the undisturbed samples only (no other work beside them)."""
    concurrencies = sorted({c for side in agg.values() for c in side if c != 0})
    lines = [
        (
            "undisturbed samples only (no foreign engine, other processes under "
            f"{DISTURBED_CORES} cores): median output tok/s (n)"
        ),
        "",
        "| side | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
        "|---|" + "---|" * len(concurrencies),
    ]
    for side in SIDE_ORDER:
        if side not in agg or side == "offline":
            continue
        cells = []
        for c in concurrencies:
            a = agg[side].get(c, {})
            base = agg.get(BASELINE, {}).get(c, {}).get("tok_per_s_quiet")
            cells.append(
                f"{_fmt(a.get('tok_per_s_quiet'))}{_ratio(a.get('tok_per_s_quiet'), base)} ({a.get('n_quiet', 0)})"
            )
        lines.append(f"| {side} | " + " | ".join(cells) + " |")
    same = agg.get(SAME_LAYOUT_BASELINE)
    if same:  # the hop alone: dynamo against vllm serve with the same engine layout
        lines += [
            "",
            f"the same, as ratios to {SAME_LAYOUT_BASELINE} (the engine laid out as dynamo's)",
            "",
            "| side | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
            "|---|" + "---|" * len(concurrencies),
        ]
        for side in SIDE_ORDER:
            if side not in agg or side == "offline":
                continue
            cells = [
                _ratio(agg[side].get(c, {}).get("tok_per_s_quiet"), same.get(c, {}).get("tok_per_s_quiet")).strip(" ()")
                or "-"
                for c in concurrencies
            ]
            lines.append(f"| {side} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cpu_table(agg: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Median CPU cores used per process during each level, and (after "/") how long per second
    its threads waited for a CPU while runnable (server sides only)."""
    lines = [
        (
            "| side | concurrency | cores / run-queue wait per process (median) | serving-path CPU ms per token "
            "| client | other |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for side in SIDE_ORDER:
        for conc, a in agg.get(side, {}).items():
            if not a.get("server_cores"):
                continue
            waits = a.get("runq_wait_per_s", {})
            procs = ", ".join(
                f"{k} {v:.2f}" + (f"/{waits[k]:.2f}" if k in waits else "")
                for k, v in a["server_cores"].items()
                if v >= 0.01
            )
            lines.append(
                f"| {side} | {conc} | {procs} | {_fmt(a.get('path_cpu_ms_per_token'), 3)} "
                f"| {_fmt(a['client_cores'], 2)} | {_fmt(a['other_cores'], 2)} |"
            )
    return "\n".join(lines) + "\n"


def startup_table(sessions: list[dict[str, Any]]) -> str:
    """Per side, median seconds from start until the model was listed and until the first answer;
    the offline side's figure is the engine's own load time (``LLM(...)`` built)."""
    lines = [
        "| side | model listed after s (median, min-max) | first answer after s (median, min-max) | n |",
        "|---|---|---|---|",
    ]
    for side in SIDE_ORDER:
        mine = [x for x in sessions if x.get("side") == side]
        ready = [x["ready_s"] for x in mine if x.get("ready_s") is not None]
        first = [x["first_answer_s"] for x in mine if x.get("first_answer_s") is not None]
        if not ready:
            continue

        def cell(v: list[float]) -> str:
            return f"{statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f})" if v else "-"

        label = "offline (engine load)" if side == "offline" else side
        lines.append(f"| {label} | {cell(ready)} | {cell(first)} | {len(mine)} |")
    return "\n".join(lines) + "\n"


def write_json(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def chart(path: Path, agg: dict[str, dict[int, dict[str, Any]]], title: str) -> str | None:
    """Bars of output tok/s (min-max whiskers), TTFT p50 and ITL p50 per concurrency; None if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no chart"
    concurrencies = sorted({c for side in agg.values() for c in side if c != 0})
    sides = [s for s in SIDE_ORDER if s in agg]
    colors = {
        "offline": "#9e9e9e",
        "vllm-serve": "#1f77b4",
        "vllm-serve-uni": "#6baed6",
        "dynamo": "#76b900",
        "dynamo-disagg": "#ff7f0e",
    }
    panels = [
        ("tok_per_s", "output tokens/s", sides),
        ("ttft_p50_ms", "TTFT p50 (ms)", [s for s in sides if s != "offline"]),
        ("itl_p50_ms", "inter-token p50 (ms)", [s for s in sides if s != "offline"]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    width = 0.8 / max(1, len(sides))
    for ax, (metric, label, shown) in zip(axes, panels):
        for j, side in enumerate(shown):
            xs, ys, lo, hi = [], [], [], []
            for i, conc in enumerate(concurrencies):
                a = agg[side].get(conc)
                if not a or a.get(metric) is None:
                    continue
                xs.append(i + (j - (len(shown) - 1) / 2) * width)
                ys.append(a[metric])
                lo.append(a[metric] - a[f"{metric}_min"])
                hi.append(a[f"{metric}_max"] - a[metric])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=side, color=colors.get(side))
        ax.set_xticks(range(len(concurrencies)), [f"c={c}" for c in concurrencies])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.report RESULTS.json``: print a saved run's tables again."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.report benchmarks/results/<timestamp>.json", file=sys.stderr)
        return 2
    result = json.loads(Path(args[0]).read_text())
    agg = aggregate(result["samples"])
    print(tables(agg))
    print(quiet_table(agg))
    print(cpu_table(agg))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
