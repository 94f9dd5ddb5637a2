"""The ``ec-encoder`` role's handler: run vLLM's encoder on images so the EC connector stores them.

The engine is an encoder-only vLLM instance (``ec_role="ec_producer"``: no KV cache, no
language model step). A request with an image makes vLLM run the vision encoder and hand the
output to its EC connector, which stores it under the image's content hash; the answer has no
tokens. The LLM worker (an ``ec_consumer`` on the same storage) later finds the output by the
same hash when it is given the same image.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from dynamo_worker.core.errors import EngineDead
from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.multimodal.media import MediaLimits, open_png
from dynamo_worker.multimodal.models import VisionModel
from dynamo_worker.multimodal.wire import EncodeRequest, convert


class EcEncodeHandler:
    """Serves ``ec_encoder.generate``: ``{"images": [PNG]}`` -> ``{"stored": n}`` once all are stored."""

    def __init__(
        self, engine: Any, model: VisionModel, served: str, paths: set[str], prompt_token: int, limits: MediaLimits
    ) -> None:
        self.engine = engine
        self.model = model
        self.served = served
        self.paths = paths
        self.prompt_token = prompt_token
        self.limits = limits

    async def generate(self, request: Any, context: RequestContext) -> AsyncIterator[dict[str, Any]]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        req: EncodeRequest = convert(request, EncodeRequest, "encode request")
        if req.model is not None and req.model not in self.paths:
            raise RequestError("not_found", f"this ec-encoder serves {self.served!r}, not {req.model!r}")
        if not 1 <= len(req.images) <= self.model.max_images:
            raise RequestError(
                "bad_request",
                f"{len(req.images)} images; {self.model.model_type} takes 1 to {self.model.max_images} per request",
            )
        images = [open_png(png, self.limits, f"images[{i}]") for i, png in enumerate(req.images)]
        prompt = {"prompt_token_ids": [self.prompt_token], "multi_modal_data": {"image": images}}
        try:
            # One step: the encoder runs and the connector stores its output; no token is produced.
            async for _ in self.engine.generate(prompt, SamplingParams(max_tokens=1), context.request_id):
                pass
        except EngineDeadError as exc:
            raise EngineDead(f"vLLM engine died: {exc}") from exc
        except (VLLMClientError, ValueError) as exc:
            raise RequestError("bad_request", f"rejected by the engine: {exc}") from None
        yield {"stored": len(images)}
