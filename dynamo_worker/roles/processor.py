"""The `processor` role (planned:  takes chat requests with images, calls encode, then the LLM worker:issue #7)."""

from __future__ import annotations

from dynamo_worker.roles.planned import PlannedRole


class ProcessorRole(PlannedRole):
    """Multimodal entry point: takes chat requests with images, calls encode, then the LLM worker."""

    name = "processor"
    issue = " takes chat requests with images, calls encode, then the LLM worker:issue #7"
