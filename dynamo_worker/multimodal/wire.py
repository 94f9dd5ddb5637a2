"""The messages of the multimodal chain, and how a tensor crosses NATS.

The request plane speaks JSON (:mod:`dynamo_worker.core.wire`); a tensor travels as
:class:`TensorData`: its dtype name, its shape and its raw bytes (C order, little-endian, the
byte order of every platform vLLM runs on), which msgspec writes as base64. Decoding checks the
byte count against dtype and shape, then builds the tensor with ``torch.frombuffer``: nothing
from the wire is ever unpickled (Dynamo's ``prompt_embeds`` is a base64 ``torch.save``; we do
not ``torch.load`` what a peer sends). Images travel as PNG bytes that the processor wrote
after validating the caller's image (:mod:`dynamo_worker.multimodal.media`).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from dynamo_worker.core.request_plane import RequestError

# Float dtypes only: vLLM casts image embeddings to the model's dtype; anything else is refused.
ITEM_SIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
MAX_DIMS = 4


class TensorData(msgspec.Struct, forbid_unknown_fields=True):
    """A tensor on the wire: ``dtype`` (``float32``/``float16``/``bfloat16``), ``shape``, raw ``data``."""

    dtype: str
    shape: list[int]
    data: bytes

    @classmethod
    def from_tensor(cls, tensor: Any) -> TensorData:
        import torch

        t = tensor.detach().to("cpu").contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in ITEM_SIZE:
            raise ValueError(f"cannot send a {name} tensor; use one of {', '.join(ITEM_SIZE)}")
        # numpy has no bfloat16: its bytes are taken through a same-width integer view.
        raw = t.view(torch.int16) if name == "bfloat16" else t
        return cls(name, list(t.shape), raw.numpy().tobytes())

    def check(self, field: str) -> None:
        """A ``bad_request`` naming ``field`` unless dtype, shape and byte count agree."""
        if self.dtype not in ITEM_SIZE:
            raise RequestError("bad_request", f"{field}.dtype {self.dtype!r} is not one of {', '.join(ITEM_SIZE)}")
        if not 1 <= len(self.shape) <= MAX_DIMS or any(type(d) is not int or d < 1 for d in self.shape):
            raise RequestError("bad_request", f"{field}.shape {self.shape} must be 1 to {MAX_DIMS} positive sizes")
        expected = math.prod(self.shape) * ITEM_SIZE[self.dtype]
        if len(self.data) != expected:
            raise RequestError(
                "bad_request", f"{field} has {len(self.data)} bytes; {self.dtype} {self.shape} needs {expected}"
            )

    def to_tensor(self, field: str) -> Any:
        """The tensor (checked first; see :meth:`check`)."""
        import torch

        self.check(field)
        return torch.frombuffer(bytearray(self.data), dtype=getattr(torch, self.dtype)).reshape(self.shape)


def embeds_message_bytes(tokens_per_image: int, hidden_size: int, images: int = 1, item_size: int = 4) -> int:
    """About how many bytes ``images`` images' embeddings take in one request-plane message:
    float32 (what the encode role produces) in base64, plus the message around it."""
    raw = images * tokens_per_image * hidden_size * item_size
    return math.ceil(raw / 3) * 4 + 1024


class MultiModalData(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """``multi_modal_data`` of a ``generate`` request to an LLM worker started with ``--enable-multimodal``.

    Exactly one of:

    * ``image_embeds``: ``[images, tokens per image, text hidden size]`` from an ``encode``
      worker; the LLM worker hands them to vLLM as image embeddings and runs no vision tower.
    * ``images``: PNG bytes; the LLM worker's vLLM encodes them itself, or, as an EC consumer,
      loads their encoder output that an ``ec-encoder`` stored through the EC connector.

    ``extra`` carries model-specific encoder outputs beside the embeddings (Qwen-VL's
    ``image_grid_thw``); the models served here have none, so a worker refuses it.
    """

    image_embeds: TensorData | None = None
    images: list[bytes] | None = None
    extra: dict[str, TensorData] | None = None


class EncodeRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Request of ``encoder.generate`` (the ``encode`` role) and ``ec_encoder.generate``."""

    images: list[bytes]
    model: str | None = None


class EncodeResponse(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Answer of ``encoder.generate``: the embeddings and any model-specific fields beside them."""

    image_embeds: TensorData
    extra: dict[str, TensorData] | None = None


def convert(payload: Any, kind: type[msgspec.Struct], what: str) -> Any:
    """``payload`` as ``kind``; a ``bad_request`` naming ``what`` otherwise."""
    try:
        return msgspec.convert(payload, kind)
    except msgspec.ValidationError as exc:
        raise RequestError("bad_request", f"invalid {what}: {exc}") from None


def to_builtins(obj: Any) -> Any:
    """A struct as JSON-ready values (bytes become base64 text), for a request-plane payload."""
    return msgspec.to_builtins(obj)
