"""``POST /engine/sleep`` and ``POST /engine/wake_up`` on the worker's system port.

Sleep: withdraw the ``generate`` record from discovery first (routers stop sending work here),
then ``engine.sleep(level)``. vLLM pauses scheduling and, with ``--enable-sleep-mode`` on a GPU,
frees the weights (level 1 offloads them, level 2 discards them) and the KV cache. Wake:
``engine.wake_up(tags)``, then publish the record again.

On CPU vLLM refuses ``--enable-sleep-mode``; ``sleep()``/``wake_up()`` still pause and resume
scheduling but free no memory. The worker supports that and says so: every reply carries
``"memory_freed": false`` and a note. Level 1 and 2 also clear the prefix cache (vLLM drops
it when it pauses; KV-event consumers get ``AllBlocksCleared``).

Requests: vLLM's default pause mode ``"abort"`` ends in-flight requests (they finish with
``cancelled``); ``{"mode": "wait"}`` lets them finish first, ``"keep"`` freezes them until
wake-up. A ``generate`` request that reaches a sleeping worker anyway (sent before the
withdrawal was seen) gets a retryable ``unavailable`` error, so the caller retries elsewhere.

Replies (Dynamo's shape plus what the engine did)::

    POST /engine/sleep    {"level": 1, "mode": "abort"}  (body optional)
      200 {"status": "ok", "message": "Engine slept (level=1)", "level": 1,
           "memory_freed": false, "note": "..."}
    POST /engine/wake_up  {"tags": null}                 (body optional)
      200 {"status": "ok", "message": "Engine woke (tags=None)", "memory_freed": false, ...}
    GET  /engine/is_sleeping
      200 {"is_sleeping": true, "level": 1}

While asleep ``/health`` is 503 with the reason (the worker deliberately serves nothing; the
health canary waits), and 200 again as soon as the engine is awake.

Errors are ``{"status": "error", "message"}`` with 400 for a bad body and 500 when the engine
call failed (then the worker is published again, since it still serves).

The two POSTs are admin routes: the status server lets a request through only with
``Authorization: Bearer $DYN_SYSTEM_ADMIN_TOKEN`` when the worker has a token, refuses them (403)
on a bind beyond loopback without one, and refuses cross-site browser requests
(:mod:`dynamo_worker.core.status_server`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from dynamo_worker.core.status_server import HealthState
from dynamo_worker.engine.publication import GenerateRecord

log = logging.getLogger(__name__)

MODES = ("abort", "wait", "keep")
CPU_NOTE = "vLLM on this platform has no sleep mode (--enable-sleep-mode): scheduling is paused but no memory is freed"


class SleepControl:
    """The engine's sleep state and the HTTP routes that change it."""

    def __init__(self, engine: Any, record: GenerateRecord, health: HealthState, *, frees_memory: bool) -> None:
        self.engine = engine
        self.record = record
        self.health = health
        self.frees_memory = frees_memory
        self.level: int | None = None  # None while awake
        self._lock = asyncio.Lock()

    @property
    def asleep(self) -> bool:
        return self.level is not None

    def _reply(self, message: str, **extra: Any) -> web.Response:
        body: dict[str, Any] = {"status": "ok", "message": message, **extra, "memory_freed": self.frees_memory}
        if not self.frees_memory:
            body["note"] = CPU_NOTE
        return web.json_response(body)

    async def sleep(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        level = body.get("level", 1)
        mode = body.get("mode", "abort")
        if type(level) is not int or not 0 <= level <= 2:
            return _error(400, f"level must be 0, 1 or 2 (got {level!r})")
        if mode not in MODES:
            return _error(400, f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        async with self._lock:
            if self.asleep:
                return self._reply(f"Engine already asleep (level={self.level})", level=self.level)
            await self.record.withdraw()
            # Asleep from here on: stray generate requests are turned away, /health says why.
            self.level = level
            self.health.paused["engine"] = f"the engine is asleep (level {level}); POST /engine/wake_up"
            try:
                await self.engine.sleep(level, mode)
            except Exception as exc:  # the engine still serves: come back to discovery
                log.exception("engine.sleep(level=%d) failed", level)
                self._awake()
                await self.record.restore()
                return _error(500, f"engine.sleep failed: {type(exc).__name__}: {exc}")
        log.info("engine asleep (level %d, mode %s); withdrawn from discovery", level, mode)
        return self._reply(f"Engine slept (level={level})", level=level)

    async def wake_up(self, request: web.Request) -> web.Response:
        body = await _body(request)
        if isinstance(body, web.Response):
            return body
        tags = body.get("tags")
        if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            return _error(400, f"tags must be a list of strings or null (got {tags!r})")
        async with self._lock:
            if not self.asleep:
                return self._reply("Engine is awake")
            try:
                awake = await self.engine.wake_up(tags)
            except Exception as exc:
                log.exception("engine.wake_up(tags=%s) failed", tags)
                return _error(500, f"engine.wake_up failed: {type(exc).__name__}: {exc}")
            if awake is False:  # a partial wake (some tags): scheduling stays paused
                return self._reply(f"Engine partly woke (tags={tags}); still asleep", level=self.level)
            self._awake()
            await self.record.restore()
        log.info("engine awake; published in discovery again")
        return self._reply(f"Engine woke (tags={tags})")

    def _awake(self) -> None:
        self.level = None
        self.health.paused.pop("engine", None)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.asleep, "level": self.level})


async def _body(request: web.Request) -> dict[str, Any] | web.Response:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return _error(400, f"the body is not JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    return body


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"status": "error", "message": message}, status=status)
