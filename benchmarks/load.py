"""The load generator: N streaming completions at a fixed concurrency, read as SSE with aiohttp.

One asyncio loop in the benchmark process drives every request (aiohttp's client sets
``TCP_NODELAY``). Each request records when it was sent, when each content chunk arrived and
the output token count from the final usage chunk. The loop is bounded twice: by the number of
requests and by a deadline after which no new request starts (each request also has a timeout).
The process CPU time used over the level tells whether this client could be the bottleneck.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import aiohttp
import attrs
import msgspec

from benchmarks.workload import completion_body

_decode = msgspec.json.decode


@attrs.define
class RequestRecord:
    """One request as the client saw it; times in seconds since it was sent."""

    index: int
    sent: float  # monotonic, for ordering only
    ok: bool = False
    error: str | None = None
    ttft: float | None = None  # first chunk with text
    chunk_times: list[float] = attrs.Factory(list)  # every content chunk
    choice_chunks: int = 0  # chunks with a choice, text or not (a token may complete no character)
    output_tokens: int | None = None  # usage.completion_tokens
    done: float | None = None  # [DONE] (or the end of the body)

    def gaps(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive content chunks."""
        t = self.chunk_times
        return [b - a for a, b in itertools.pairwise(t)]


@attrs.define
class LevelRun:
    """The raw outcome of one concurrency level."""

    concurrency: int
    requests: list[RequestRecord]
    wall: float  # first send to last completion
    client_cpu: float  # this process's CPU seconds over the level
    stopped_by_deadline: bool
    loop_lags: list[float] = attrs.Factory(list)  # how late each 5 ms tick of the client's loop woke


LAG_TICK = 0.005


async def _watch_loop(lags: list[float], stop: asyncio.Event) -> None:
    """Record how late the client's own event loop wakes: a late loop reads chunks late too.

    Large lags mean the client (not the server) was held up: descheduled on the shared cores
    or busy, so its TTFT and inter-token figures include that delay.
    """
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(LAG_TICK)
        lags.append(time.monotonic() - before - LAG_TICK)


async def _one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], record: RequestRecord, timeout: float
) -> None:
    """Send one streaming request and fill ``record``; never raises."""
    start = record.sent
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                record.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                now = time.monotonic() - start
                event = _decode(data)
                if "error" in event:
                    record.error = f"SSE error: {str(event['error'])[:200]}"
                    return
                choices = event.get("choices") or []
                if choices:
                    record.choice_chunks += 1
                if choices and choices[0].get("text"):
                    if record.ttft is None:
                        record.ttft = now
                    record.chunk_times.append(now)
                usage = event.get("usage")
                if usage:
                    record.output_tokens = usage.get("completion_tokens")
            record.done = time.monotonic() - start
            record.ok = record.output_tokens is not None and record.ttft is not None
            if not record.ok:
                record.error = "stream ended without text or usage"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"[:200]


async def run_level(
    base_url: str,
    model: str,
    prompts: list[list[int]],
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    max_seconds: float,
    request_timeout: float,
) -> LevelRun:
    """``requests`` completions (prompt i = ``prompts[i % len]``), ``concurrency`` in flight at once."""
    url = f"{base_url}/v1/completions"
    records: list[RequestRecord] = []
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    cpu0, t0 = time.process_time(), time.monotonic()
    deadline = t0 + max_seconds

    async def user(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < requests and time.monotonic() < deadline:
            i, next_index = next_index, next_index + 1
            record = RequestRecord(i, time.monotonic())
            records.append(record)
            await _one(
                session, url, completion_body(model, prompts[i % len(prompts)], max_tokens), record, request_timeout
            )

    lags: list[float] = []
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_loop(lags, stop))
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(user(session) for _ in range(concurrency)))
    stop.set()
    await watcher
    ends = [r.sent + r.done for r in records if r.done is not None]
    wall = (max(ends) if ends else time.monotonic()) - t0
    return LevelRun(
        concurrency,
        records,
        wall,
        time.process_time() - cpu0,
        stopped_by_deadline=next_index < requests,
        loop_lags=lags,
    )
