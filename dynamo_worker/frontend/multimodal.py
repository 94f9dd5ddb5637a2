"""Chat requests with media parts go to a multimodal processor; text-only ones keep their path.

A chat request with an ``image_url`` (or video/audio) content part cannot be tokenized here: its
placeholders, media loading and encoding are the ``processor`` role's job
(:mod:`dynamo_worker.multimodal.processor`). The frontend validates the OpenAI fields as for any
request, then sends ``processor.generate`` the messages as the client wrote them with the
sampling fields, through the same :class:`~dynamo_worker.frontend.router.Router` (retries,
error mapping), and detokenizes the token ids the processor streams back from the LLM worker.
A text-only model (its ``config.json`` names no vision or audio encoder) gets a 400 naming the
media part, as vllm serve answers ("... is not a multimodal model"); a multimodal model no
processor serves gets a 503 saying what to start.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Any

import msgspec

from dynamo_worker.core.runtime import Client
from dynamo_worker.frontend import models, preprocess
from dynamo_worker.frontend.protocol import ChatRequest, GenerationParams, bad_request, unavailable
from dynamo_worker.frontend.router import Router

COMPONENT = "processor"  # Dynamo's component of multimodal processors
ENDPOINT = "generate"
MEDIA_PARTS = frozenset({"image_url", "video_url", "input_audio", "audio_url", "image", "video"})


# A config.json key like these names an encoder (vision_config, audio_config, image_token_index,
# mm_vision_tower, ...): the model may take media. A text-only model's config has none.
_MEDIA_KEY = re.compile(r"vision|visual|image|video|audio|speech|mm_")


def has_media(req: ChatRequest) -> bool:
    """Whether any message has a media content part."""
    return first_media_part(req) is not None


def first_media_part(req: ChatRequest) -> tuple[str, str] | None:
    """``(param, part type)`` of the first media content part (``messages[i].content[j]``), if any."""
    for i, message in enumerate(req.messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type in MEDIA_PARTS:
                    return f"messages[{i}].content[{j}]", part.type
    return None


# The chat fields the frontend applies when it renders the prompt itself, with their defaults;
# with media the processor renders it (from the messages alone), so these are refused, not dropped.
_RENDERING_FIELDS = {
    "tools": None,
    "add_generation_prompt": True,
    "continue_final_message": False,
    "add_special_tokens": False,
    "chat_template_kwargs": None,
}


def refuse_text_only_fields(req: ChatRequest) -> None:
    """A 400 naming the first field (``tools``, ``chat_template_kwargs``, ...) a media request sets."""
    for name, default in _RENDERING_FIELDS.items():
        value = getattr(req, name)
        if value if default is None else value is not default:  # None: also an empty list or object
            raise bad_request(
                f"`{name}` is not supported together with image or video content (the multimodal processor "
                "renders the prompt); leave it out or send text only",
                param=name,
            )


@functools.lru_cache(maxsize=64)
def _may_take_media(model_path: str) -> bool | None:
    """Whether the model directory's ``config.json`` names a media encoder; None: unreadable."""
    try:
        config = json.loads((pathlib.Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    return any(_MEDIA_KEY.search(str(key)) for key in config)


def refuse_text_only_model(req: ChatRequest, model: models.ServedModel) -> None:
    """A 400 naming the media part when ``model`` is text-only (vllm serve: "... is not a
    multimodal model"). A model whose config cannot be read here is left to the processor check."""
    found = first_media_part(req)
    if found is None:
        return
    verdicts = [_may_take_media(path) for path in model.model_paths]
    if verdicts and all(v is False for v in verdicts):
        param, part_type = found
        raise bad_request(
            f"{model.name} is not a multimodal model: it takes text only, so a content part of type "
            f"{part_type!r} cannot be sent to it; send text parts only, or use a vision-language model",
            param=param,
        )


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
