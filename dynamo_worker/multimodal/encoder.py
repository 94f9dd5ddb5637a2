"""The ``encode`` role's encoder: a model's vision tower and projector, run with transformers.

For Blip2 that is the vision transformer, the Q-Former and the language projection
(``Blip2ForConditionalGeneration.get_image_features``): one image becomes
``[num_query_tokens, text hidden size]`` embeddings, exactly what vLLM's own Blip2 computes
before its language model, so the LLM worker given them runs no vision tower. Images are
preprocessed by the model's own image processor (the PIL one: no torchvision).

Models whose encoder output is not one plain tensor (Qwen2-VL's ``image_grid_thw``, the patch
grid the language model's rotary positions need) return those fields in
:attr:`dynamo_worker.multimodal.wire.EncodeResponse.extra`, one :class:`TensorData` per field,
carried beside the embeddings to the LLM worker, which hands them to vLLM with them
(docs/multimodal.md). torch and transformers are imported when the encoder is built.
"""

from __future__ import annotations

import threading
from typing import Any

from dynamo_worker.multimodal.models import VisionModel
from dynamo_worker.multimodal.wire import EncodeResponse, TensorData


class Blip2Encoder:
    """Blip2's vision tower + Q-Former + projection on CPU (float32, as saved)."""

    def __init__(self, path: str, model: VisionModel) -> None:
        import torch
        from transformers import AutoImageProcessor, Blip2ForConditionalGeneration

        self.torch = torch
        self.model = model
        self.image_processor = AutoImageProcessor.from_pretrained(path)
        full = Blip2ForConditionalGeneration.from_pretrained(path).eval()
        full.language_model = None  # the LLM worker runs it; get_image_features never touches it
        self.net = full
        self._lock = threading.Lock()  # one forward at a time: torch uses every core it is given

    def encode(self, images: list[Any]) -> EncodeResponse:
        """Embeddings ``[len(images), tokens, hidden]`` for PIL images (run it in a thread)."""
        with self._lock, self.torch.inference_mode():
            pixels = self.image_processor(images=images, return_tensors="pt").pixel_values
            embeds = self.net.get_image_features(pixel_values=pixels).pooler_output
        want = (len(images), *self.model.embeds_shape)
        if tuple(embeds.shape) != want:  # a model whose config disagrees with its weights
            raise RuntimeError(f"the encoder produced {list(embeds.shape)}, expected {list(want)}")
        return EncodeResponse(image_embeds=TensorData.from_tensor(embeds))


ENCODERS = {"blip-2": Blip2Encoder}


def load_encoder(path: str, model: VisionModel) -> Blip2Encoder:
    return ENCODERS[model.model_type](path, model)
