"""The processor's request flow: chat messages with images -> encoder -> LLM worker -> stream back.

The frontend sends ``processor.generate`` a :class:`ProcessorRequest`: the OpenAI ``messages``
as the client wrote them plus the sampling fields it already validated (a
:class:`~dynamo_worker.core.generate.GenerateRequest` without ``token_ids``). The processor

1. checks the content parts: ``text`` and ``image_url`` are taken; ``video_url`` is refused
   for a model that takes no video, and every other part type too (400 naming the part);
2. renders the chat template (text parts; image parts are passed to the template as
   ``{"type": "image"}``, where a model's template puts its placeholder) and tokenizes, as the
   frontend does for text (:func:`dynamo_worker.frontend.preprocess.encode_chat_prompt`); vLLM
   expands each image into its feature tokens when the LLM worker hands it the image;
3. loads and validates every image (:mod:`dynamo_worker.multimodal.media`), 400 on failure;
4. sends the images to an encoder: an ``encode`` worker (``encoder.generate``, answering
   embeddings that go into ``multi_modal_data.image_embeds``) or, with ``--encoder ec-encoder``,
   an ``ec-encoder`` (``ec_encoder.generate``, which stores the encoder outputs through the EC
   connector; the LLM worker is then sent the same PNGs in ``multi_modal_data.images`` and loads
   their outputs instead of encoding);
5. sends the LLM worker (``backend.generate``) the token ids with ``multi_modal_data`` and
   streams its token-id messages back unchanged; the frontend detokenizes them.

A text-only request goes straight to step 5 (the health canary is one).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import msgspec

from dynamo_worker.core.generate import ContextLengthExceeded, GenerateRequest, Int, fit_context
from dynamo_worker.core.request_plane import RequestContext, RequestError
from dynamo_worker.multimodal.media import MediaLoader
from dynamo_worker.multimodal.models import VisionModel
from dynamo_worker.multimodal.wire import EncodeRequest, EncodeResponse, convert, to_builtins

BACKEND = "backend"
ENCODER_COMPONENTS = {"encode": "encoder", "ec-encoder": "ec_encoder"}  # --encoder value -> component
VIDEO_PARTS = ("video_url", "video")
START_HINT = {
    "encode": "dynamo-worker --multimodal-encode-worker --enable-multimodal --model PATH",
    "ec-encoder": "dynamo-worker --vllm-native-encoder-worker --enable-multimodal --model PATH --ec-storage-path DIR",
}


class ProcessorRequest(GenerateRequest, kw_only=True):
    """What the frontend sends ``processor.generate``: ``messages`` and ``model``, plus the
    :class:`GenerateRequest` fields (``stop_conditions``, ``sampling_options``, ...), checked
    against that schema here and forwarded to the LLM worker, which checks them against its model.
    ``token_ids`` and ``multi_modal_data`` are the processor's to make: a caller's are refused."""

    messages: list[dict[str, Any]]
    token_ids: list[Int] = msgspec.field(default_factory=list)


def split_parts(
    messages: list[dict[str, Any]], model: VisionModel, name: str
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Messages for the chat template, and ``(where, url)`` of every image in order."""
    rendered: list[dict[str, Any]] = []
    images: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            rendered.append(message)
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url":
                spec = part.get("image_url")
                url = spec.get("url") if isinstance(spec, dict) else spec
                if not isinstance(url, str) or not url:
                    raise RequestError("bad_request", f"{where}: image_url needs a url")
                images.append((where, url))
                parts.append({"type": "image"})
            elif kind in VIDEO_PARTS and not model.video:
                raise RequestError(
                    "bad_request", f"{where}: model {name!r} ({model.model_type}) does not take video; send images"
                )
            else:
                raise RequestError(
                    "bad_request", f"{where}: content part type {kind!r} is not supported (text and image_url are)"
                )
        rendered.append({**message, "content": parts})
    if len(images) > model.max_images:
        raise RequestError(
            "bad_request",
            f"{len(images)} images in one request; model {name!r} "
            f"({model.model_type}) takes at most {model.max_images}",
        )
    return rendered, images


