"""The `ec-encoder` role (planned: issue #7)."""

from __future__ import annotations

from dynamo_worker.roles.planned import PlannedRole


class EcEncoderRole(PlannedRole):
    """vLLM-native encoder-only instance storing encoder outputs through an EC connector."""

    name = "ec-encoder"
    issue = "issue #7"
