"""The `encode` role (planned:  runs the vision encoder and hands embeddings to the LLM worker:issue #7)."""

from __future__ import annotations

from dynamo_worker.roles.planned import PlannedRole


class EncodeRole(PlannedRole):
    """Multimodal encode worker: runs the vision encoder and hands embeddings to the LLM worker."""

    name = "encode"
    issue = " runs the vision encoder and hands embeddings to the LLM worker:issue #7"
