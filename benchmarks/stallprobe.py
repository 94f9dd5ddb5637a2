"""A real-time probe for whole-machine stalls: ``python -m benchmarks.stallprobe`` (until SIGTERM).

It runs at SCHED_FIFO priority, so no process of this machine can keep it from running; it
sleeps 2 ms at a time and records each wake-up more than 5 ms late. Late wake-ups then mean the
virtual machine itself was not running (the host descheduled its vCPUs), not that our processes
competed. On SIGTERM it prints ``{"realtime", "ticks", "stalls_ms"}`` as JSON. Where real-time
scheduling is not allowed it still runs, at normal priority (``realtime`` false).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

TICK = 0.002
LATE = 0.005


def main() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
        realtime = True
    except (OSError, AttributeError):
        realtime = False
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    stalls: list[float] = []
    ticks = 0
    deadline = time.monotonic() + 3600  # bounded even if nobody stops it
    while not stop and time.monotonic() < deadline:
        before = time.monotonic()
        time.sleep(TICK)
        late = time.monotonic() - before - TICK
        ticks += 1
        if late > LATE:
            stalls.append(round(late * 1000, 1))
    sys.stdout.write(json.dumps({"realtime": realtime, "ticks": ticks, "stalls_ms": stalls}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