class Processor:
    """Serves ``processor.generate`` for one model (see the module doc)."""

    def __init__(
        self,
        *,
        tokenizer: Any,
        model: VisionModel,
        served: str,
        loader: MediaLoader,
        backend: Any,
        encoder: Any,
        encoder_kind: str,
        policy: str = "round_robin",
    ) -> None:
        self.tokenizer = tokenizer
        self.model = model
        self.served = served
        self.loader = loader
        self.backend = backend  # runtime Client of backend.generate
        self.encoder = encoder  # runtime Client of encoder.generate or ec_encoder.generate
        self.encoder_kind = encoder_kind
        self.policy = policy

    def _serves(self, multimodal: bool) -> Callable[[Any], bool]:
        return lambda r: r.data.get("model") == self.served and (not multimodal or r.data.get("multimodal") is True)

    def _pick(self, client: Any, what: str, hint: str, *, multimodal: bool = False) -> Any:
        where = self._serves(multimodal)
        if not client.instances(where):
            raise RequestError("unavailable", f"no {what} serves model {self.served!r}; start one: {hint}")
        return client.pick(self.policy, where)

    def _max_tokens(self, max_tokens: int | None, text_tokens: int, images: int, max_model_len: Any) -> int | None:
        """``max_tokens`` fitted to the context (:func:`fit_context`): the prompt is the text tokens
        plus each image's feature tokens, which vLLM inserts (the LLM worker sees only the text's)."""
        if not isinstance(max_model_len, int):
            return max_tokens
        prompt = text_tokens + images * self.model.tokens_per_image
        try:
            return fit_context(prompt, max_tokens, max_model_len)
        except ContextLengthExceeded as exc:
            raise RequestError(
                "bad_request",
                f"{exc} ({text_tokens} text tokens and {images} image(s) of {self.model.tokens_per_image})",
            ) from None

    def tokenize(self, messages: list[dict[str, Any]]) -> list[int]:
        from dynamo_worker.frontend.preprocess import encode_chat_prompt
        from dynamo_worker.frontend.protocol import ApiError

        try:
            return encode_chat_prompt(self.tokenizer, self.served, messages)
        except ApiError as exc:  # the frontend's error type: the same message, as a request error
            raise RequestError("bad_request", exc.message) from None

    async def encode(self, pngs: list[bytes]) -> dict[str, Any]:
        """``multi_modal_data`` for the LLM worker, after the encoder has seen the images."""
        instance = self._pick(self.encoder, f"{self.encoder_kind} worker", START_HINT[self.encoder_kind])
        answer: Any = None
        request = to_builtins(EncodeRequest(images=pngs, model=self.served))
        async with aclosing(self.encoder.direct(request, instance.instance_id)) as stream:
            async for item in stream:
                answer = item
        if self.encoder_kind == "ec-encoder":  # stored through the EC connector: send the images
            return {"images": request["images"]}
        response: EncodeResponse = convert(answer, EncodeResponse, "encode worker answer")
        return to_builtins({"image_embeds": response.image_embeds, "extra": response.extra})

    async def generate(self, request: Any, context: RequestContext) -> AsyncIterator[Any]:
        req: ProcessorRequest = convert(request, ProcessorRequest, "processor request")
        for name in ("token_ids", "multi_modal_data", "prompt_embeds"):
            if getattr(req, name):
                raise RequestError("bad_request", f"{name}: the processor makes it from messages; leave it out")
        if req.model is not None and req.model != self.served:
            raise RequestError("not_found", f"this processor serves {self.served!r}, not {req.model!r}")
        messages, images = split_parts(req.messages, self.model, self.served)
        token_ids = self.tokenize(messages)
        record = self._pick(
            self.backend,
            "LLM worker (decode with --enable-multimodal)",
            "dynamo-worker --enable-multimodal --model PATH",
            multimodal=True,
        )
        stop = req.stop_conditions
        stop.max_tokens = self._max_tokens(
            stop.max_tokens, len(token_ids), len(images), record.data.get("max_model_len")
        )
        payload = to_builtins(req)
        del payload["messages"]
        payload.update(model=self.served, token_ids=token_ids)
        if images:
            pngs = await asyncio.gather(*(self.loader.load(url, where) for where, url in images))
            mm = await self.encode(list(pngs))
            payload["multi_modal_data"] = {k: v for k, v in mm.items() if v is not None}
        async with aclosing(self.backend.direct(payload, record.instance_id)) as stream:
            async for item in stream:
                yield item
