"""Sampling profiles of the server processes with py-spy, summarised as top functions.

``py-spy record --nonblocking --format raw`` writes collapsed stacks (``frame;frame;... count``)
of the threads that were running (not idle) at each sample. The summary gives, per process,
how busy its Python threads were (samples / (rate x seconds)), the functions with the most
*self* samples (the leaf frame) and with the most *inclusive* samples, and self samples
grouped by package. Profiling perturbs the run; its throughput is not a measurement.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

RATE = 100  # samples per second
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds`` into ``out`` (collapsed stacks)."""
    exe = py_spy()
    if exe is None:
        raise FileNotFoundError("py-spy is not installed (pip install -e '.[bench]')")
    with open(out.with_suffix(".log"), "wb") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                str(RATE),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _where(file: str) -> str:
    """A frame's file as a package-ish name: ``aiohttp``, ``dynamo_worker/frontend``, ``asyncio``."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in file:
            rest = file.split(marker, 1)[1]
            parts = rest.split("/")
            return "/".join(parts[:2]) if parts[0] in ("dynamo_worker", "vllm") and len(parts) > 2 else parts[0]
    if "/dynamo_worker/" in file:
        parts = file.split("/dynamo_worker/", 1)[1].split("/")
        return "dynamo_worker/" + parts[0] if len(parts) > 1 else "dynamo_worker"
    m = re.search(r"/lib/python3\.\d+/(.+)$", file)
    if m:
        return "stdlib:" + m.group(1).split("/")[0].removesuffix(".py")
    return file or "?"


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    file = re.sub(r"^.*/lib/python3\.\d+/", "", file)
    return f"{m.group('func')} ({file})"


def summarize(path: Path, seconds: float, top: int = 12) -> dict[str, Any]:
    """Top self / inclusive functions and self time by package from a raw py-spy file."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    total = 0
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return {"error": f"no profile: {exc}"}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f]
        # py-spy puts the thread name first ("process 123:..." or "thread (0x...)"): skip it.
        frames = [f for f in frames if not f.startswith(("process ", "thread ("))]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        self_counts[_short(leaf)] += count
        m = _FRAME.match(leaf)
        by_package[_where(m.group("file")) if m else "?"] += count
        for name in {_short(f) for f in frames}:
            incl_counts[name] += count
    possible = RATE * seconds
    pct = (lambda n: round(100.0 * n / total, 1)) if total else (lambda n: 0.0)
    return {
        "samples": total,
        "busy_fraction": round(total / possible, 3) if possible else None,
        "top_self": [(name, pct(n)) for name, n in self_counts.most_common(top)],
        "top_inclusive": [(name, pct(n)) for name, n in incl_counts.most_common(top)],
        "self_by_package": [(name, pct(n)) for name, n in by_package.most_common(top)],
    }


def render(profiles: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown lists of the summaries: ``{side: {process: summary}}``."""
    lines: list[str] = []
    for side, procs in profiles.items():
        for proc, s in procs.items():
            if "error" in s:
                lines.append(f"- {side} / {proc}: {s['error']}")
                continue
            lines.append(
                f"#### {side} / {proc}: Python threads busy {100 * (s['busy_fraction'] or 0):.0f}% "
                f"of the time ({s['samples']} samples)"
            )
            lines.append("self time by package: " + ", ".join(f"{n} {p}%" for n, p in s["self_by_package"][:8]))
            lines.append("")
            lines.append("top self: " + "; ".join(f"{n} {p}%" for n, p in s["top_self"][:8]))
            lines.append("")
            lines.append("top inclusive: " + "; ".join(f"{n} {p}%" for n, p in s["top_inclusive"][:10]))
            lines.append("")
    return "\n".join(lines)
