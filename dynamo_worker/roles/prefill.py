"""The `prefill` role (planned:  runs the prompt and hands its KV cache to decode:issue #6)."""

from __future__ import annotations

from dynamo_worker.roles.planned import PlannedRole


class PrefillRole(PlannedRole):
    """Prefill-only worker for disaggregated serving: runs the prompt and hands its KV cache to decode."""

    name = "prefill"
    issue = " runs the prompt and hands its KV cache to decode:issue #6"
