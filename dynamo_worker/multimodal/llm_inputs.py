"""The LLM worker's side (decode with ``--enable-multimodal``): ``multi_modal_data`` to vLLM input.

Everything is checked before vLLM sees it, because bad multimodal input can kill vLLM's engine
(image embeddings with the wrong number of feature tokens do): the embeddings' dtype, byte
count, rank and exact ``[images, tokens per image, hidden size]`` for the served model, their
values (finite and bounded: NaNs poison the KV cache for later requests), the
number of images per prompt, and each PNG (decoded with the same limits as the processor's).
A failure is a ``bad_request`` for that request only; the engine never sees it.
"""

from __future__ import annotations

from typing import Any

import attrs

from dynamo_worker.core.request_plane import RequestError
from dynamo_worker.multimodal.media import MediaLimits, open_png
from dynamo_worker.multimodal.models import VisionModel
from dynamo_worker.multimodal.wire import MultiModalData, convert

# Far above what a vision encoder's projection produces (Blip2's are within a few tens), far
# below what overflows the language model's float arithmetic.
MAX_EMBED_ABS = 1e4


def check_values(embeds: Any, field: str) -> None:
    """A ``bad_request`` for NaN, infinite or huge embedding values. vLLM would run them: the
    request's own answer is garbage, and on CPU the NaNs its attention writes to the KV cache
    stay in the freed blocks and turn later, well-formed requests of other clients into
    garbage too (token 0 forever), so they never reach the engine."""
    import torch

    values = embeds.float()
    if not bool(torch.isfinite(values).all()):
        raise RequestError("bad_request", f"{field} has non-finite values (NaN or infinity)")
    peak = float(values.abs().max()) if values.numel() else 0.0
    if peak > MAX_EMBED_ABS:
        raise RequestError(
            "bad_request",
            f"{field} has a value of magnitude {peak:.3g}; image embeddings are at most {MAX_EMBED_ABS:g} in magnitude",
        )


@attrs.define
class ImageInputs:
    """Validates ``multi_modal_data`` for one served model and builds vLLM's ``multi_modal_data``."""

    model: VisionModel
    max_images: int
    limits: MediaLimits = attrs.field(factory=MediaLimits)

    @classmethod
    def for_engine(cls, engine: Any, model: VisionModel) -> ImageInputs:
        mm_config = engine.model_config.multimodal_config
        limit = mm_config.get_limit_per_prompt("image") if mm_config is not None else 0
        return cls(model, min(limit, model.max_images))

    def engine_data(self, payload: Any) -> dict[str, Any]:
        """vLLM's ``multi_modal_data`` for a request's ``multi_modal_data``; ``bad_request`` if invalid."""
        data: MultiModalData = convert(payload, MultiModalData, "multi_modal_data")
        if data.extra:
            raise RequestError(
                "bad_request",
                f"multi_modal_data.extra ({', '.join(data.extra)}) is not taken by {self.model.model_type} models",
            )
        if (data.image_embeds is None) == (data.images is None):
            raise RequestError("bad_request", "multi_modal_data needs exactly one of image_embeds and images")
        if data.images is not None:
            self._check_count(len(data.images))
            return {
                "image": [
                    open_png(png, self.limits, f"multi_modal_data.images[{i}]") for i, png in enumerate(data.images)
                ]
            }
        assert data.image_embeds is not None
        tensor = data.image_embeds
        tensor.check("multi_modal_data.image_embeds")
        want = self.model.embeds_shape
        if len(tensor.shape) != 3 or tuple(tensor.shape[1:]) != want:
            raise RequestError(
                "bad_request",
                f"multi_modal_data.image_embeds has shape {tensor.shape}; {self.model.model_type} "
                f"needs [images, {want[0]}, {want[1]}] (feature tokens per image, hidden size)",
            )
        self._check_count(tensor.shape[0])
        embeds = tensor.to_tensor("multi_modal_data.image_embeds")
        check_values(embeds, "multi_modal_data.image_embeds")
        return {"image": embeds}

    def _check_count(self, n: int) -> None:
        if not 1 <= n <= self.max_images:
            raise RequestError(
                "bad_request", f"{n} images in one prompt; {self.model.model_type} takes 1 to {self.max_images}"
            )
