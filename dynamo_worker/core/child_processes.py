"""Make vLLM's engine processes die with the worker that started them.

After a SIGKILL of a worker, vLLM's EngineCore and Worker processes otherwise stay alive as
orphans for a minute or more holding gigabytes. vLLM starts them with the ``spawn`` method, which
runs a fresh interpreter that imports this package (through the parent's main module) before
anything else; there we ask Linux to SIGKILL the child when its parent dies.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def is_spawned_child() -> bool:
    """True while a process started by multiprocessing's spawn method imports its main module.

    ``_inheriting`` is how multiprocessing itself knows it is in that phase; spawn rewrites
    ``sys.argv`` to the parent's, so the command line cannot tell.
    """
    import multiprocessing

    return bool(getattr(multiprocessing.current_process(), "_inheriting", False))


def die_with_parent() -> None:
    """SIGKILL this process when its parent exits (Linux only; a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        return  # not permitted here: the launcher's process-group kill still covers `up`
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)
