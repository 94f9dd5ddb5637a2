"""The ``encode`` role: runs a vision model's encoder and hands embeddings to the LLM worker.

Serves ``encoder.generate`` (Dynamo's component name): ``{"images": [PNG bytes], "model"?}``
(:class:`dynamo_worker.multimodal.wire.EncodeRequest`) answered with one message
``{"image_embeds": TensorData, "extra"?}``. The processor puts those embeddings in the LLM
worker's ``multi_modal_data``; the LLM worker (decode with ``--enable-multimodal``) feeds them
to vLLM as image embeddings and runs no vision tower. The encoder is built with transformers
(:mod:`dynamo_worker.multimodal.encoder`), not vLLM; torch is imported when it is built.
Needs ``--enable-multimodal`` (Dynamo's rule); docs/multimodal.md describes the chain.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dynamo_worker.plugin import (
    Registrar,
    RequestContext,
    RequestError,
    UsageError,
    WorkerContext,
    hookimpl,
)

COMPONENT = "encoder"  # Dynamo's component name for encode workers


class EncodeRole:
    """Multimodal encode worker: runs the vision encoder and hands embeddings to the LLM worker."""

    name = "encode"
    component = COMPONENT

    def __init__(self) -> None:
        self.path = ""
        self.served = ""
        self.model: Any = None  # multimodal.models.VisionModel
        self.limits: Any = None  # multimodal.media.MediaLimits
        self.encoder: Any = None

    @hookimpl
    def dynamo_worker_add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from dynamo_worker.multimodal import media, models

        g = parser.add_argument_group("encode role")
        models.add_model_arguments(g)
        media.add_limit_arguments(g)

    @hookimpl
    def dynamo_worker_configure(self, ctx: WorkerContext) -> None:
        from dynamo_worker.multimodal import media, models

        self.path, self.served, self.model = models.configured_model(ctx.options)
        self.limits = media.limits_from(ctx.options)

    @hookimpl
    async def dynamo_worker_create_engine(self, ctx: WorkerContext) -> Any:
        from dynamo_worker.multimodal.encoder import load_encoder
        from dynamo_worker.multimodal.wire import embeds_message_bytes

        # Embeddings go to the LLM worker in a request-plane message: a model whose image does
        # not fit could never be served (a real vision model's are megabytes; nats-server's
        # default max_payload is 1 MiB).
        limit = ctx.runtime.max_message_bytes()
        one = embeds_message_bytes(*self.model.embeds_shape)
        if one > limit:
            raise UsageError(
                f"--model {self.path}: one image's embeddings take about {one} bytes on the request "
                f"plane, over its {limit}-byte limit (the NATS server's max_payload); raise max_payload "
                "in nats-server's configuration ('up' sizes it from --max-request-bytes)"
            )
        ctx.log.info("loading the %s encoder of %s", self.model.model_type, self.path)
        self.encoder = await asyncio.to_thread(load_encoder, self.path, self.model)
        return self.encoder

    @hookimpl
    def dynamo_worker_register_endpoints(self, registrar: Registrar, ctx: WorkerContext) -> None:
        registrar.endpoint(
            "generate",
            self.generate,
            model=self.served,
            model_path=self.path,
            kind="encode",
            embeds_shape=list(self.model.embeds_shape),
        )

    @hookimpl
    def dynamo_worker_health_payload(self, ctx: WorkerContext) -> dict[str, Any]:
        from dynamo_worker.multimodal.media import sample_png
        from dynamo_worker.multimodal.wire import EncodeRequest, to_builtins

        return to_builtins(EncodeRequest(images=[sample_png()]))

    async def generate(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        from dynamo_worker.multimodal.media import open_png
        from dynamo_worker.multimodal.wire import EncodeRequest, convert, to_builtins

        req: EncodeRequest = convert(request, EncodeRequest, "encode request")
        if req.model is not None and req.model not in (self.served, self.path):
            raise RequestError("not_found", f"this encode worker serves {self.served!r}, not {req.model!r}")
        if not 1 <= len(req.images) <= self.model.max_images:
            raise RequestError(
                "bad_request",
                f"{len(req.images)} images; {self.model.model_type} takes 1 to {self.model.max_images} per request",
            )
        images = [open_png(png, self.limits, f"images[{i}]") for i, png in enumerate(req.images)]
        response = await asyncio.to_thread(self.encoder.encode, images)
        yield to_builtins(response)
