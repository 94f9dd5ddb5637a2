"""This worker's ``generate`` record in discovery, changed while the worker runs.

The core publishes each endpoint once at start. A decode worker changes its ``generate``
record afterwards: loading or unloading a LoRA adapter republishes it with the new adapter
list (a put on the same key overwrites the record, and watchers see the update), and sleeping
withdraws it (routers stop sending work) until the engine wakes up. One object owns those
changes so they cannot undo each other: an adapter loaded while asleep is published on wake,
not at once.
"""

from __future__ import annotations

import asyncio
from typing import Any


class GenerateRecord:
    """The discovery data of one endpoint of this instance, with withdraw/restore."""

    def __init__(self, ctx: Any, component: str, endpoint: str, data: dict[str, Any]) -> None:
        self.ctx = ctx
        self.component = component
        self.endpoint = endpoint
        self.data = data  # the dict the core publishes at start; kept up to date here
        self.withdrawn = False
        self._lock = asyncio.Lock()

    @property
    def key(self) -> str:
        return self.ctx.runtime.subject(self.component, self.endpoint, self.ctx.instance_id)

    def _can_publish(self) -> bool:
        # After a shutdown began the core has withdrawn everything: never come back.
        return not self.withdrawn and not self.ctx.shutdown_requested.is_set()

    async def update(self, **changes: Any) -> None:
        """Change the record's data; republish it unless it is withdrawn."""
        async with self._lock:
            self.data.update(changes)
            if self._can_publish():
                await self.ctx.runtime.publish(self.component, self.endpoint, self.ctx.role.name, self.data)

    async def withdraw(self) -> None:
        """Leave discovery (this endpoint only): routers stop sending new work here."""
        async with self._lock:
            self.withdrawn = True
            await self.ctx.runtime.discovery.withdraw(self.key)

    async def restore(self) -> None:
        """Publish the record again after :meth:`withdraw`."""
        async with self._lock:
            self.withdrawn = False
            if self._can_publish():
                await self.ctx.runtime.publish(self.component, self.endpoint, self.ctx.role.name, self.data)
