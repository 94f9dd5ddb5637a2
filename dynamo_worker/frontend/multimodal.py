"""Chat requests with media parts go to a multimodal processor; text-only ones keep their path.

A chat request with an ``image_url`` (or video/audio) content part cannot be tokenized here: its
placeholders, media loading and encoding are the ``processor`` role's job
(:mod:`dynamo_worker.multimodal.processor`). The frontend validates the OpenAI fields as for any
request, then sends ``processor.generate`` the messages as the client wrote them with the
sampling fields, through the same :class:`~dynamo_worker.frontend.router.Router` (retries,
error mapping), and detokenizes the token ids the processor streams back from the LLM worker.
When no processor serves the model such a request gets a 503 saying what to start.
"""

from __future__ import annotations

from typing import Any

import msgspec

from dynamo_worker.core.runtime import Client
from dynamo_worker.frontend import models, preprocess
from dynamo_worker.frontend.protocol import ChatRequest, GenerationParams, unavailable
from dynamo_worker.frontend.router import Router

COMPONENT = "processor"  # Dynamo's component of multimodal processors
ENDPOINT = "generate"
MEDIA_PARTS = frozenset({"image_url", "video_url", "input_audio", "audio_url", "image", "video"})


def has_media(req: ChatRequest) -> bool:
    """Whether any message has a media content part."""
    return any(isinstance(m.content, list) and any(p.type in MEDIA_PARTS for p in m.content) for m in req.messages)


class MediaRoute:
    """Routes media chat requests to ``processor.generate`` instances of their model."""

    def __init__(self, client: Client, router: Router) -> None:
        self.client = client
        self.router = router

    def check(self, model: str) -> None:
        """A 503 naming what to start when no processor serves ``model``."""
        if not self.client.instances(lambda r: models.serves(r, model)):
            raise unavailable(
                f"model {model!r} has no multimodal processor, which requests with image or video parts "
                "need; start one: dynamo-worker --multimodal-processor --enable-multimodal --model PATH",
                code="no_processor",
            )

    @staticmethod
    def payload(body: bytes, model: models.ServedModel, params: GenerationParams) -> dict[str, Any]:
        """``processor.generate``'s request: the client's messages plus the validated sampling fields."""
        messages = msgspec.json.decode(body)["messages"]  # parse_chat accepted it: a list of messages
        payload = preprocess.preprocessed_request(model, [], params, params.max_tokens)
        del payload["token_ids"]  # the processor tokenizes
        payload["messages"] = messages
        return payload
