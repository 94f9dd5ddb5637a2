"""Disaggregated serving, orchestrated in the frontend: prefill on a prefill worker, then decode.

As in current Dynamo: when ``prefill.generate`` instances serve the request's model, the
frontend first sends the request to one of them (the prefill worker runs the prompt with one
output token and its KV connector's ``do_remote_decode`` parameters), then sends the decode
worker the request with ``prefill_result = {"disaggregated_params": {"kv_transfer_params"},
"prompt_tokens_details"}``; the decode worker hands those ``kv_transfer_params`` to its connector,
which loads the prompt's KV instead of computing it.

When no prefill worker serves the model, or the prefill call fails (the worker died, left,
timed out or refused the request), the request is served aggregated by the decode worker:
clients see no error. Such a fallback is counted (``dynamo_frontend_prefill_fallbacks_total``,
by model and reason) once the model has had prefill workers, so a purely aggregated deployment
counts nothing. A stream migrated to another decode worker is continued aggregated (its prompt
then includes tokens the prefill never saw).

docs/disaggregated.md says why the orchestration lives here rather than in the decode worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from dynamo_worker.core.discovery import InstanceRecord
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Client

log = logging.getLogger(__name__)

COMPONENT = "prefill"  # Dynamo's component of prefill workers
ENDPOINT = "generate"


class PrefillRouter:
    """Picks a prefill worker for a model and returns the decode request's ``prefill_result``."""

    def __init__(self, client: Client, policy: str = "round_robin", *,
                 on_prefill: Callable[[str], None] | None = None,
                 on_fallback: Callable[[str, str], None] | None = None) -> None:
        self.client = client
        self.policy = policy
        self.on_prefill = on_prefill or (lambda model: None)
        self.on_fallback = on_fallback or (lambda model, reason: None)
        self.seen: set[str] = set()  # models that have had prefill workers

    def _fallback(self, model: str, reason: str) -> None:
        if model in self.seen:
            self.on_fallback(model, reason)

    async def prefill(self, model: str, payload: dict[str, Any]) -> dict[str, Any] | None:
        """Prefill ``payload`` on a prefill worker; its ``prefill_result``, or None to serve aggregated."""

        def serves(r: InstanceRecord) -> bool:
            return r.data.get("model") == model

        if not self.client.instances(serves):
            self._fallback(model, "no_prefill_worker")
            return None
        self.seen.add(model)
        record = self.client.pick(self.policy, serves)
        last: Any = None
        try:
            async with aclosing(self.client.direct(payload, record.instance_id)) as stream:
                async for item in stream:
                    last = item
        except RequestError as exc:
            log.warning("prefill on instance %s failed (%s: %s); serving the request aggregated",
                        record.instance_id, exc.code, exc.message)
            self._fallback(model, "prefill_failed")
            return None
        if not isinstance(last, dict) or not isinstance(last.get("disaggregated_params"), dict):
            log.warning("prefill instance %s answered without disaggregated_params; serving aggregated",
                        record.instance_id)
            self._fallback(model, "prefill_failed")
            return None
        self.on_prefill(model)
        usage = last.get("completion_usage") if isinstance(last.get("completion_usage"), dict) else {}
        return {"disaggregated_params": last["disaggregated_params"],
                "prompt_tokens_details": usage.get("prompt_tokens_details")}
