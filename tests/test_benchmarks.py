"""The benchmark harness's own parts that run without a vLLM engine.

The full ``python -m benchmarks`` starts vLLM servers for about 15 minutes, too long for the
suite; its figures are in docs/performance.md. Tested here: the ratios the report prints (to
``vllm serve`` and to ``vllm serve`` with dynamo's engine layout), the request-plane measurement
(the echo role on both planes against bare nats-py), the killed-worker measurement and discovery at
scale (simulated workers on a 3-server NATS cluster), on small counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks import failover, kv_routing, report
from benchmarks.config import BASELINE, REPO_ROOT, SAME_LAYOUT_BASELINE


def _sample(side: str, tok_per_s: float, *, other_cores: float = 0.0) -> dict[str, Any]:
    return {
        "side": side,
        "concurrency": 16,
        "errors": 0,
        "tok_per_s": tok_per_s,
        "req_per_s": tok_per_s / 32,
        "ttft_p50_ms": 10.0,
        "ttft_p99_ms": 20.0,
        "itl_p50_ms": 2.0,
        "itl_p99_ms": 4.0,
        "cpu": {"client_cores": 0.2, "other_cores": other_cores, "server_cores_total": 1.0},
    }


def test_the_report_gives_ratios_to_vllm_serve_and_to_the_same_engine_layout() -> None:
    agg = report.aggregate(
        [
            _sample(BASELINE, 100),
            _sample(BASELINE, 300),
            _sample(SAME_LAYOUT_BASELINE, 400),
            _sample("dynamo", 300),
            _sample("dynamo", 5000, other_cores=2.0),  # disturbed: not in the quiet median
        ]
    )
    quiet = report.quiet_table(agg)
    assert "| vllm-serve | 200 (1.00x) (2) |" in quiet
    assert "| dynamo | 300 (1.50x) (1) |" in quiet
    same = quiet.split(f"as ratios to {SAME_LAYOUT_BASELINE}")[1]
    assert "| dynamo | 0.75x |" in same and "| vllm-serve | 0.50x |" in same
    # Every median in the main table has its ratio to vllm serve (here: over all samples).
    assert "| dynamo | 2,650 (13.25x) (300-5,000)" in report.tables(agg)


def test_without_the_same_layout_side_the_report_has_no_such_table() -> None:
    agg = report.aggregate([_sample(BASELINE, 100), _sample("dynamo", 90)])
    assert "as ratios to" not in report.quiet_table(agg)


def test_the_request_plane_benchmark_counts_every_frame_on_both_planes(tmp_path: Path) -> None:
    out = tmp_path / "plane.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.request_plane",
            "--messages",
            "3000",
            "--streams",
            "1,4",
            "--timeout",
            "60",
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["bare"]["received"] == result["bare"]["expected"] == 3000
    for plane in ("echo", "echo_nats"):  # the TCP plane, then NATS
        for streams in ("1", "4"):
            e = result[plane][streams]
            assert e["received"] == e["expected"], (plane, streams, e)
            assert e["msgs_per_s"] > 0 and e["ratio_to_bare"] > 0
    assert "bare nats-py pub -> sub" in done.stdout and "echo role, tcp" in done.stdout


async def test_the_failover_benchmark_sees_a_killed_worker_leave_routing_and_discovery(tmp_path: Path) -> None:
    result = await failover.measure(trials=1, lease_ttl=2, timeout=20, log_dir=tmp_path)
    [trial] = result["trials"]
    assert trial["request_failed_over_s"] is not None, trial  # a retryable error, not a hang
    assert result["out_of_routing_s"]["never"] == 0 and result["out_of_discovery_s"]["never"] == 0, result
    assert "killed worker (SIGKILL), 1 trials" in failover.render(result)


def test_the_discovery_scale_benchmark_sees_every_simulated_worker_routable(tmp_path: Path, demo_model: str) -> None:
    out = tmp_path / "scale.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.discovery_scale",
            "--instances",
            "20",
            "--window",
            "2",
            "--timeout",
            "60",
            "--model",
            demo_model,
            "--log-dir",
            str(tmp_path / "logs"),
            "--json",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    [level] = result["levels"]
    assert level["instances"] == 20 and level["records"] == 20 * result["endpoints_per_instance"]
    # The frontend (its /health, over what its router picks from) counted all 20, and still does after
    # the steady-state window: the keep-alives, written on three servers, kept every lease alive.
    assert level["routable_s"] is not None and level["routable_seen"] == 20, level
    assert level["routable_after_window"] == 20, level
    assert level["keepalive_msgs_per_s"] > 0 and level["bus_in_msgs_per_s"] > level["keepalive_msgs_per_s"]
    assert set(level["per_instance"]) == {
        "keepalive_msgs_per_s",
        "bus_in_msgs_per_s",
        "bus_out_msgs_per_s",
        "bus_bytes_per_s",
        "frontend_discovery_cpu_ms_per_s",
    }
    assert result["per_instance_vs_smallest"]["keepalive_msgs_per_s"] == {"20": 1.0}
    assert "| 20 |" in done.stdout and "per-instance figures as ratios" in done.stdout


def test_the_kv_routing_ceilings_hold_their_hand_made_cases_and_the_clusters_lies_between() -> None:
    """The cluster's ceiling (one cache of every worker's blocks, Belady eviction) on the
    benchmark's trace lies between what the system prompts alone give and the infinite cache's,
    and equals the latter once every distinct block fits."""
    kv_routing.self_check()
    shape = kv_routing.TraceShape()
    trace = kv_routing.make_trace(shape)
    plan = kv_routing.cache_plan(shape, 32, 3, 3, 1.25)
    ceiling = kv_routing.trace_ceiling(trace, shape, 32, (plan.blocks_per_worker - 1) * 3)
    assert ceiling.capacity_rate is not None
    assert ceiling.system_rate < ceiling.capacity_rate < ceiling.rate, ceiling
    roomy = kv_routing.trace_ceiling(trace, shape, 32, ceiling.distinct_blocks)
    assert roomy.capacity_hits == roomy.hits


def test_a_prediction_miss_is_told_by_its_cause() -> None:
    """``classify_prediction`` on hand-made log lines: the forecast's cut the engine did not make,
    an eviction after the decision, a prefix stored by a request in flight, and the router
    against the index alone."""
    base = {
        "block_size": 32,
        "prompt_tokens": 1088,
        "indexed_blocks": 32,
        "in_flight_blocks": 0,
        "min_indexed_blocks": 32,
        "indexed_blocks_at_finish": 34,
        "forecast_evicted_blocks": 0,
    }
    exact = {**base, "predicted_tokens": 1024, "cached_tokens": 1024}
    assert kv_routing.classify_prediction(exact) == ("exact", "exact")
    # The forecast cut 32 held blocks to 0 (requests before it would evict them); the engine kept them.
    kept = {**base, "predicted_tokens": 0, "forecast_evicted_blocks": 32, "cached_tokens": 1024}
    assert kv_routing.classify_prediction(kept) == ("forecast_kept", "exact")
    # ... and where it evicted them, the router is exact and the index alone was not.
    cut = {**kept, "cached_tokens": 0, "min_indexed_blocks": 0}
    assert kv_routing.classify_prediction(cut) == ("exact", "evicted_after_decision")
    stored = {**base, "indexed_blocks": 0, "in_flight_blocks": 32, "predicted_tokens": 1024, "cached_tokens": 1024}
    assert kv_routing.classify_prediction(stored) == ("exact", "in_flight_prefix")
