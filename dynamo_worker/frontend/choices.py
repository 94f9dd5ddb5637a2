"""``n`` > 1: the choices of one request, as n worker requests whose messages are merged.

vLLM itself serves ``n`` by splitting the request into n child requests with ``n=1``
(``vllm/v1/engine/parallel_sampling.py``); child ``i`` gets ``seed + i`` when a seed is set, so
seeded choices differ and are reproducible. The frontend does the same split, one level up: each
choice is an ordinary ``generate`` request, so routing, retries, migration, disaggregated prefill
and per-choice stop strings (closing one choice's stream cancels just that request) work for
every choice as for a single one, and the worker message stays one sequence per stream.
docs/frontend.md says why this rather than ``SamplingParams(n=...)`` on the worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from dynamo_worker.frontend.output import OutputProcessor
from dynamo_worker.frontend.protocol import usage_body

_END = object()  # a choice's stream ended


def choice_payloads(payload: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The worker request of each choice: choice ``i`` samples with ``seed + i``, as vLLM's children."""
    seed = (payload.get("sampling_options") or {}).get("seed")
    if n == 1 or seed is None:
        return [payload] * n
    return [{**payload, "sampling_options": {**payload["sampling_options"], "seed": seed + i}} for i in range(n)]


class ChoiceStreams:
    """Runs the choices' worker streams; :meth:`items` yields ``(index, message)`` as they arrive,
    and ``(index, None)`` when a choice's stream ends. :meth:`stop` ends one choice early."""

    def __init__(
        self,
        open_stream: Callable[[dict[str, Any]], AsyncGenerator[dict[str, Any], None]],
        payloads: Sequence[dict[str, Any]],
    ) -> None:
        self.open_stream = open_stream
        self.payloads = list(payloads)
        self.live = set(range(len(self.payloads)))
        self._tasks: list[asyncio.Task[None]] = []

    def stop(self, index: int) -> None:
        """No more messages of choice ``index``: its worker request is cancelled."""
        self.live.discard(index)
        if self._tasks:
            self._tasks[index].cancel()

    async def items(self) -> AsyncGenerator[tuple[int, Any], None]:
        if len(self.payloads) == 1:  # one choice: no task, no queue
            async with aclosing(self.open_stream(self.payloads[0])) as stream:
                async for item in stream:
                    yield 0, item
                    if not self.live:
                        return  # stopped: closing the stream cancels the worker's request
            self.live.discard(0)
            yield 0, None
            return
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async with aclosing(self.open_stream(self.payloads[index])) as stream:
                    async for item in stream:
                        queue.put_nowait((index, item))
            except Exception as exc:  # handed to the consumer, which raises it
                queue.put_nowait((index, exc))
                return
            queue.put_nowait((index, _END))

        self._tasks = [asyncio.create_task(pump(i)) for i in range(len(self.payloads))]
        try:
            while self.live:
                index, item = await queue.get()
                if index not in self.live:
                    continue  # stopped: what it sent since is dropped
                if isinstance(item, Exception):
                    raise item
                if item is _END:
                    self.live.discard(index)
                    yield index, None
                else:
                    yield index, item
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


def merged_usage(outs: Sequence[OutputProcessor]) -> dict[str, Any]:
    """Usage of all choices, as vLLM counts it: the prompt once, every choice's completion tokens."""
    first = outs[0].usage()
    cached = (first.get("prompt_tokens_details") or {}).get("cached_tokens")
    return usage_body(first["prompt_tokens"], sum(o.usage()["completion_tokens"] for o in outs), cached)
