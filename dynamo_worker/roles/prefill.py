"""The ``prefill`` role: the prefill half of disaggregated serving, on vLLM's ``AsyncLLM``.

It shares the decode role's hooks (:class:`dynamo_worker.engine.role.VllmRole`: engine
arguments, engine creation, metrics, KV-event relay, engine checks and shutdown) with three
differences: it registers under its own component
``prefill`` (so a frontend tells it from decode's ``backend``), it serves only ``generate``,
``clear_kv_blocks`` and ``kv_blocks``, and its ``generate`` runs the prompt with one output
token and the connector's ``do_remote_decode`` parameters, answering one chunk with the KV
connector's ``kv_transfer_params`` (``dynamo_worker.engine.handlers``). It needs a KV connector
(``--connector`` or ``--kv-transfer-config``, ``dynamo_worker.engine.kv_transfer``).
docs/disaggregated.md describes the whole flow.
"""

from __future__ import annotations

import argparse

from dynamo_worker.engine.role import VllmRole
from dynamo_worker.plugin import hookimpl


class PrefillRole(VllmRole):
    """Prefill-only worker for disaggregated serving: runs the prompt and hands its KV cache to decode."""

    name = "prefill"
    component = "prefill"  # Dynamo's component name for prefill workers
    needs_connector = True

    @hookimpl
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from dynamo_worker.engine import kv_transfer

        kv_transfer.add_arguments(self._engine_arguments(parser))
