"""The `frontend` role (planned: issue #4)."""

from __future__ import annotations

from dynamo_worker.roles.planned import PlannedRole


class FrontendRole(PlannedRole):
    """OpenAI-compatible HTTP frontend that routes to workers found through discovery."""

    name = "frontend"
    issue = "issue #4"
    instead = "echo"
