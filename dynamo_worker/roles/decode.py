"""The `decode` role (planned: issue #4)."""

from __future__ import annotations

from dynamo_worker.roles.planned import PlannedRole


class DecodeRole(PlannedRole):
    """Aggregated or decode worker on a vLLM AsyncLLM engine."""

    name = "decode"
    issue = "issue #4"
    instead = "echo"
