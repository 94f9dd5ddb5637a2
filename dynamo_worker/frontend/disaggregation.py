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

With ``--router-mode kv`` the prefill worker is chosen as decode workers are
(:class:`~dynamo_worker.frontend.kv_routing.KvRouting` over the prefill workers, which relay
their KV events too): the one holding most of the prompt's prefix, weighed against its load.
Otherwise by the router mode's policy.

docs/disaggregated.md says why the orchestration lives here rather than in the decode worker.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

from dynamo_worker.core.discovery import InstanceRecord
from dynamo_worker.core.generate import cached_tokens
from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.core.runtime import Client
from dynamo_worker.frontend.kv_routing import KvRouting

log = logging.getLogger(__name__)

COMPONENT = "prefill"  # Dynamo's component of prefill workers
ENDPOINT = "generate"


class PrefillRouter:
    """Picks a prefill worker for a model and returns the decode request's ``prefill_result``."""

    def __init__(
        self,
        client: Client,
        policy: str = "round_robin",
        *,
        on_prefill: Callable[[str], None] | None = None,
        on_fallback: Callable[[str, str], None] | None = None,
        kv: KvRouting | None = None,
    ) -> None:
        self.client = client
        self.policy = policy
        self.kv = kv  # --router-mode kv: prefill where the prompt's prefix is cached
        self.on_prefill = on_prefill or (lambda model: None)
        self.on_fallback = on_fallback or (lambda model, reason: None)
        self.seen: set[str] = set()  # models that have had prefill workers

    def _pick(
        self, serves: Callable[[InstanceRecord], bool], payload: dict[str, Any], request_id: str | None
    ) -> tuple[InstanceRecord, dict[str, Any]]:
        """The prefill worker, and the request to send it (with ``routing.dp_rank`` when the KV
        router chose a data-parallel rank)."""
        if self.kv is None or request_id is None:
            return self.client.pick(self.policy, serves), payload
        # A prefill request produces one token and then leaves the worker: its load is its prompt.
        stop = {**(payload.get("stop_conditions") or {}), "max_tokens": 1}
        record, rank = self.kv.choose(self.client.instances(serves), {**payload, "stop_conditions": stop}, request_id)
        if record.data.get("data_parallel_size", 1) > 1:
            return record, {**payload, "routing": {**(payload.get("routing") or {}), "dp_rank": rank}}
        return record, payload

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
        request_id = uuid.uuid4().hex if self.kv is not None else None
        record, request = self._pick(serves, payload, request_id)
        last: Any = None
        try:
            async with aclosing(self.client.direct(request, record.instance_id)) as stream:
                async for item in stream:
                    last = item
        except RequestError as exc:
            log.warning(
                "prefill on instance %s failed (%s: %s); serving the request aggregated",
                record.instance_id,
                exc.code,
                exc.message,
            )
            self._fallback(model, "prefill_failed")
            return None
        finally:
            if self.kv is not None and request_id is not None:
                reported = last.get("completion_usage") if isinstance(last, dict) else None
                self.kv.finished(request_id, cached_tokens(reported))
        if not isinstance(last, dict) or not isinstance(last.get("disaggregated_params"), dict):
            log.warning(
                "prefill instance %s answered without disaggregated_params; serving aggregated", record.instance_id
            )
            self._fallback(model, "prefill_failed")
            return None
        self.on_prefill(model)
        usage = last.get("completion_usage") if isinstance(last.get("completion_usage"), dict) else {}
        return {
            "disaggregated_params": last["disaggregated_params"],
            "prompt_tokens_details": usage.get("prompt_tokens_details"),
        }
