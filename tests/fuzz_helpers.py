"""What the bus fuzz tests share: send a payload or raw bytes to one instance's endpoint and
check that whatever comes back is data or a clean, structured error."""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

from dynamo_worker.core import wire
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Runtime
from tests.frontend_helpers import LoopThread
from tests.helpers import WorkerProcess

#: The error codes a bad input may earn; anything else (internal, engine_dead) is a bug.
CLEAN_CODES = {"bad_request", "not_found"}


async def call(runtime: Runtime, component: str, endpoint: str, instance: str, payload: Any) -> RequestError | None:
    """Send ``payload``; read at most a few items; any error must be a clean one (and is returned)."""
    client = runtime.client(component, endpoint)
    try:
        async with aclosing(client.direct(payload, instance)) as stream:
            count = 0
            async for _ in stream:
                count += 1
                if count >= 8:
                    break  # closing cancels the rest on the worker
    except RequestError as err:
        assert err.code in CLEAN_CODES, f"{err!r} from {component}.{endpoint} for payload {payload!r:.2000}"
        return err
    return None


async def send_raw(runtime: Runtime, component: str, endpoint: str, instance: str, data: bytes) -> None:
    """Raw bytes as a request: the first answer is a structured error (or data, if they parse)."""
    msg = await runtime.nc.request(runtime.subject(component, endpoint, instance), data, timeout=60)
    frame = wire.decode_frame(msg.data)
    assert frame.k in (wire.ERROR, wire.DATA, wire.END), frame
    if frame.k == wire.ERROR:
        assert frame.err is not None and frame.err.code in CLEAN_CODES, frame.err
    if frame.k == wire.DATA:
        # They parsed as a real request: cancel whatever the worker started.
        await runtime.caller.cancel(instance, wire.decode_request(data).id)


class FuzzTarget:
    """Role processes under fuzz and the fuzzer's own runtime on a loop thread; subclasses start
    them. :meth:`stop` closes the runtime, then stops every process."""

    processes: dict[str, WorkerProcess]

    def __init__(self) -> None:
        self.loop = LoopThread()
        self.runtime: Runtime | None = None

    def all_alive(self) -> dict[str, int | None]:
        """Each process's exit status: None while it runs."""
        return {name: proc.proc.poll() for name, proc in self.processes.items()}

    def stop(self) -> None:
        if self.runtime is not None:
            self.loop.run(self.runtime.close())
        self.loop.close()
        for proc in self.processes.values():
            proc.stop()
